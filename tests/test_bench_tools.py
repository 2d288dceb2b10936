"""bench/report.py and bench/compare.py on synthetic pytest-benchmark JSON."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(speedups, breakdown=True):
    benches = []
    for n, s in speedups.items():
        extra = {"speedup_vs_released": s, "images_per_sample": n, "gbps": 10.0 * n, "copy_gbps": 50.0}
        if breakdown:
            extra["breakdown"] = {"vision": 0.01, "qwformer": 0.002, "llm": 0.03}
        benches.append({"name": f"bench_encode_images[{n}]", "fullname": f"bench/x.py::bench_encode_images[{n}]",
                        "stats": {"median": 0.0123 * n}, "extra_info": extra})
    return {"machine_info": {"device": "cpu-test", "torch": "2.13.0", "triton": "3.7.1", "commit": "abc"},
            "datetime": "2026-11-22T00:00:00", "benchmarks": benches}


def test_compare_fails_only_when_a_ratio_drops_more_than_tolerance(tmp_path):
    compare = _module("compare")
    base = _run({2: 1.5, 4: 2.0})
    ok = _run({2: 1.40, 4: 2.5})  # -6.7%, +25%
    bad = _run({2: 1.30, 4: 2.0})  # -13.3%
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "ok.json").write_text(json.dumps(ok))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert compare.main([str(tmp_path / "ok.json"), str(tmp_path / "base.json")]) == 0
    assert compare.main([str(tmp_path / "bad.json"), str(tmp_path / "base.json")]) == 1
    lines, failures = compare.compare(bad, base)
    assert len(failures) == 1 and "[2]" in failures[0] and "-13.3%" in failures[0]


def test_report_writes_table_plots_and_readme_block(tmp_path):
    pytest.importorskip("matplotlib")
    report = _module("report")
    src = tmp_path / "cpu-test-2026-11-22.json"
    src.write_text(json.dumps(_run({2: 1.5, 4: 2.0, 8: 2.6})))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Speed\n\n<!-- speed:start -->\nold\n<!-- speed:end -->\n\n## After\n")
    assert report.main([str(src), "--doc", str(readme)]) == 0
    table = (tmp_path / "cpu-test-2026-11-22.md").read_text()
    assert "device cpu-test" in table and "vs_released 2.60x" in table and "24.6 ms" in table
    text = readme.read_text()
    assert "old" not in text and "vs_released 1.50x" in text and text.endswith("## After\n")
    for suffix in ("speedup", "bandwidth", "train-breakdown"):
        png = tmp_path / f"cpu-test-2026-11-22-{suffix}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


# --- the pytest hook, the plots, and README only on request -------------------------------------

def _conftest(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # bench/conftest.py imports benchutil
    return _module("conftest")


class _Reporter:
    def __init__(self):
        self.lines = []

    def write_sep(self, sep, title="", **markup):
        self.lines.append(f"{sep * 3} {title}")

    def write_line(self, line, **markup):
        self.lines.append(line)


def test_terminal_summary_prints_ratios_and_memory_one_line_each(monkeypatch):
    import os

    conftest = _conftest(monkeypatch)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # a quiet machine: no load warning
    fake = [("bench_train_step[sam_fast-tiny]", {"speedup_vs_released": 2.643, "memory_vs_released": 0.554,
                                                 "peak_step_alloc_mb": 2011.4, "samples_per_s": 221.9,
                                                 "sizes": {"B": 4}, "dtype": "float32"}),
            ("bench_generate[pixels-tiny]", {"tokens_per_s": 664.4, "sizes": {"B": 2}}),
            ("bench_nothing", {"sizes": {"B": 2}, "dtype": "float32"}),  # nothing to show
            ("bench_context_reweight_leave_one_out", {"speedup_vs_naive_einsum": 5.67, "time_vs_output_copy": 2.5}),
            ("bench_linear_cross_entropy[32000-1.0]", {"peak_mib": 12.5, "full_peak_mib": 190.0})]

    class Bench:
        def __init__(self, name, extra):
            self.name, self.extra_info = name, extra

    config = type("Config", (), {"_benchmarksession": type("S", (), {"benchmarks": [Bench(*f) for f in fake]})()})()
    rep = _Reporter()
    conftest.pytest_terminal_summary(rep, 0, config)
    assert "ratios" in rep.lines[0] and "memory" in rep.lines[0]
    body = rep.lines[1:]
    assert len(body) == 4  # one line per benchmark with something to show
    train = next(line for line in body if line.startswith("bench_train_step[sam_fast-tiny]"))
    assert "speedup_vs_released 2.64x" in train and "memory_vs_released 0.55x" in train
    assert "peak_step_alloc_mb 2,011.4 MiB" in train and "samples_per_s 221.9/s" in train
    gen = next(line for line in body if line.startswith("bench_generate[pixels-tiny]"))
    assert "tokens_per_s 664.4/s" in gen
    cr = next(line for line in body if line.startswith("bench_context_reweight_leave_one_out"))
    assert "speedup_vs_naive_einsum 5.67x" in cr and "time_vs_output_copy 2.50x" in cr
    lce = next(line for line in body if line.startswith("bench_linear_cross_entropy"))
    assert "peak_mib 12.5 MiB" in lce and "full_peak_mib 190.0 MiB" in lce and "x" not in lce.split("  ", 1)[1]
    # a timing-free run (no session, or nothing timed) adds no section
    rep = _Reporter()
    conftest.pytest_terminal_summary(rep, 0, type("C", (), {})())
    assert rep.lines == []


def test_root_benchmark_only_call_collects_the_bench_suite():
    """`pytest --benchmark-only` at the root collects bench/ (testpaths) and deselects plain tests."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert any(i.startswith("bench/ops/bench_context_reweight.py::") for i in ids)
    assert any(i.startswith("bench/e2e/bench_train_step.py::") for i in ids)
    assert not any(i.startswith("tests/") for i in ids)
    assert "deselected" in out.stdout


def test_record_sizes_stores_shapes_and_dtype(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    benchutil = _module("benchutil")
    bench = type("B", (), {"extra_info": {}})()
    benchutil.record_sizes(bench, dtype=torch.bfloat16, features=torch.Size([32, 257, 1408]), B=4, counts=(2, 3))
    assert bench.extra_info == {"dtype": "bfloat16", "sizes": {"features": [32, 257, 1408], "B": 4, "counts": [2, 3]}}
    json.dumps(bench.extra_info)  # lands in the JSON report as is


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("name", ["speedup_figure", "e2e_ratio_figure", "bandwidth_figure", "breakdown_figure"])
def test_plots_have_title_units_legend_outside_and_error_bars(name):
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer

    report = _module("report")
    data = _run({2: 1.5, 4: 2.0, 8: 2.6})
    if name == "e2e_ratio_figure":
        data = _e2e_run()
    for b in data["benchmarks"]:  # rounds' spread, and a second timing scale (tiny vs 100x larger)
        b["stats"].update(q1=b["stats"]["median"] * 0.9, q3=b["stats"]["median"] * 1.2)
        if "speedup_vs_released" in b["extra_info"]:  # an older result's error-bar figure
            b["extra_info"]["median_of_round_ratios"] = b["extra_info"]["speedup_vs_released"] * 1.1
    data["benchmarks"][-1]["extra_info"]["breakdown"] = {"vision": 1.0, "qwformer": 0.2, "llm": 3.0}
    fig = getattr(report, name)(data)
    try:
        w, h = fig.get_size_inches()
        assert w >= 8 and h >= 3, (w, h)  # not a 0.9-inch strip
        assert fig._suptitle is not None and len(fig._suptitle.get_text()) > 20
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.get_xlabel()]
        assert axes
        for ax in axes:
            label = ax.get_xlabel() + " " + ax.get_ylabel()
            assert any(u in label for u in ("(x", "GB/s", "ms", "(N)")), label
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1
        box = legends[0].get_window_extent(renderer)
        for ax in fig.axes:  # outside every plotting area
            assert not _overlap(box, ax.get_window_extent(renderer)), name
        assert any(isinstance(c, ErrorbarContainer) or getattr(c, "errorbar", None) is not None
                   for ax in fig.axes for c in ax.containers), "no error bars"
        if name == "breakdown_figure":  # each size on its own scale: its bars fill most of its axis
            for ax in fig.axes:
                total = sum(p.get_width() for p in ax.patches)
                assert total >= 0.5 * ax.get_xlim()[1], (total, ax.get_xlim())
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_sam_fast_bench_leaves_the_speed_table_alone_unless_asked(monkeypatch, tmp_path, capsys):
    from sam_fast import cli

    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd, **kw: calls.append(cmd) or 0)
    readme = ROOT / "docs" / "performance.md"
    before = readme.read_bytes()
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--json", str(out)]) == 0
    assert len(calls) == 2 and calls[0][1].endswith("run.py") and f"--json={out}" in calls[0]
    assert "report.py" in calls[1][1]
    assert "--doc" not in calls[1]
    printed = capsys.readouterr().out
    assert str(tmp_path) in printed and "docs/performance.md untouched" in printed
    assert readme.read_bytes() == before
    for flag in ("--update-docs", "--update-readme"):  # the former name still works
        calls.clear()
        assert cli.main(["bench", "--json", str(out), flag]) == 0
        assert calls[1][calls[1].index("--doc") + 1] == str(readme)


def test_make_bench_compare_takes_the_newest_bench_run(tmp_path):
    """`make bench-compare` compares the newest `make bench` result, never a gpu_check JSON (it
    took the alphabetically last file, which was the H200 gpu_check run)."""
    import os
    import shutil
    import subprocess
    import time

    if shutil.which("make") is None:
        pytest.skip("no make")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    for i, name in enumerate(["cpu-a-2026-11-22.json", "cpu-a-2026-11-30.json", "gpu_check-H200-2026-12-01.json"]):
        (results / name).write_text("{}")
        t = time.time() - 100 + 10 * i
        os.utime(results / name, (t, t))
    out = subprocess.run(["make", "-n", "bench-compare"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "bench/results/cpu-a-2026-11-30.json bench/baseline.json" in out.stdout, out.stdout


# --- alternating rounds: warm-up, A/B order, median of per-round ratios with its IQR -----------

class _Clock:
    """A fake perf_counter the sides advance by the seconds they are given, in call order."""

    def __init__(self, **times):
        self.now, self.times, self.log = 0.0, {k: list(v) for k, v in times.items()}, []

    def side(self, name):
        def call():
            self.log.append(name)
            self.now += self.times[name].pop(0)
            return [name]  # sides return their output (a generate's ids, a loss)
        return call


class _FakeBenchmark:
    """pytest-benchmark's pedantic as far as alternating_rounds uses it: setup before every
    warm-up and timed round, the timed rounds' seconds in stats.stats.data."""

    def __init__(self, clock):
        self.clock, self.extra_info = clock, {}
        self.stats = type("S", (), {"stats": type("T", (), {"data": []})()})()

    def pedantic(self, target, setup, rounds, warmup_rounds, iterations):
        for n in range(warmup_rounds + rounds):
            if setup() is not None:  # pytest-benchmark takes it as (args, kwargs) for the target
                raise RuntimeError("setup returned a value: pytest-benchmark would pass it to the target")
            t0 = self.clock.now
            target()
            if n >= warmup_rounds:
                self.stats.stats.data.append(self.clock.now - t0)


def _benchutil(monkeypatch, clock):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    mod = _module("benchutil")
    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock.now)
    return mod


def test_alternating_rounds_warm_up_alternate_and_take_the_median_round_ratio(monkeypatch):
    # a slow first call on each side (warm-up, dropped), then rounds whose fastest-round ratio
    # (3 / 1 = 3x) differs from the median of the per-round ratios (3, 1.5, 1 -> 1.5x)
    clock = _Clock(fast=[50.0, 1.0, 2.0, 4.0], other=[90.0, 3.0, 3.0, 4.0])
    benchutil = _benchutil(monkeypatch, clock)
    bench = _FakeBenchmark(clock)
    rr = benchutil.alternating_rounds(bench, clock.side("fast"), clock.side("other"), rounds=3, warmup_rounds=1)
    assert clock.log == ["other", "fast"] * 4
    assert rr.fast_s == [1.0, 2.0, 4.0] and rr.other_s == [3.0, 3.0, 4.0]
    assert rr.ratio == 1.5 and rr.iqr == (1.25, 2.25)
    assert benchutil.record_ratio(bench, "speedup_vs_x", rr) == 1.5
    assert bench.extra_info == {"speedup_vs_x": 1.5, "ratio_spread": {"speedup_vs_x": {
        "q1": 1.25, "q3": 2.25, "rounds": 3, "warmup_rounds": 1}}}
    line = benchutil.summary_lines([("bench_x", bench.extra_info)])[0]
    assert "speedup_vs_x 1.50x (IQR 1.25-2.25x, 3 rounds)" in line
    with pytest.raises(ValueError, match="warmup_rounds >= 1"):
        benchutil.alternating_rounds(bench, clock.side("fast"), clock.side("other"), rounds=3, warmup_rounds=0)


def test_alternate_without_benchmark_has_the_same_semantics(monkeypatch):
    clock = _Clock(fast=[9.0, 9.0, 2.0, 1.0], other=[9.0, 9.0, 4.0, 4.0])
    benchutil = _benchutil(monkeypatch, clock)
    rr = benchutil.alternate(clock.side("fast"), clock.side("other"), rounds=2, warmup_rounds=2)
    assert clock.log == ["other", "fast"] * 4
    assert rr.ratios == [2.0, 4.0] and rr.ratio == 3.0 and rr.fast_median_s == 1.5 and rr.other_median_s == 4.0


def test_back_to_back_reports_device_and_host_time_per_call(monkeypatch):
    """Calls issued back to back, one sync per round: the host time per call stops when the last
    call returns, the device time when the sync does (here the device finishes 5 s later)."""
    clock = _Clock(call=[1.0] * 14)
    benchutil = _benchutil(monkeypatch, clock)
    syncs = []

    def sync():
        syncs.append(clock.now)
        clock.now += 5.0

    monkeypatch.setattr(benchutil, "sync", sync)
    got = benchutil.back_to_back(clock.side("call"), calls=4, rounds=3, warmup=2)
    assert clock.log == ["call"] * 14 and len(syncs) == 4  # warm-up, then one per round
    assert got.host_s == 1.0 and got.device_s == (4 * 1.0 + 5.0) / 4


def test_every_ratio_benchmark_uses_the_alternating_helper():
    """No benchmark measures the other side of a ratio with separate `timed` calls any more."""
    for path in sorted((ROOT / "bench").glob("*/bench_*.py")):
        text = path.read_text()
        if "speedup_" in text:
            assert "alternating_rounds(" in text, path.name
            assert "record_ratio" in text, path.name


# --- the machine's load: recorded in the JSON, warned about when other jobs held the cores -------

@pytest.mark.parametrize("start, end, cores, threads, busy", [
    ([0.3, 0.2, 0.1], [2.4, 1.0, 0.5], 2, 2, False),  # quiet 2-core machine, our 2 threads at the end
    ([5.0, 3.0, 1.0], [2.4, 1.0, 0.5], 2, 2, True),  # load 5 before anything ran
    ([0.3, 0.2, 0.1], [5.0, 3.0, 1.0], 2, 2, True),  # others joined while we ran
    ([3.0, 0.0, 0.0], [4.0, 0.0, 0.0], 4, 1, False),  # 3 cores free for others, 1 for us
    ([4.0, 0.0, 0.0], None, 4, 1, True),
    (None, None, 2, 2, False),  # no load average on this OS: no verdict
])
def test_busy_warning_compares_other_jobs_load_with_the_free_cores(monkeypatch, start, end, cores, threads, busy):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    warning = _module("benchutil").busy_warning(start, end, cores, threads)
    assert (warning is not None) == busy, warning
    if busy:
        assert warning.startswith("busy machine") and f"{cores} cores" in warning and "\n" not in warning


def _load_config(monkeypatch, conftest, loads, cores=2, threads=2):
    """A config as the hooks see it, after `pytest_sessionstart` under a faked load average."""
    import os
    import types

    seq = iter(loads)
    monkeypatch.setattr(os, "getloadavg", lambda: next(seq))
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    bench = types.SimpleNamespace(name="bench_x", extra_info={"speedup_vs_x": 2.0})
    config = types.SimpleNamespace(rootpath=ROOT, _benchmarksession=types.SimpleNamespace(benchmarks=[bench],
                                                                                         disabled=False))
    conftest.pytest_sessionstart(types.SimpleNamespace(config=config))
    config._sam_fast_threads = threads
    return config


def test_busy_machine_is_recorded_in_machine_info_and_warned_in_the_summary(monkeypatch):
    conftest = _conftest(monkeypatch)
    config = _load_config(monkeypatch, conftest, [(5.0, 3.0, 1.0), (5.25, 4.0, 2.0)])
    info = {}
    conftest.pytest_benchmark_update_machine_info(config, info)
    assert info["load_avg_start"] == [5.0, 3.0, 1.0] and info["load_avg_end"] == [5.25, 4.0, 2.0]
    assert info["cpu_count"] == 2 and info["torch_threads"] == 2
    assert "5.00 at start" in info["busy_warning"] and "5.25 at end" in info["busy_warning"]
    json.dumps(info)
    rep = _Reporter()
    conftest.pytest_terminal_summary(rep, 0, config)  # the end load is read once: the JSON's
    assert rep.lines[-1] == info["busy_warning"] and "WARNING" in rep.lines[-2]


def test_quiet_machine_gets_no_warning(monkeypatch):
    conftest = _conftest(monkeypatch)
    config = _load_config(monkeypatch, conftest, [(0.2, 0.1, 0.1), (2.1, 1.0, 0.4)])
    info = {}
    conftest.pytest_benchmark_update_machine_info(config, info)
    assert info["busy_warning"] is None and info["load_avg_end"] == [2.1, 1.0, 0.4]
    rep = _Reporter()
    conftest.pytest_terminal_summary(rep, 0, config)
    assert not any("busy" in line or "WARNING" in line for line in rep.lines)


# --- make bench: one pytest process per benchmark file, parts merged into one JSON ----------------

def _part(device, names, start, end, warning=None):
    return {"machine_info": {"device": device, "commit": "abc", "load_avg_start": start, "load_avg_end": end,
                             "busy_warning": warning},
            "commit_info": {"id": "abc"}, "datetime": "2026-12-01T10:00:00", "version": "5.1.0",
            "benchmarks": [{"name": n, "fullname": f"bench/ops/x.py::{n}", "stats": {"median": 0.01},
                            "extra_info": {"speedup_vs_x": 2.0}} for n in names]}


def test_run_merges_part_jsons_in_order_with_the_load_span(monkeypatch, tmp_path):
    run = _module("run")
    parts = []
    for i, (names, warning) in enumerate([(["a", "b"], None), (["c"], "busy machine: load 5.00")]):
        p = tmp_path / f"{i:02d}-bench_{i}.json"
        p.write_text(json.dumps(_part("cpu-t", names, [0.1 + i, 0, 0], [1.1 + i, 0, 0], warning)))
        parts.append(p)
    out = tmp_path / "cpu-t-2026-12-01.json"
    assert run.main(["--json", str(out), "--merge", *map(str, parts)]) == 0
    merged = json.loads(out.read_text())
    assert [b["name"] for b in merged["benchmarks"]] == ["a", "b", "c"]
    mi = merged["machine_info"]
    assert mi["device"] == "cpu-t" and mi["load_avg_start"] == [0.1, 0, 0] and mi["load_avg_end"] == [2.1, 0, 0]
    assert mi["busy_warning"] == "01-bench_1: busy machine: load 5.00"
    assert [p["file"] for p in mi["parts"]] == ["00-bench_0", "01-bench_1"]
    assert merged["datetime"] == "2026-12-01T10:00:00" and merged["commit_info"] == {"id": "abc"}
    compare = _module("compare")  # compare.py and report.py read the merged file as one run
    assert len(compare.ratios(merged)) == 3
    assert not list(tmp_path.glob("*.partial"))


def test_run_refuses_parts_of_two_devices_or_a_benchmark_twice(tmp_path, capsys):
    run = _module("run")
    with pytest.raises(run.MergeError, match="device 'cuda-x' differs"):
        run.merge([("p0", _part("cpu-t", ["a"], None, None)), ("p1", _part("cuda-x", ["b"], None, None))])
    with pytest.raises(run.MergeError, match="p1: benchmark 'bench/ops/x.py::a' is also in p0"):
        run.merge([("p0", _part("cpu-t", ["a"], None, None)), ("p1", _part("cpu-t", ["a"], None, None))])
    for i in range(2):
        (tmp_path / f"p{i}.json").write_text(json.dumps(_part("cpu-t", ["a"], None, None)))
    out = tmp_path / "out.json"
    assert run.main(["--json", str(out), "--merge", str(tmp_path / "p0.json"), str(tmp_path / "p1.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert "is also in p0" in err and "\n" not in err and not out.exists()


def test_run_starts_one_pytest_per_benchmark_file(monkeypatch, tmp_path, capsys):
    run = _module("run")
    files = run.bench_files()
    rel = [str(f.relative_to(ROOT)) for f in files]
    assert rel.index("bench/ops/bench_llama.py") < rel.index("bench/models/bench_encode_images.py") < \
        rel.index("bench/e2e/bench_train_step.py")
    calls = []

    def fake_call(cmd, cwd):  # each file's pytest writes its own part; one file has nothing to time
        calls.append(cmd)
        target = next(a for a in cmd if a.endswith(".py") and "bench_" in a)
        if "cross_attention" in target:
            return 0
        part = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        Path(part).write_text(json.dumps(_part("cpu-t", [Path(target).stem], [0.2, 0, 0], [0.3, 0, 0])))
        return 0

    monkeypatch.setattr(run.subprocess, "call", fake_call)
    out = tmp_path / "r.json"
    assert run.run(out, k="tiny") == 0
    assert len(calls) == len(files) and all("--benchmark-only" in c and c[-2:] == ["-k", "tiny"] for c in calls)
    assert [c[4] for c in calls] == [str(f) for f in files]  # one file per process, in order
    merged = json.loads(out.read_text())
    assert len(merged["benchmarks"]) == len(files) - 1
    assert "results: " + str(out) in capsys.readouterr().out
    assert "bench/run.py --json bench/results/$$name.json" in (ROOT / "Makefile").read_text()


# --- generation and the training step in the summary and the plots --------------------------------

def _e2e_run():
    """A run with the scaled train step and realistic generation, as the benchmarks store them."""
    spread = lambda key, q1, q3: {"ratio_spread": {key: {"q1": q1, "q3": q3, "rounds": 3, "warmup_rounds": 1}}}  # noqa: E731
    benches = [
        {"name": "bench_train_step[sam_fast-scaled]", "fullname": "bench/e2e/bench_train_step.py::x[sam_fast-scaled]",
         "stats": {"median": 12.0, "q1": 11.5, "q3": 12.8},
         "extra_info": {"speedup_vs_released": 1.52, "samples_per_s": 0.66, **spread("speedup_vs_released", 1.45, 1.6)}},
        {"name": "bench_train_step[cached-scaled]", "fullname": "bench/e2e/bench_train_step.py::x[cached-scaled]",
         "stats": {"median": 9.0}, "extra_info": {"speedup_vs_released": 1.88,
                                                  **spread("speedup_vs_released", 1.8, 1.95)}},
        {"name": "bench_generate_realistic[hf]", "fullname": "bench/e2e/bench_generate.py::bench_generate_realistic[hf]",
         "stats": {"median": 4.0}, "extra_info": {"speedup_vs_before": 1.57, "tokens_per_s": 48.0,
                                                  "tokens_per_s_before": 30.6, **spread("speedup_vs_before", 1.5, 1.61)}},
    ]
    data = _run({2: 1.5, 4: 2.0})
    data["benchmarks"] += benches
    return data


def test_report_plots_train_step_and_generation_ratios(tmp_path):
    pytest.importorskip("matplotlib")
    report = _module("report")
    src = tmp_path / "cpu-test-2026-12-01.json"
    src.write_text(json.dumps(_e2e_run()))
    assert report.main([str(src)]) == 0
    png = tmp_path / "cpu-test-2026-12-01-e2e-ratios.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    labels = [label for label, *_ in report._e2e_bars(_e2e_run())]
    assert labels == ["bench_train_step[sam_fast-scaled]: vs_released", "bench_train_step[cached-scaled]: vs_released",
                      "bench_generate_realistic[hf]: vs_before"]
    bars = {label: rest for label, *rest in report._e2e_bars(_e2e_run())}
    value, below, above, note = bars["bench_generate_realistic[hf]: vs_before"]
    assert value == 1.57 and below == pytest.approx(0.07) and above == pytest.approx(0.04)
    assert note == "48 new tok/s vs 30.6 before"
    table = (tmp_path / "cpu-test-2026-12-01.md").read_text()
    assert "vs_before 1.57x" in table and "tokens_per_s 48" in table
