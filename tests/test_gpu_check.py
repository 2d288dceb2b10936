"""bench/gpu_check.py in its CPU mode (--dry-run): every section runs at toy sizes, the report is
written, and a failing correctness check turns into a non-zero exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ("build", "tests", "model_checks", "benchmarks")


def _run(tmp_path, *extra, sections=None):
    env = dict(os.environ)
    env.pop("SAM_FAST_GPU_CHECK_INJECT_FAILURE", None)
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), *extra]
    if sections:
        cmd += ["--sections", sections]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    reports = sorted(tmp_path.glob("gpu_check-*.json"))
    assert len(reports) == 1, p.stdout[-2000:] + p.stderr[-2000:]
    return p, json.loads(reports[0].read_text()), reports[0]


def test_dry_run_runs_every_section_and_writes_the_report(tmp_path):
    p, report, path = _run(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert set(report["sections"]) == set(SECTIONS)
    for name, sec in report["sections"].items():
        assert sec["status"] in ("ok", "skipped"), (name, sec)
        assert sec["items"], name
    assert report["passed"] is True and report["failures"] == []
    env = report["env"]
    for key in ("device", "torch", "triton", "transformers", "commit", "date"):
        assert env.get(key), key
    items = {i["name"]: i for s in report["sections"].values() for i in s["items"]}
    # the CUDA tests are only collected, and the selection exists
    collect = items["pytest (collect only)"]
    assert collect["status"] == "ok" and collect["collected"] > 10 and collect["rc"] == 0
    # the model checks ran (not skipped) in both context modes; compile is GPU-only
    for mode in ("leave_one_out", "shared"):
        for dt in ("float32", "bfloat16", "float16"):
            assert items[f"encode_images {mode} {dt} vs reference"]["status"] == "ok"
        assert items[f"packed training step vs packing=False ({mode})"]["status"] == "ok"
    assert items["torch.compile(encode_images) smoke"]["status"] == "skipped"
    step = items["tiny-config train step + generation"]
    assert step["status"] == "ok" and step["speedup_vs_released"] > 0
    assert step["generate_hf"]["new_tokens"] > 0 and step["generate_lavis"]["new_tokens"] > 0
    assert step["cached_speedup_vs_released"] > 0
    assert step["generate_hf_static"]["same_ids_as_hf"] is True
    md = path.with_name(path.name[: -len(".json")] + ".md")
    text = md.read_text()
    assert "PASS" in text and all(f"## {s}" in text for s in SECTIONS)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_failed_correctness_check_fails_the_run(tmp_path, how, monkeypatch):
    if how == "flag":
        p, report, _ = _run(tmp_path, "--inject-failure", sections="model_checks")
    else:
        monkeypatch.setenv("SAM_FAST_GPU_CHECK_INJECT_FAILURE", "1")
        env = dict(os.environ)
        p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path),
                            "--sections", "model_checks"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
        report = json.loads(next(tmp_path.glob("gpu_check-*.json")).read_text())
    assert p.returncode == 1, p.stdout[-2000:]
    assert report["passed"] is False and report["sections"]["model_checks"]["status"] == "failed"
    assert any("encode_images" in f for f in report["failures"])
    assert "FAIL" in p.stdout
    # the sections not selected are reported as skipped, not silently absent
    assert report["sections"]["benchmarks"]["status"] == "skipped"


def test_unknown_section_is_refused_by_name(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--sections", "bogus"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "bogus" in p.stderr
