"""Timing helpers shared by the benchmarks (import as ``from benchutil import ...``; a module
named ``conftest`` would be ambiguous when tests/ and bench/ run in one pytest session).

On a GPU, `timed` and `run_benchmark` synchronise CUDA around every call so that the same suite
times real work.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *, warmup: int = 2, rounds: int = 7) -> float:
    """Median seconds of `fn()` over `rounds` after `warmup` calls, synchronised on GPU. Used to
    measure the *other* side of a ratio in the same run as the benchmarked side."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_benchmark(benchmark, fn, *, rounds: int = 7, warmup_rounds: int = 2):
    """benchmark.pedantic with CUDA synchronisation after each call."""

    def call():
        out = fn()
        sync()
        return out

    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def benchmarks_disabled(benchmark) -> bool:
    return getattr(benchmark, "disabled", False)


def alternating_rounds(benchmark, fast, other, *, rounds: int = 5, warmup_rounds: int = 1):
    """Time `fast` with pytest-benchmark and `other` in the (untimed) setup before each round, so
    the two sides alternate round by round; returns ``(fast_s, other_s, median_round_ratio)``
    with the two sides' *fastest* rounds. On a shared 2-core VM other jobs and memory-bandwidth
    neighbours inflate single rounds by up to 2x (2026-11-22: the same code's tiny training step
    measured 15-30 ms from one run to the next); the fastest rounds of interleaved timings are what
    is stable."""
    other_times = []

    def setup():
        t0 = time.perf_counter()
        other()
        sync()
        other_times.append(time.perf_counter() - t0)

    def call():
        out = fast()
        sync()
        return out

    benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    fast_times = benchmark.stats.stats.data[-rounds:]
    other_times = other_times[-rounds:]
    ratio = statistics.median(o / f for o, f in zip(other_times, fast_times, strict=True))
    return min(fast_times), min(other_times), ratio


def peak_allocated_bytes(fn) -> int:
    """Peak bytes torch allocates while `fn()` runs, above what was allocated before: the call's
    own memory (activations, gradients, optimizer state it creates), not the process RSS. GPU:
    the caching allocator's peak; CPU: the allocation and free events of torch's profiler."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # allocations positive, frees negative
        peak = max(peak, live)
    return peak


def record_sizes(benchmark, *, dtype, **sizes) -> None:
    """Store the problem a benchmark times in its ``extra_info``: ``dtype`` (a torch dtype or its
    name) and named sizes (ints, or shapes given as tuples / ``torch.Size``, stored as lists) under
    ``sizes``; ``threads`` and ``device`` are stamped by bench/conftest.py. Call it before any
    early return so the smoke run (``--benchmark-disable``) records them too."""
    def plain(v):
        if isinstance(v, (tuple, list, torch.Size)):
            return [plain(x) for x in v]
        return v

    benchmark.extra_info["dtype"] = str(dtype).removeprefix("torch.")
    benchmark.extra_info.setdefault("sizes", {}).update({k: plain(v) for k, v in sizes.items()})


#: extra_info keys read as memory figures (MiB unless the name says otherwise)
MEMORY_SUFFIXES = ("_mb", "_mib")


def _is_ratio(key: str) -> bool:
    return key.startswith("speedup_") or "_vs_" in key


def _is_memory(key: str) -> bool:
    return key.endswith(MEMORY_SUFFIXES) or key.endswith("_bytes")


def summary_lines(records) -> list[str]:
    """One line per benchmark that has ratios or memory figures in ``extra_info``:
    ``name: speedup_vs_x 2.31x, memory_vs_x 0.55x | peak_step_alloc_mb 2011 MiB``. `records` are
    ``(name, extra_info)`` pairs; non-numeric values are left out. Ratios are "how many times",
    memory is in MiB (keys ending ``_mb`` / ``_mib``) or bytes (``_bytes``)."""
    lines = []
    width = max((len(name) for name, _ in records), default=0)
    for name, extra in records:
        nums = {k: v for k, v in sorted(extra.items())
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        ratios = [f"{k} {v:.2f}x" for k, v in nums.items() if _is_ratio(k)]
        memory = [f"{k} {v:,.0f} B" if k.endswith("_bytes") else f"{k} {v:,.1f} MiB"
                  for k, v in nums.items() if _is_memory(k) and not _is_ratio(k)]
        if not ratios and not memory:
            continue
        parts = ", ".join(ratios) + (" | " if ratios and memory else "") + ", ".join(memory)
        lines.append(f"{name:<{width}}  {parts}")
    return lines


def sam_sizes(config) -> dict:
    """The widths and depths of a SAM config that set a benchmark's cost (for `record_sizes`)."""
    v, q, t = config.vision_config, config.qformer_config, config.text_config
    return dict(vit_hidden=v.hidden_size, vit_layers=v.num_hidden_layers, image_size=v.image_size,
                patch_size=v.patch_size, qformer_hidden=q.hidden_size, qformer_layers=q.num_hidden_layers,
                query_tokens=config.num_query_tokens, llm_hidden=t.hidden_size, llm_layers=t.num_hidden_layers,
                llm_vocab=t.vocab_size)
