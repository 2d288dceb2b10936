"""Shared benchmark plumbing (pytest-benchmark).

Benchmarks live in ``bench/**/bench_*.py`` and are named like what they measure. Ratios between
implementations are measured side by side in one run and stored in ``benchmark.extra_info`` so
that the JSON report carries them; never assert on absolute times. ``--benchmark-disable`` turns
every benchmark into a single-call smoke test (that is how CI runs them).

On a GPU, `timed` synchronises CUDA around every call so that the same suite times real work.
"""

from __future__ import annotations

import pytest
import torch
from benchutil import device_name


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
