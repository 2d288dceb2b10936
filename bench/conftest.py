"""Shared benchmark plumbing (pytest-benchmark).

Benchmarks live in ``bench/**/bench_*.py`` and are named like what they measure. Ratios between
implementations are measured side by side in one run and stored in ``benchmark.extra_info`` so
that the JSON report carries them; never assert on absolute times. ``--benchmark-disable`` turns
every benchmark into a single-call smoke test (that is how CI runs them).

On a GPU, `timed` synchronises CUDA around every call so that the same suite times real work.

How the suite is run (pyproject.toml lists ``tests`` and ``bench`` as test paths):

- ``pytest --benchmark-only`` (repository root) or ``pytest bench --benchmark-only``: the timed
  suite; the tests that take no ``benchmark`` fixture are deselected, and the terminal summary
  ends with every benchmark's ratios and memory figures, one line each;
- ``pytest -q tests bench --benchmark-disable`` (``make test``): every benchmark once, untimed;
- plain ``pytest`` at the root (no paths, no benchmark option): the same smoke run, so that it
  never starts minutes of timing by accident.

Every benchmark records its problem (shapes, dtype) with `benchutil.record_sizes`; one that
runs without doing so fails.
"""

from __future__ import annotations

import pytest
import torch
import os

from benchutil import busy_warning, device_name, load_average, summary_lines


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
    machine_info.update(session_load(config))


def session_load(config) -> dict:
    """The run's load figures: load averages at the session's start and end (taken once, at the
    first call after the benchmarks ran: the JSON is written before the terminal summary), the CPU
    thread counts and `busy_warning`'s verdict, so that the JSON and the summary say the same."""
    if getattr(config, "_sam_fast_load", None) is None:
        start = getattr(config, "_sam_fast_load_start", None)
        threads, cores = getattr(config, "_sam_fast_threads", torch.get_num_threads()), os.cpu_count()
        end = load_average()
        config._sam_fast_load = dict(load_avg_start=start, load_avg_end=end, cpu_count=cores, torch_threads=threads,
                                     busy_warning=busy_warning(start, end, cores, threads))
    return config._sam_fast_load


def pytest_sessionstart(session):
    """The load before any benchmark runs (see `session_load`)."""
    session.config._sam_fast_load_start = load_average()
    session.config._sam_fast_threads = torch.get_num_threads()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Plain ``pytest`` at the root (test paths from pyproject.toml, no benchmark option) runs the
    benchmarks as smoke tests: timing is asked for with ``--benchmark-only`` / ``--benchmark-enable``
    or by naming ``bench`` on the command line."""
    asked = any(config.getoption(o, False) for o in ("benchmark_only", "benchmark_enable", "benchmark_skip"))
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS and not asked:
        config.option.benchmark_disable = True


# Order of a timed run in one process (`make bench` runs one process per file: bench/run.py): the
# op benchmarks first, then models, then whole steps. The ops' ratios
# depend on the process's memory state: measured after the end-to-end benchmarks had allocated and
# freed gigabytes, the context_reweight ratios were less than half those of the same file run alone
# (likely cause: fresh tens-of-MB outputs no longer backed by transparent huge pages).
BENCH_ORDER = ("bench/ops/", "bench/models/", "bench/e2e/")


def _bench_rank(item) -> int:
    path = str(item.path.as_posix())
    return next((n for n, part in enumerate(BENCH_ORDER) if part in path), len(BENCH_ORDER))


def pytest_collection_modifyitems(config, items):
    """Under ``--benchmark-only`` deselect (rather than skip one by one) the tests that take no
    ``benchmark`` fixture, so that the root call reports the suite and not hundreds of skips, and
    run the benchmarks in `BENCH_ORDER` (a stable sort: file order kept within each group)."""
    if not config.getoption("benchmark_only", False):
        return
    keep = [i for i in items if "benchmark" in getattr(i, "fixturenames", ())]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = sorted(keep, key=_bench_rank)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After pytest-benchmark's table: each timed benchmark's ``speedup_*`` / ``*_vs_*`` ratios,
    throughput (generation's tokens/s, training samples/s) and memory figures from its
    ``extra_info``, one line per benchmark; then the busy-machine warning, if any."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    lines = summary_lines([(b.name, b.extra_info) for b in session.benchmarks])
    if lines:
        terminalreporter.write_sep(
            "-", "ratios (x: times faster / larger, measured side by side), throughput and memory")
        for line in lines:
            terminalreporter.write_line(line)
    if not getattr(session, "disabled", False):
        warning = session_load(config)["busy_warning"]
        if warning:
            terminalreporter.write_sep("!", "WARNING", yellow=True, bold=True)
            terminalreporter.write_line(warning, yellow=True, bold=True)


@pytest.fixture(autouse=True)
def _stamp(benchmark):
    benchmark.extra_info.update(
        device=device_name(), torch=torch.__version__, threads=torch.get_num_threads()
    )
    yield
    if getattr(benchmark, "_mode", None) and not benchmark.has_error and "sizes" not in benchmark.extra_info:
        pytest.fail(f"{benchmark.name}: no problem size in extra_info; call benchutil.record_sizes(benchmark, ...)",
                    pytrace=False)
