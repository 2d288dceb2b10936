"""The dispatcher: choice, forcing with SAM_FAST_BACKEND, explanations; compiled vs reference."""

import os
import subprocess
import sys

import pytest
import torch

from sam_fast import _ext
from sam_fast.ops import BackendUnavailable, context_reweight, explain
from sam_fast.ops.dispatch import dispatcher

HAVE_EXT = _ext.load() is not None


def _inputs(requires_grad=False):
    torch.manual_seed(0)
    V = torch.randn(6, 5, 16, requires_grad=requires_grad)
    s = torch.randn(6, 5, requires_grad=requires_grad)
    return V, s, torch.tensor([0, 1, 3, 6], dtype=torch.int32)


def test_explain_lists_every_op_and_reason():
    report = explain()
    assert set(report) >= {"context_reweight", "cross_attention"}
    for entry in report.values():
        assert entry["backend"] in entry["reasons"]
        assert entry["reasons"]["reference"] == "usable"


@pytest.mark.skipif(not HAVE_EXT, reason=f"extension not loaded: {_ext.info().get('error')}")
def test_compiled_cpu_kernel_is_chosen_with_and_without_grad(monkeypatch):
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    d = dispatcher("context_reweight")
    V, s, cu = _inputs()
    with torch.no_grad():
        assert d.choose(V, s, cu, "shared").name == "cpu"
    Vg, sg, cu = _inputs(requires_grad=True)
    assert d.choose(Vg, sg, cu, "shared").name == "cpu"  # fused backward: training uses it too
    reasons = d.reasons(Vg, sg, cu, "shared")
    assert "CUDA" in reasons["triton"] and "CUDA" in reasons["cuda"]
    assert "float64" in d.reasons(V.double(), s, cu, "shared")["cpu"]


@pytest.mark.skipif(not HAVE_EXT, reason=f"extension not loaded: {_ext.info().get('error')}")
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("weight", ["scores", "mean"])
def test_compiled_and_reference_agree(monkeypatch, mode, weight):
    V, s, cu = _inputs()
    s = torch.zeros_like(s) if weight == "mean" else s
    with torch.no_grad():
        monkeypatch.setenv("SAM_FAST_BACKEND", "cpu")
        fast = context_reweight(V, s, cu, mode)
        monkeypatch.setenv("SAM_FAST_BACKEND", "reference")
        ref = context_reweight(V, s, cu, mode)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_forced_backend_that_cannot_run_fails_with_reasons(monkeypatch):
    monkeypatch.setenv("SAM_FAST_BACKEND", "cpu")
    V, s, cu = _inputs(requires_grad=True)
    with pytest.raises(BackendUnavailable, match=r"SAM_FAST_BACKEND=cpu.*float64.*reference: ok"):
        context_reweight(V.double(), s, cu, "leave_one_out")
    monkeypatch.setenv("SAM_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match=r"SAM_FAST_BACKEND=cuda.*cpu: ok"):
        context_reweight(V, s, cu, "leave_one_out")


def test_model_tests_pass_with_the_extension_disabled():
    """The pure-Python path: the reference-equality model tests in a process without sam_fast._C."""
    env = dict(os.environ, SAM_FAST_DISABLE_EXT="1")
    code = (
        "import sam_fast._ext as e, sys; assert e.load() is None, e.info();"
        "import pytest; sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', 'tests/models/test_sam.py',"
        " '-k', 'hf or reference or gradients']))"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout
