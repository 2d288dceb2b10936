"""`python -m sam_fast.env`, `sam-fast env` and the CLI's argument handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam_fast import _ext, cli, env

ROOT = Path(__file__).resolve().parents[1]


def _expected_extension_line() -> str:
    return "extension sam_fast._C: loaded" if _ext.load() is not None else "extension sam_fast._C: not loaded"


def _check_report(text: str) -> None:
    assert f"torch: {torch.__version__}" in text
    assert "Python: " in text and "transformers: " in text and "triton: " in text
    assert "CUDA available: " in text
    assert _expected_extension_line() in text
    assert "ops (backend chosen" in text
    # where the leave_one_out merge happens, per device (CPU: the materialising C++/reference path)
    assert "  cpu: leave_one_out W-stream K/V materialised once per batch" in text
    assert "(LeaveOneOutMaterialised); shared mode: " in text and "(SharedSchedule)" in text
    if __import__("torch").cuda.is_available():
        assert "  cuda: leave_one_out W-stream K/V" in text
        assert "  cuda: compile_decode=True runs the decoding step torch.compile(mode='reduce-overhead')" in text
    # which recompute_qformer="auto" takes here and why (2 x 2.87 GiB in fp32, within the CPU's 8 GiB)
    assert "  cpu: auto: the Q/W-former would keep 5.73 GiB of activations" in text
    assert "within the budget of 8.00 GiB (the CPU budget): kept" in text
    # the packed LLM step's attention backend and the reason it was chosen
    assert "packed LLM step attention (causal within each sample; head dim 128):" in text
    assert "  cpu: sdpa_segments (device is cpu: one causal SDPA per sample measured fastest" in text
    # what the lavis decoder's compile_decode flag does here: nothing to compile on a CPU
    assert "  cpu: compile_decode=True runs the decoding step eager over a preallocated KV cache" in text


def test_report_in_process():
    _check_report(env.report())


def test_python_m_sam_fast_env():
    r = subprocess.run([sys.executable, "-m", "sam_fast.env"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    _check_report(r.stdout)


def test_sam_fast_env_console_script():
    script = Path(sys.executable).with_name("sam-fast")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable} (pip install --no-build-isolation -e .)")
    r = subprocess.run([str(script), "env"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    _check_report(r.stdout)


def test_report_says_why_the_extension_is_off():
    r = subprocess.run(
        [sys.executable, "-m", "sam_fast.env"], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "SAM_FAST_DISABLE_EXT": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "extension sam_fast._C: not loaded: disabled by SAM_FAST_DISABLE_EXT" in r.stdout


def test_report_gives_the_models_schedule_decision(monkeypatch):
    """The schedule lines are the answer of the function the model decides with, asked for the
    paper's Q-former (12 heads of 64, from its config), not a probe of the op."""
    from sam_fast.modules import schedules

    seen = []

    def choose(mode, *args):
        seen.append((mode, *args))
        return schedules.SharedSchedule if mode == "shared" else schedules.LeaveOneOutInKernel

    monkeypatch.setattr(schedules, "choose_w_schedule", choose)
    text = env.report()
    assert ("  cpu: leave_one_out W-stream K/V formed inside the fused attention kernel (never materialised) "
            "(LeaveOneOutInKernel)") in text
    assert ("leave_one_out", 12, 64, "cpu", torch.float32) in seen and ("shared", 12, 64, "cpu", torch.float32) in seen


def test_report_names_the_training_step_capture_modes():
    """The whole-step capture's modes (CUDA graphs under "reduce-overhead") and its buckets."""
    text = env.report()
    assert "SAM.compile_training_step(mode=...)" in text
    assert '"reduce-overhead" (CUDA graphs on CUDA' in text and "None (torch.compile's default" in text
    assert "images to a multiple of 8 (filler images masked)" in text


def test_report_survives_broken_ops(monkeypatch):
    import sam_fast.ops.dispatch as dispatch

    def boom():
        raise RuntimeError("ops are broken")

    monkeypatch.setattr(dispatch, "explain", boom)
    text = env.report()
    assert "unavailable (RuntimeError: ops are broken)" in text
    assert f"torch: {torch.__version__}" in text


def test_cli_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "env" in out and "demo" in out


def test_cli_env_prints_the_report(capsys):
    assert cli.main(["env"]) == 0
    _check_report(capsys.readouterr().out)


def test_cli_rejects_unknown_commands_and_arguments(capsys):
    for argv in (["nope"], ["env", "--bogus"], []):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2


def test_cli_demo_passes_only_the_given_options(monkeypatch):
    import inspect

    from sam_fast import demo

    for argv, want in ((["demo"], {}), (["demo", "--steps", "3", "--batch", "2", "--seed", "7"],
                                        {"steps": 3, "batch": 2, "seed": 7})):
        inspect.signature(demo.main).bind(**want)  # the options exist in the demo's signature
        seen = {}
        monkeypatch.setattr(demo, "main", lambda **kw: seen.update(kw) or {})
        assert cli.main(argv) == 0
        assert seen == want
        monkeypatch.undo()
