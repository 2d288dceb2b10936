"""Timing helpers shared by the benchmarks (import as ``from benchutil import ...``; a module
named ``conftest`` would be ambiguous when tests/ and bench/ run in one pytest session).

On a GPU, `timed` and `run_benchmark` synchronise CUDA around every call so that the same suite
times real work.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none, e.g. Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


#: load a quiet machine still shows (daemons, the shell, the pytest process between benchmarks)
LOAD_SLACK = 0.5


def busy_warning(load_start, load_end, cpu_count: int | None, threads: int) -> str | None:
    """A one-line warning when other jobs held the cores the benchmarks needed, else None.

    `load_start` / `load_end` are `load_average()` values from before and after the timed work.
    Before, the 1-minute load is all other jobs'; after, the benchmarks' own `threads` are in it
    too. Busy: other jobs' load above the cores the benchmarks left free (``cpu_count - threads``)
    plus `LOAD_SLACK`. On a 2-core machine running 2 threads, load 5 (seen when one benchmark took
    1.09 s instead of 35-69 ms) warns; 0.3 at the start and 2.4 at the end do not."""
    if not cpu_count:
        return None
    free = cpu_count - threads + LOAD_SLACK
    busy = []
    if load_start and load_start[0] > free:
        busy.append(f"{load_start[0]:.2f} at start")
    if load_end and load_end[0] - threads > free:
        busy.append(f"{load_end[0]:.2f} at end (own {threads} threads included)")
    if not busy:
        return None
    return (f"busy machine: 1-minute load average {' and '.join(busy)} on {cpu_count} cores with {threads} "
            f"benchmark threads; other jobs shared the cores, so times and ratios may be off: rerun on a quiet machine")


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


@dataclass
class BackToBack:
    """Seconds per call of `back_to_back`: ``device_s`` until the last call's work is done,
    ``host_s`` until the last call returned (medians over rounds)."""

    device_s: float
    host_s: float


def back_to_back(fn, *, calls: int = 50, rounds: int = 5, warmup: int = 3) -> BackToBack:
    """`calls` calls of `fn` issued back to back with one synchronisation at the end, `rounds`
    times. The device time per call is what a step making many calls in a row sees (on a GPU the
    host queues the next launches while the kernels run, so its overhead hides unless it is the
    bottleneck); the host time per call (validation, allocation, launches) is reported apart,
    since a single synchronised call times both added together. On a CPU the two are equal."""
    for _ in range(warmup):
        fn()
    sync()
    device, host = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        sync()
        device.append((time.perf_counter() - t0) / calls)
        host.append((t1 - t0) / calls)
    return BackToBack(statistics.median(device), statistics.median(host))


def run_benchmark(benchmark, fn, *, rounds: int = 7, warmup_rounds: int = 2):
    """benchmark.pedantic with CUDA synchronisation after each call."""

    def call():
        out = fn()
        sync()
        return out

    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def benchmarks_disabled(benchmark) -> bool:
    return getattr(benchmark, "disabled", False)


@dataclass
class RoundRatios:
    """Per-round times of two sides timed alternately (A, B, A, B...): ``fast_s[i]`` and
    ``other_s[i]`` ran back to back, so their ratio saw the same machine state. The reported
    ratio is the median of the per-round ratios and its spread their interquartile range: a
    neighbour job slows both sides of a round alike, while ratios of separately chosen (fastest or
    median) rounds of each side mix different machine states."""

    fast_s: list[float]
    other_s: list[float]
    warmup_rounds: int

    @property
    def ratios(self) -> list[float]:
        return [o / f for o, f in zip(self.other_s, self.fast_s, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def iqr(self) -> tuple[float, float]:
        """(q1, q3) of the per-round ratios (both the one ratio when there is one round)."""
        r = self.ratios
        if len(r) < 2:
            return r[0], r[0]
        q1, _, q3 = statistics.quantiles(r, n=4, method="inclusive")
        return q1, q3

    @property
    def fast_median_s(self) -> float:
        return statistics.median(self.fast_s)

    @property
    def other_median_s(self) -> float:
        return statistics.median(self.other_s)


def _check_rounds(rounds: int, warmup_rounds: int) -> None:
    # an unwarmed first round pays allocation, first-touch and lazy-init costs on one side only
    if rounds < 1 or warmup_rounds < 1:
        raise ValueError(f"alternating rounds need rounds >= 1 and warmup_rounds >= 1, got {rounds}, {warmup_rounds}")


def _timed_call(fn, times: list | None = None):
    """`fn` synchronised on GPU; appends its wall seconds to `times` when given."""
    t0 = time.perf_counter()
    out = fn()
    sync()
    if times is not None:
        times.append(time.perf_counter() - t0)
    return out


def alternating_rounds(benchmark, fast, other, *, rounds: int = 5, warmup_rounds: int = 1) -> RoundRatios:
    """Time `fast` with pytest-benchmark and `other` in the (untimed by pytest-benchmark) setup
    before each round, so that the two sides alternate round by round, after `warmup_rounds`
    untimed rounds of each side. Returns the `RoundRatios` of the timed rounds; store them with
    `record_ratio`."""
    _check_rounds(rounds, warmup_rounds)
    other_times: list[float] = []
    def setup() -> None:  # pytest-benchmark would take a returned value as the target's arguments
        _timed_call(other, other_times)

    benchmark.pedantic(lambda: _timed_call(fast), setup=setup, rounds=rounds, warmup_rounds=warmup_rounds,
                       iterations=1)
    # the setup also runs before each warm-up round: the last `rounds` are the timed ones
    return RoundRatios(list(benchmark.stats.stats.data[-rounds:]), other_times[-rounds:], warmup_rounds)


def alternate(fast, other, *, rounds: int = 5, warmup_rounds: int = 1) -> RoundRatios:
    """`alternating_rounds` without pytest-benchmark: for a benchmark's second comparison (e.g.
    against a copy floor) after its main one."""
    _check_rounds(rounds, warmup_rounds)
    fast_s: list[float] = []
    other_s: list[float] = []
    for n in range(warmup_rounds + rounds):
        keep = n >= warmup_rounds
        _timed_call(other, other_s if keep else None)
        _timed_call(fast, fast_s if keep else None)
    return RoundRatios(fast_s, other_s, warmup_rounds)


def record_ratio(benchmark, key: str, rr: RoundRatios) -> float:
    """Store ``extra_info[key]`` = the median per-round ratio and, under ``ratio_spread[key]``, its
    interquartile range and round counts (printed in the terminal summary, drawn as error bars by
    report.py). Returns the ratio."""
    q1, q3 = rr.iqr
    benchmark.extra_info[key] = rr.ratio
    benchmark.extra_info.setdefault("ratio_spread", {})[key] = dict(q1=q1, q3=q3, rounds=len(rr.fast_s),
                                                                      warmup_rounds=rr.warmup_rounds)
    return rr.ratio


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


#: throughput figures shown in the summary (generation's new tokens/s, ours and the compared path's)
THROUGHPUT = ("tokens_per_s", "tokens_per_s_before", "tokens_per_s_list_decoder", "samples_per_s")


def _spread_note(spread: dict | None) -> str:
    """`` (IQR 1.41-1.62x, 3 rounds)`` for a ratio stored by `record_ratio`, else nothing."""
    if not isinstance(spread, dict) or "q1" not in spread:
        return ""
    return f" (IQR {spread['q1']:.2f}-{spread['q3']:.2f}x, {spread.get('rounds', '?')} rounds)"


def summary_lines(records) -> list[str]:
    """One line per benchmark that has ratios, throughput or memory figures in ``extra_info``:
    ``name: speedup_vs_x 2.31x (IQR 2.2-2.4x, 5 rounds), memory_vs_x 0.55x | samples_per_s 221.9/s |
    peak_step_alloc_mb 2011 MiB`` (throughput: `THROUGHPUT`, e.g. generation's new tokens/s). `records` are
    ``(name, extra_info)`` pairs; non-numeric values are left out. Ratios are "how many times",
    memory is in MiB (keys ending ``_mb`` / ``_mib``) or bytes (``_bytes``)."""
    lines = []
    width = max((len(name) for name, _ in records), default=0)
    for name, extra in records:
        nums = {k: v for k, v in sorted(extra.items())
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        spread = extra.get("ratio_spread") or {}
        ratios = [f"{k} {v:.2f}x" + _spread_note(spread.get(k)) for k, v in nums.items() if _is_ratio(k)]
        rates = [f"{k} {v:,.1f}/s" for k, v in nums.items() if k in THROUGHPUT]
        memory = [f"{k} {v:,.0f} B" if k.endswith("_bytes") else f"{k} {v:,.1f} MiB"
                  for k, v in nums.items() if _is_memory(k) and not _is_ratio(k)]
        parts = " | ".join(", ".join(group) for group in (ratios, rates, memory) if group)
        if not parts:
            continue
        lines.append(f"{name:<{width}}  {parts}")
    return lines


def sam_sizes(config) -> dict:
    """The widths and depths of a SAM config that set a benchmark's cost (for `record_sizes`)."""
    v, q, t = config.vision_config, config.qformer_config, config.text_config
    return dict(vit_hidden=v.hidden_size, vit_layers=v.num_hidden_layers, image_size=v.image_size,
                patch_size=v.patch_size, qformer_hidden=q.hidden_size, qformer_layers=q.num_hidden_layers,
                query_tokens=config.num_query_tokens, llm_hidden=t.hidden_size, llm_layers=t.num_hidden_layers,
                llm_vocab=t.vocab_size)
