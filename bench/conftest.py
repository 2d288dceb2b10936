"""Shared benchmark plumbing (pytest-benchmark).

Benchmarks live in ``bench/**/bench_*.py`` and are named like what they measure. Ratios between
implementations are measured side by side in one run and stored in ``benchmark.extra_info`` so
that the JSON report carries them; never assert on absolute times. ``--benchmark-disable`` turns
every benchmark into a single-call smoke test (that is how CI runs them).

On a GPU, `timed` synchronises CUDA around every call so that the same suite times real work.
"""

from __future__ import annotations

import platform
import statistics
import time

import pytest
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


def pytest_benchmark_update_machine_info(config, machine_info):
    """Stamp the JSON report with what the figures depend on."""
    import importlib.metadata as md
    import subprocess

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=config.rootpath, timeout=10).stdout.strip()
    except Exception:  # no git: the report still works
        commit = "unknown"
    machine_info.update(
        device=device_name(), torch=torch.__version__, triton=version("triton"),
        transformers=version("transformers"), sam_fast=version("sam-fast"), commit=commit,
        cuda=torch.version.cuda or "none", threads=torch.get_num_threads(),
    )


@pytest.fixture(autouse=True)
def _stamp(benchmark):
    benchmark.extra_info.update(
        device=device_name(), torch=torch.__version__, threads=torch.get_num_threads()
    )
    yield


def benchmarks_disabled(benchmark) -> bool:
    return getattr(benchmark, "disabled", False)
