"""bench/gpu_check.py in its CPU mode (--dry-run): every item runs at toy sizes, the report is
rewritten after each item, a failing check, a hung or crashed item, a hung pytest and the global
deadline each end up named in the report with a non-zero exit status, and nothing is left running."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ("build", "benchmarks", "model_checks", "tests")
FINISHED = ("ok", "failed", "timeout", "skipped")
# the order by value: build, the 7B step, generation, op benchmarks, model checks, pytest
ORDER = ["build.pip", "build.ext_info", "bench.train_step", "bench.generate", "bench.train_step_compiled",
         "bench.cross_attention_decision",
         "bench.liger", "bench.reweight", "bench.streams", "bench.encode", "check.reweight.cpu.float32", "check.reweight.cpu.bfloat16", "check.reweight.cpu.float16",
         "check.encode.leave_one_out.float32", "check.encode.leave_one_out.bfloat16",
         "check.encode.leave_one_out.float16", "check.encode.shared.float32", "check.encode.shared.bfloat16",
         "check.encode.shared.float16", "check.packed.leave_one_out", "check.packed.shared", "check.compile",
         "tests.pytest"]


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (it imports only the standard library at the top)."""
    spec = importlib.util.spec_from_file_location("_gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (
        "SAM_FAST_GPU_CHECK_INJECT_FAILURE", "SAM_FAST_GPU_CHECK_INJECT", "SAM_FAST_GPU_CHECK_OUT", "OUT",
        "SAM_FAST_PEAK_TFLOPS")}
    env.update(extra)
    return env


def _cmd(*extra) -> list[str]:
    return [sys.executable, str(SCRIPT), "--dry-run", *extra]


def _run(*extra, env=None, timeout=300):
    return subprocess.run(_cmd(*extra), cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _report(folder: Path) -> tuple[Path, dict]:
    reports = sorted(folder.glob("gpu_check-*.json"))
    assert len(reports) == 1, sorted(p.name for p in folder.iterdir()) if folder.exists() else f"no {folder}"
    return reports[0], json.loads(reports[0].read_text())


def _items(report: dict) -> dict:
    return {e["id"]: e for e in report["items"]}


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by init counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_for(path_glob, folder: Path, pred, timeout=120.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in folder.glob(path_glob):
            report = json.loads(p.read_text())
            if pred(_items(report)):
                return report
        time.sleep(0.05)
    raise AssertionError(f"the report never reached the awaited state in {timeout} s")


def test_dry_run_runs_every_item_in_order_and_rewrites_the_report_after_each(tmp_path):
    p = subprocess.Popen(_cmd("--out", str(tmp_path)), cwd=ROOT, env=_env(SAM_FAST_PEAK_TFLOPS="0.5"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshots = []
    while p.poll() is None:  # every read is a whole report (atomic replace), never half of one
        for path in tmp_path.glob("gpu_check-*.json"):
            snap = json.loads(path.read_text())
            if not snapshots or snap != snapshots[-1]:
                snapshots.append(snap)
        time.sleep(0.05)
    out, err = p.communicate()
    assert p.returncode == 0, out[-3000:] + err[-2000:]
    path, report = _report(tmp_path)
    assert [e["id"] for e in report["items"]] == ORDER
    # written while running: items finished one by one, a finished one never changes again
    running = [s for s in snapshots if s["status"] == "running"]
    assert len(running) >= 10 and any(e["status"] == "running" for s in running for e in s["items"])
    done_counts = [sum(e["status"] in FINISHED for e in s["items"]) for s in snapshots]
    assert done_counts == sorted(done_counts) and len(set(done_counts)) >= 10
    final = _items(report)
    for snap in snapshots:
        for e in snap["items"]:
            if e["status"] in FINISHED:
                assert final[e["id"]]["status"] == e["status"], (e["id"], e["status"])
    started = [final[i]["started_s"] for i in ORDER if "started_s" in final[i]]
    assert started == sorted(started) and len(started) == len(ORDER) - 2  # build.pip, check.compile: skipped

    assert report["status"] == "passed" and report["passed"] is True and report["exit_code"] == 0
    assert report["failures"] == [] and set(report["sections"]) == set(SECTIONS)
    for key in ("device", "torch", "triton", "transformers", "commit", "date"):
        assert report["env"].get(key), key
    for e in report["items"]:
        assert e["status"] in ("ok", "skipped"), e
        assert "seconds" in e or e["status"] == "skipped"
    collect = final["tests.pytest"]["result"]
    assert final["tests.pytest"]["status"] == "ok" and collect["collected"] > 10 and collect["rc"] == 0
    assert (tmp_path / collect["log"]).name in report["logs"] and (tmp_path / Path(collect["log"]).name).exists()
    for mode in ("leave_one_out", "shared"):
        for dt in ("float32", "bfloat16", "float16"):
            assert final[f"check.encode.{mode}.{dt}"]["status"] == "ok"
        assert final[f"check.packed.{mode}"]["status"] == "ok"
    assert final["check.compile"]["status"] == "skipped"
    step = final["bench.train_step"]["result"]
    assert step["speedup_vs_released"] > 0 and step["cached_speedup_vs_released"] > 0
    assert step["peak_tflops"] == 0.5 and step["model_tflop"]["pixels"] > step["model_tflop"]["cached"] > 0
    for name, work in (("sam_fast", "pixels"), ("cached", "cached"), ("released", "pixels")):
        rate = step["model_tflop"][work] / (step[name]["step_ms"] / 1e3)
        assert step[name]["tflops_per_s"] == pytest.approx(rate, rel=3e-3)
        assert step[name]["mfu"] == pytest.approx(step[name]["tflops_per_s"] / 0.5, rel=3e-3)
    # "auto" on the tiny config: kept; the profile of the sam_fast step (CPU ops in a dry run)
    assert step["recompute_qformer"]["recompute"] is False and step["recompute_qformer"]["why"].startswith("auto: ")
    prof = step["profile"]
    assert prof["what"] == "cpu ops (self time)" and prof["steps"] == 3 and 0 < len(prof["top"]) <= 16
    assert sum(r["pct"] for r in prof["top"]) == pytest.approx(100, abs=0.2)
    whole = final["bench.train_step_compiled"]["result"]  # the eager backend in a dry run
    assert whole["default"]["step_ms"] > 0 and whole["default"]["compile_s"] >= 0
    assert whole["default"]["mfu"] == pytest.approx(step["model_tflop"]["pixels"] / (whole["default"]["step_ms"] / 1e3)
                                                    / 0.5, rel=3e-3)
    assert whole["reduce-overhead"].startswith("skipped: dry run")
    gen = final["bench.generate"]["result"]
    assert gen["generate_hf"]["new_tokens"] > 0 and gen["generate_lavis"]["new_tokens"] > 0
    assert gen["generate_hf_static"]["same_ids_as_hf"] is True
    text = path.with_suffix(".md").read_text()
    assert "PASS" in text and all(e["name"] in text for e in report["items"])
    _assert_decision_items(final, text)
    assert "profile of 3 steps (cpu ops (self time))" in text and "| kernel | calls | total ms |" in text
    # stdout: one line per item and the verdict, a few KB
    lines = out.splitlines()
    assert len(out) < 6000 and sum(line.startswith("[") for line in lines) == len(ORDER)
    assert "PASS" in lines[-1]


def _assert_decision_items(final: dict, markdown: str) -> None:
    """The two decision items of a dry run: the cross-attention one timed both variants in both
    modes at tiny shapes (the fused kernel cannot run on a CPU: no verdict) and its table is in the
    markdown report, Liger's skipped when liger_kernel cannot be imported."""
    assert "fwd+bwd of every cross layer for one batch, ms" in markdown and "| mode/dtype | fused_mix ms |" in markdown
    xattn = final["bench.cross_attention_decision"]
    assert xattn["status"] == "ok", xattn
    res = xattn["result"]
    assert set(res["rows"]) == {"leave_one_out/bfloat16", "shared/bfloat16"}
    assert res["shape"] == {"T": 6, "Q": 8, "H": 4, "d": 8, "P": 5, "n_cross": 2}  # SAMConfig.tiny(), counts 2, 3, 1
    for key, w_rows, slots in (("leave_one_out/bfloat16", 5, 2), ("shared/bfloat16", 3, 3)):
        row = res["rows"][key]
        assert row["fused_backend"] == "reference" and row["decides"] is False
        assert (row["w_rows"], row["mix_slots"]) == (w_rows, slots)
        assert row["fused_mix_ms"] > 0 and row["materialised_sdpa_ms"] > 0 and row["by"] >= 1
        assert row["faster"] in ("fused_mix", "materialised_sdpa") and row["max_rel_diff"] < 2**-6
        assert "fused_mix_graph_ms" not in row  # no CUDA graphs on a CPU
    assert res["verdict"] == {"decided": False, "one_algorithm": None,
                              "summary": "not decided: the fused kernel did not run (streams backend reference)"}
    assert [r[0] for r in res["table"]["rows"]] == ["leave_one_out/bfloat16", "shared/bfloat16"]
    liger = final["bench.liger"]
    if importlib.util.find_spec("liger_kernel") is None:
        assert liger["status"] == "skipped" and liger["reason"].startswith("liger_kernel not importable ("), liger


def test_a_failed_correctness_check_fails_the_run(tmp_path):
    p = _run("--out", str(tmp_path), "--inject-failure", "--sections", "model_checks",
             "--items", "check.reweight.cpu.float32,check.encode.shared.float32")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    _, report = _report(tmp_path)
    items = _items(report)
    assert report["status"] == "failed" and report["passed"] is False
    assert report["sections"]["model_checks"] == "failed"
    assert report["failures"] == ["check.reweight.cpu.float32 (failed)", "check.encode.shared.float32 (failed)"]
    assert "outside the error budget: err " in items["check.encode.shared.float32"]["error"]
    assert "outside the error budget: out: err " in items["check.reweight.cpu.float32"]["error"]
    assert "FAIL" in p.stdout
    # what was not selected is reported as skipped, not silently absent
    assert report["sections"]["benchmarks"] == "skipped"
    assert items["bench.train_step"]["reason"] == "not selected (--sections)"


def test_inject_failure_is_also_read_from_the_environment(gpu_check):
    assert gpu_check.inject_failure(False, {"SAM_FAST_GPU_CHECK_INJECT_FAILURE": "1"}) is True
    assert gpu_check.inject_failure(False, {"SAM_FAST_GPU_CHECK_INJECT_FAILURE": "0"}) is False
    assert gpu_check.inject_failure(True, {}) is True


@pytest.mark.parametrize("args, named", [
    (["--sections", "bogus"], "bogus"),
    (["--items", "bench.nothing*"], "bench.nothing*"),
    (["--timeouts", "bench.encode=soon"], "bench.encode=soon"),
    (["--timeouts", "bench.nope=5"], "bench.nope"),
    (["--deadline", "0"], "--deadline"),
])
def test_bad_options_are_refused_by_name(tmp_path, args, named):
    p = _run("--out", str(tmp_path), *args, timeout=60)
    assert p.returncode == 2 and named in p.stderr, p.stderr[-1000:]
    assert not list(tmp_path.glob("gpu_check-*"))


def test_a_hung_item_is_cut_by_its_timeout_and_a_crash_costs_only_its_item(tmp_path):
    """hang in one worker item, a segfault in the next: each is recorded, a fresh worker runs the
    item after them; the report goes to $SAM_FAST_GPU_CHECK_OUT, not $OUT."""
    primary, other = tmp_path / "primary", tmp_path / "other"
    env = _env(SAM_FAST_GPU_CHECK_INJECT="hang:bench.reweight,crash:bench.streams",
               SAM_FAST_GPU_CHECK_OUT=str(primary), OUT=str(other))
    t0 = time.monotonic()
    p = _run("--items", "bench.reweight,bench.streams,bench.encode", "--timeouts", "bench.reweight=1.5", env=env)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert not other.exists()
    _, report = _report(primary)
    items = _items(report)
    hung = items["bench.reweight"]
    assert hung["status"] == "timeout" and hung["cut_by"] == "item timeout" and 1.5 <= hung["seconds"] < 15
    assert hung["error"].startswith("timeout (item timeout): ran past 1.5 s")
    assert items["bench.streams"]["status"] == "failed" and "SIGSEGV" in items["bench.streams"]["error"]
    assert items["bench.encode"]["status"] == "ok" and items["bench.encode"]["result"]["leave_one_out_N2"]
    assert report["status"] == "failed" and report["failures"] == ["bench.reweight (timeout)", "bench.streams (failed)"]
    assert "bench.reweight" in p.stdout and "timeout" in p.stdout


@pytest.mark.parametrize("item, deadline", [("build.ext_info", 6.5), ("bench.reweight", 3.0)])
def test_the_deadline_ends_the_run_naming_the_running_item(tmp_path, item, deadline):
    """A hang in the main process (build.ext_info) or in a worker (bench.reweight): at --deadline
    the report names it, the rest is skipped, exit 3; the report goes to $OUT."""
    env = _env(SAM_FAST_GPU_CHECK_INJECT=f"hang:{item}", OUT=str(tmp_path))
    t0 = time.monotonic()
    p = _run("--items", f"{item},tests.pytest", "--deadline", str(deadline), env=env, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert deadline <= took < deadline + 8
    _, report = _report(tmp_path)
    e = _items(report)[item]
    assert e["status"] == "timeout" and e["cut_by"] == "deadline" and e["error"].startswith("timeout (deadline)")
    assert _items(report)["tests.pytest"] == {**_items(report)["tests.pytest"], "status": "skipped",
                                              "reason": "not reached: deadline"}
    assert report["status"] == "deadline" and report["exit_code"] == 3 and report["passed"] is False
    assert f"timeout {item}" in " ".join(p.stdout.split())


def test_a_pytest_run_cut_by_its_timeout_is_a_failure(tmp_path):
    env = _env(SAM_FAST_GPU_CHECK_INJECT="hang:tests.pytest")
    p = _run("--out", str(tmp_path), "--items", "tests.pytest", "--timeouts", "tests.pytest=3", env=env, timeout=120)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    _, report = _report(tmp_path)
    e = _items(report)["tests.pytest"]
    assert e["status"] == "timeout" and e["cut_by"] == "item timeout"
    assert "pytest ran past 3 s and was killed" in e["error"]
    assert report["status"] == "failed" and report["failures"] == ["tests.pytest (timeout)"]
    assert (tmp_path / Path(e["result"]["log"]).name).exists()
    assert [line for line in p.stdout.splitlines() if "tests.pytest" in line] and len(p.stdout) < 2000


def test_a_killed_run_leaves_the_report_of_what_finished_and_no_worker(tmp_path):
    """SIGKILL (what `timeout -s KILL` sends) after the first item: the report holds that item's
    result and names the running one; the worker dies with the main process."""
    p = subprocess.Popen(_cmd("--out", str(tmp_path), "--items", "bench.reweight,bench.streams"), cwd=ROOT,
                         env=_env(SAM_FAST_GPU_CHECK_INJECT="hang:bench.streams"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        report = _wait_for("gpu_check-*.json", tmp_path,
                           lambda it: it["bench.reweight"]["status"] == "ok" and "pid" in it["bench.streams"])
    finally:
        p.kill()
        p.wait()
    pid = _items(report)["bench.streams"]["pid"]
    _, report = _report(tmp_path)
    items = _items(report)
    assert items["bench.reweight"]["result"]["float32"]["ms"] > 0
    assert items["bench.streams"]["status"] == "running" and report["status"] == "running"
    t0 = time.monotonic()
    while not _gone(pid) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert _gone(pid), f"worker {pid} outlived the main process"


def test_sigterm_writes_the_report_and_stops_the_child(tmp_path):
    p = subprocess.Popen(_cmd("--out", str(tmp_path), "--items", "tests.pytest"), cwd=ROOT,
                         env=_env(SAM_FAST_GPU_CHECK_INJECT="hang:tests.pytest"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    report = _wait_for("gpu_check-*.json", tmp_path, lambda it: "pid" in it["tests.pytest"], timeout=60)
    pid = _items(report)["tests.pytest"]["pid"]
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM, out[-2000:]
    _, report = _report(tmp_path)
    e = _items(report)["tests.pytest"]
    assert report["status"] == "interrupted" and e["status"] == "timeout" and e["cut_by"] == "SIGTERM"
    assert "pid" not in e and next(tmp_path.glob("*-pytest.log")).exists()
    assert _gone(pid), f"pytest {pid} outlived the run"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_cuda_device_the_report_says_so(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no usable CUDA device" in p.stderr and "--dry-run" in p.stderr, p.stderr[-1000:]
    path, report = _report(tmp_path)
    assert report["exit_code"] == 2 and report["passed"] is False
    assert report["error"] == "no usable CUDA device: torch sees no CUDA device"
    assert {e["status"] for e in report["items"]} == {"skipped"}
    assert "no usable CUDA device" in path.with_suffix(".md").read_text()


def test_output_folder_precedence(gpu_check, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert gpu_check.out_dir("cli", {"SAM_FAST_GPU_CHECK_OUT": a, "OUT": b}) == Path("cli")
    assert gpu_check.out_dir(None, {"SAM_FAST_GPU_CHECK_OUT": a, "OUT": b}) == Path(a)
    assert gpu_check.out_dir(None, {"OUT": b}) == Path(b)
    assert gpu_check.out_dir(None, {"OUT": ""}) == ROOT / "bench" / "results"
    assert gpu_check.out_dir(None, {}) == ROOT / "bench" / "results"


def test_an_earlier_report_is_never_overwritten(gpu_check, tmp_path):
    (tmp_path / "gpu_check-X-2026-01-01.json").write_text("{}")
    assert gpu_check._free_stem(tmp_path, "gpu_check-X-2026-01-01") == tmp_path / "gpu_check-X-2026-01-01-2"
    assert gpu_check._free_stem(tmp_path, "gpu_check-Y-2026-01-01") == tmp_path / "gpu_check-Y-2026-01-01"


def test_peak_flops_by_device_name(gpu_check):
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", {})[0] == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", {})[0] == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200", {})[0] == 989.0
    assert gpu_check.peak_tflops("NVIDIA H200", {"SAM_FAST_PEAK_TFLOPS": "900"}) == (900.0, "SAM_FAST_PEAK_TFLOPS")
    assert gpu_check.peak_tflops("cpu-x86_64", {})[0] is None


def test_kernel_summary_of_a_cpu_profile_of_a_tiny_training_step(gpu_check):
    """The profile summary on a CPU profile (no kernels: CPU ops by self time) of two tiny SAM
    training steps: rows sorted by time, at most `top` + "other", percentages adding up to 100,
    names cut to `name_chars`, per-step figures consistent with the rows."""
    import torch

    from sam_fast import SAM, SAMConfig
    from sam_fast.bench_plan import SampleShape, realistic_batch

    torch.manual_seed(0)
    model = SAM(SAMConfig.tiny()).train()
    batch = realistic_batch(model.config, [SampleShape(2, 6, 4), SampleShape(3, 5, 3)])
    step = lambda: model(**batch).loss.backward()  # noqa: E731
    step()  # warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        step()
    records, what = gpu_check.profile_records(prof)
    assert what == "cpu ops (self time)" and len(records) > 50
    out = gpu_check.kernel_summary(records, what, steps=2, wall_ms=1e4, top=5, name_chars=20)
    rows = out["top"]
    assert len(rows) == 6 and rows[-1]["name"].startswith("other (") and rows[-1]["name"].endswith(" kernels)")
    assert [r["total_ms"] for r in rows[:5]] == sorted((r["total_ms"] for r in rows[:5]), reverse=True)
    assert sum(r["pct"] for r in rows) == pytest.approx(100, abs=0.1)
    assert all(len(r["name"]) <= 20 for r in rows[:5]) and any(r["name"].endswith("...") for r in rows[:5])
    assert sum(r["calls"] for r in rows) == len(records) and out["launches_per_step"] == round(len(records) / 2, 1)
    total_ms = sum(us for _, us in records) / 1e3
    assert sum(r["total_ms"] for r in rows) == pytest.approx(total_ms, abs=0.01)
    assert out["kernel_ms_per_step"] == pytest.approx(total_ms / 2, abs=1e-3)
    assert out["host_gap_ms_per_step"] == pytest.approx(5000 - total_ms / 2, abs=1e-3)
    live = gpu_check.profile_step(step, torch.device("cpu"), steps=1)  # the function the item calls
    assert live["steps"] == 1 and 0 < live["kernel_ms_per_step"] and len(live["top"]) <= 16


def test_kernel_summary_of_an_empty_profile_and_long_kernel_names(gpu_check):
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pass
    assert gpu_check.profile_records(prof) == ([], "cpu ops (self time)")
    out = gpu_check.kernel_summary([], "device kernels", steps=3, wall_ms=30.0)
    assert out["top"] == [] and out["kernel_ms_per_step"] == 0 and out["host_gap_ms_per_step"] == 10.0
    assert out["launches_per_step"] == 0 and out["device_busy"] == 0
    gemm = "cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8"
    name = gpu_check.short_kernel_name(f"void cutlass::Kernel2<{gemm}>({gemm}::Params)")
    assert name == f"cutlass::Kernel2<{gemm}>"[:77] + "..." and len(name) == 80
    assert gpu_check.short_kernel_name("void at::native::vectorized_elementwise_kernel<4>(int, T)") == \
        "at::native::vectorized_elementwise_kernel<4>"
    md = gpu_check._profile_markdown({"name": "step", "result": {"profile": gpu_check.kernel_summary(
        [("a|b", 2000.0), ("c", 1000.0)], "device kernels", steps=1, wall_ms=4.0)}})
    assert "| `a\\|b` | 1 | 2.0 | 66.67 |" in md and any("host gap 1.0 ms" in line for line in md)


def test_cross_attention_verdict_names_one_algorithm_only_where_every_row_agrees(gpu_check):
    def row(fused, sdpa, fused_graph=None, sdpa_graph=None):
        r = {"fused_backend": "triton", "decides": True, "fused_mix_ms": fused, "materialised_sdpa_ms": sdpa}
        if fused_graph:
            r.update(fused_mix_graph_ms=fused_graph, materialised_sdpa_graph_ms=sdpa_graph)
        r.update(gpu_check._faster(r))
        r.update(gpu_check._faster(r, "_graph"))
        return r

    loo = row(1.0, 1.5, 0.8, 1.0)
    assert (loo["faster"], loo["by"], loo["faster_graph"], loo["by_graph"]) == ("fused_mix", 1.5, "fused_mix", 1.25)
    rows = {"leave_one_out/bfloat16": loo, "shared/bfloat16": row(2.0, 2.4)}
    assert gpu_check.xattn_verdict(rows) == {
        "decided": True, "one_algorithm": "fused_mix",
        "summary": "leave_one_out/bfloat16: fused_mix 1.5x (graph fused_mix 1.25x); shared/bfloat16: fused_mix 1.2x"}
    # the graph replay disagrees with the eager timing: it depends, no single algorithm
    rows["shared/bfloat16"] = row(2.0, 2.4, 1.2, 1.0)
    assert gpu_check.xattn_verdict(rows)["one_algorithm"] is None
    rows = {"leave_one_out/bfloat16": row(3.0, 1.0), "shared/bfloat16": "skipped: 3 s left of the item's time"}
    assert gpu_check.xattn_verdict(rows) == {"decided": True, "one_algorithm": "materialised_sdpa",
                                             "summary": "leave_one_out/bfloat16: materialised_sdpa 3.0x; "
                                                        "1 row(s) did not decide"}
    table = gpu_check.xattn_table(rows, gpu_check.xattn_verdict(rows))
    md = gpu_check._table_markdown({"name": "xattn", "result": {"table": table}})
    assert "| leave_one_out/bfloat16 | 3.0 | 1.0 | materialised_sdpa | 3.0 |" in " ".join(md)
    assert md[-1] == "verdict: leave_one_out/bfloat16: materialised_sdpa 3.0x; 1 row(s) did not decide"


def _worker_ctx(gpu_check, item="bench.liger"):
    ctx = gpu_check.WorkerCtx({"dry": True, "inject_failure": False, "deadline_at": time.monotonic() + 600,
                               "timeouts": {item: 600}, "device": "cpu"}, lambda event: None)
    ctx.item = item
    return ctx


def _fake_liger(swiglu_scale=1.0, rope_error=None) -> dict:
    """Modules standing in for liger_kernel: Liger's public names as plain torch formulas (Hugging
    Face LLaMA's, written out here), `swiglu_scale` to make one op disagree, `rope_error` to make
    one op raise."""
    import types

    import torch
    import torch.nn.functional as F

    class LigerRMSNorm(torch.nn.Module):
        def __init__(self, hidden_size, eps=1e-6, in_place=True):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.ones(hidden_size)), eps

        def forward(self, x):
            h = x.float()
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    class LigerSiLUMulFunction:
        @staticmethod
        def apply(a, b):
            return F.silu(a) * b * swiglu_scale

    def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        if rope_error:
            raise RuntimeError(rope_error)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        half = q.shape[-1] // 2
        return tuple(x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin for x in (q, k))

    class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
        def __init__(self, ignore_index=-100, reduction="mean"):
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, lin_weight, _input, target, bias=None):
            logits = F.linear(_input, lin_weight, bias).float()
            return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)

    names = {"liger_kernel": {"__version__": "0.0-stand-in"}, "liger_kernel.transformers": {}, "liger_kernel.ops": {},
             "liger_kernel.transformers.rms_norm": {"LigerRMSNorm": LigerRMSNorm},
             "liger_kernel.ops.swiglu": {"LigerSiLUMulFunction": LigerSiLUMulFunction},
             "liger_kernel.transformers.rope": {"liger_rotary_pos_emb": liger_rotary_pos_emb},
             "liger_kernel.transformers.fused_linear_cross_entropy": {
                 "LigerFusedLinearCrossEntropyLoss": LigerFusedLinearCrossEntropyLoss}}
    mods = {}
    for name, attrs in names.items():
        mods[name] = types.ModuleType(name)
        mods[name].__dict__.update(attrs)
    return mods


LIGER_OPS = ["rms_norm", "swiglu", "rope", "fused_linear_cross_entropy"]


def test_liger_item_times_and_compares_every_op_beside_a_stand_in(gpu_check, monkeypatch):
    for name, mod in _fake_liger().items():
        monkeypatch.setitem(sys.modules, name, mod)
    res = gpu_check._bench_liger(_worker_ctx(gpu_check))
    assert list(res["rows"]) == LIGER_OPS and res["all_agree"] is True
    assert res["shape"] == {"tokens": 24, "D": 64, "F": 128, "heads": 4, "head_dim": 16, "V": 128, "supervised": 10}
    for op, row in res["rows"].items():
        assert row["ours_ms"] > 0 and row["liger_ms"] > 0, op
        assert row["liger_vs_ours"] == pytest.approx(row["liger_ms"] / row["ours_ms"], abs=0.006), op
        assert row["agree"] is True and 0 <= row["max_rel_diff"] <= 2**-6, (op, row)
    assert res["rows"]["fused_linear_cross_entropy"]["ours"] == "chunked"
    assert res["rows"]["rope"]["ours"] == "transformers (unfused)"
    assert [r[0] for r in res["table"]["rows"]] == LIGER_OPS and "beside ours" in res["table"]["title"]


def test_liger_item_records_a_disagreeing_op_and_a_failing_one_in_their_rows(gpu_check, monkeypatch):
    for name, mod in _fake_liger(swiglu_scale=1.5, rope_error="no kernel for this").items():
        monkeypatch.setitem(sys.modules, name, mod)
    res = gpu_check._bench_liger(_worker_ctx(gpu_check))
    rows = res["rows"]
    assert rows["swiglu"]["agree"] is False and rows["swiglu"]["max_rel_diff"] > 0.3
    assert rows["rope"] == "failed: RuntimeError: no kernel for this"
    assert rows["rms_norm"]["agree"] is True and rows["fused_linear_cross_entropy"]["agree"] is True
    assert res["all_agree"] is False


def test_liger_item_without_liger_kernel_is_skipped_saying_why(gpu_check, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import of liger_kernel halted
    with pytest.raises(gpu_check._Skip, match=r"^liger_kernel not importable \(ModuleNotFoundError: .*liger_kernel"):
        gpu_check._bench_liger(_worker_ctx(gpu_check))
