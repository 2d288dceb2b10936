"""context_reweight on non-finite input, every backend (reference, C++ CPU, Triton under the
interpreter; the CUDA kernels share the per-column arithmetic of csrc/context_reweight_common.h
with the CPU kernel, which these tests run). The rule (sam_fast/ops/context_reweight.py): a
column (sample, patch) with a NaN or inf feature or score gives NaN in all its outputs and
feature gradients, and NaN weight / bias gradients; every other column is unaffected."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_context_reweight import _force, cu_of, oracle

from sam_fast.ops import context_reweight

COUNTS = [1, 3, 2]  # rows 0 | 1 2 3 | 4 5
STARTS = [0, 1, 4]
P, D = 4, 8
BIG = 3e38  # finite in fp32; a row of it gives a score beyond fp32 range


def _base(seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(sum(COUNTS), P, D, generator=g)
    w = torch.randn(D, generator=g) * 0.5 + torch.where(torch.arange(D) % 2 == 0, 0.7, -0.7)  # sum |w| > 2
    return F, w, torch.tensor(0.25)


def _poisoned(kind):
    """(F, w, b, bad) with bad = the set of (sample, patch) columns the poison reaches."""
    F, w, b = _base()
    every = {(s, j) for s in range(len(COUNTS)) for j in range(P)}
    if kind == "nan_feature":
        F[2, 2, 3] = float("nan")
        return F, w, b, {(1, 2)}
    if kind == "inf_feature":
        F[4, 1, 0] = float("inf")
        return F, w, b, {(2, 1)}
    if kind == "neg_inf_feature_one_image":  # the one-image sample: NaN in leave-one-out too
        F[0, 3, 5] = float("-inf")
        return F, w, b, {(0, 3)}
    if kind == "pos_inf_score":  # finite features, score overflows to +inf
        F[3, 0] = BIG * torch.sign(w)
        return F, w, b, {(1, 0)}
    if kind == "neg_inf_score":
        F[5, 3] = -BIG * torch.sign(w)
        return F, w, b, {(2, 3)}
    if kind == "two_columns":
        F[1, 1, 0] = float("nan")
        F[5, 2, 7] = float("inf")
        return F, w, b, {(1, 1), (2, 2)}
    if kind == "nan_bias":
        return F, w, torch.tensor(float("nan")), every
    if kind == "inf_weight":
        w = w.clone()
        w[0] = float("inf")
        return F, w, b, every
    if kind == "huge_weight":  # adaptive weights of 1e38: every score overflows
        return F.abs() + 1, torch.full((D,), 1e38), b, every
    raise AssertionError(kind)


KINDS = ["nan_feature", "inf_feature", "neg_inf_feature_one_image", "pos_inf_score", "neg_inf_score",
         "two_columns", "nan_bias", "inf_weight", "huge_weight"]


def _column_mask(bad, mode):
    """[rows, P] bool: the outputs of the bad columns (rows: samples or images)."""
    rows = len(COUNTS) if mode == "shared" else sum(COUNTS)
    m = torch.zeros(rows, P, dtype=torch.bool)
    for s, j in bad:
        if mode == "shared":
            m[s, j] = True
        else:
            m[STARTS[s] : STARTS[s] + COUNTS[s], j] = True
    return m


def _image_mask(bad):
    m = torch.zeros(sum(COUNTS), P, dtype=torch.bool)
    for s, j in bad:
        m[STARTS[s] : STARTS[s] + COUNTS[s], j] = True
    return m


def _run(F, w, b, mode, g, dtype=torch.float32):
    Fg = F.to(dtype).requires_grad_()
    wg = w.to(dtype).requires_grad_()
    bg = b.to(dtype).requires_grad_()
    out = context_reweight(Fg, wg, bg, cu_of(COUNTS), mode)
    dF, dw, db = torch.autograd.grad(out, (Fg, wg, bg), g.to(out.dtype))
    return out.detach().float(), dF.float(), dw.float(), db.float()


def _check(backend, monkeypatch, kind, mode, dtype=torch.float32):
    _force(monkeypatch, backend, torch.zeros(1, 1, 1))
    F, w, b, bad = _poisoned(kind)
    rows = len(COUNTS) if mode == "shared" else sum(COUNTS)
    g = torch.randn(rows, P, D, generator=torch.Generator().manual_seed(7))
    out, dF, dw, db = _run(F, w, b, mode, g, dtype)

    bad_out = _column_mask(bad, mode)[..., None].expand(-1, -1, D)
    assert torch.isnan(out[bad_out]).all(), f"{backend} {kind}: a non-finite column is not all NaN"
    assert torch.isfinite(out[~bad_out]).all(), f"{backend} {kind}: NaN leaked into finite columns"
    bad_in = _image_mask(bad)[..., None].expand(-1, -1, D)
    assert torch.isnan(dF[bad_in]).all(), f"{backend} {kind}: feature grads of a non-finite column not NaN"
    assert torch.isfinite(dF[~bad_in]).all(), f"{backend} {kind}: NaN leaked into other feature grads"
    assert torch.isnan(dw).all() and torch.isnan(db), f"{backend} {kind}: weight/bias grads not NaN"

    # The finite columns are the op's usual result (float64 oracle written in the tests).
    if (~bad_out).any():
        Fd = F.to(dtype).double().detach().requires_grad_()
        want = oracle(Fd, w.to(dtype).double(), b.to(dtype).double(), COUNTS, mode)
        (want_dF,) = torch.autograd.grad(want, Fd, g.double())
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out[~bad_out].double(), want.detach()[~bad_out], rtol=tol, atol=tol)
        torch.testing.assert_close(dF[~bad_in].double(), want_dF[~bad_in], rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_finite_columns_are_nan_and_others_exact(monkeypatch, backend, kind, mode):
    _check(backend, monkeypatch, kind, mode)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("kind", ["nan_feature", "inf_feature", "neg_inf_feature_one_image", "two_columns"])
def test_non_finite_half_precision_cpu(monkeypatch, kind, mode):
    _check("cpu", monkeypatch, kind, mode, dtype=torch.bfloat16)


_TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _TRITON_OK, reason="no GPU and TRITON_INTERPRET is not 1")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN / inf
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("kind", ["nan_feature", "neg_inf_feature_one_image", "pos_inf_score", "neg_inf_score",
                                  "two_columns", "huge_weight"])
def test_non_finite_triton(monkeypatch, kind, mode):
    if torch.cuda.is_available():
        pytest.skip("the interpreter run covers the kernel's logic; GPU runs use the same code")
    _check("triton", monkeypatch, kind, mode)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_all_scores_below_minus_1e38_still_form_a_softmax(monkeypatch):
    """Finite scores of about -2e38 (not -inf): a proper softmax, not zeros (the Triton kernel's
    running maximum started at -1e38)."""
    F, w, b = _base()
    w = torch.full((D,), 1.0)
    F = F.abs() * 1e37 / D * -4 - 1e38 / D  # every score in (-2.2e38, -1e38)
    backends = ["reference", "cpu"] + (["triton"] if _TRITON_OK and not torch.cuda.is_available() else [])
    want = oracle(F.double(), w.double(), b.double(), COUNTS, "shared")
    for backend in backends:
        with monkeypatch.context() as m:
            _force(m, backend, torch.zeros(1, 1, 1))
            out = context_reweight(F, w, b, cu_of(COUNTS), "shared")
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_upstream_gradient_stays_in_its_column(monkeypatch, backend):
    _force(monkeypatch, backend, torch.zeros(1, 1, 1))
    F, w, b = _base()
    g = torch.randn(sum(COUNTS), P, D)
    g[2, 1, 4] = float("nan")
    _, dF, dw, db = _run(F, w, b, "leave_one_out", g)
    other = torch.ones(sum(COUNTS), P, dtype=torch.bool)
    other[1:4, 1] = False
    assert torch.isfinite(dF[other]).all() and torch.isnan(dF[~other]).any()
    assert torch.isnan(dw).all() and torch.isnan(db)


def test_non_finite_input_does_not_crash_the_process():
    """The C++ backward used to index row -1 (an argmax that no NaN comparison ever set) and die
    with SIGSEGV, taking pytest with it: run it in a child process and require a clean exit."""
    from sam_fast import _ext

    if _ext.load() is None:
        pytest.skip(f"extension not available: {_ext.info()['error']}")
    code = textwrap.dedent(
        """
        import torch
        from sam_fast.ops import context_reweight
        torch.manual_seed(0)
        cu = torch.tensor([0, 2, 5, 6])
        for mode in ("leave_one_out", "shared"):
            for value in (float("nan"), float("inf"), float("-inf")):
                for where in ("feature", "weight", "bias"):
                    F = torch.randn(6, 3, 8)
                    w = torch.randn(8)
                    b = torch.zeros(())
                    if where == "feature":
                        F[1, 2, 3] = value
                    elif where == "weight":
                        w[5] = value
                    else:
                        b = torch.tensor(value)
                    F.requires_grad_(); w.requires_grad_(); b.requires_grad_()
                    out = context_reweight(F, w, b, cu, mode)
                    out.sum().backward()
                    assert torch.isnan(out).any() and torch.isnan(w.grad).all(), (mode, value, where)
        w = torch.full((8,), 1e38, requires_grad=True)  # adaptive weights of 1e38
        F = torch.ones(6, 3, 8, requires_grad=True)
        context_reweight(F, w, torch.zeros(()), cu, "leave_one_out").sum().backward()
        print("ok")
        """
    )
    env = dict(os.environ, SAM_FAST_BACKEND="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, f"rc={r.returncode}\n{r.stderr[-2000:]}"


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(weight=[1.0] * D), TypeError, "weight must be a tensor"),
    (dict(bias=0.5), TypeError, "bias must be a tensor"),
    (dict(weight=torch.ones(D, dtype=torch.int64)), ValueError, "weight dtype torch.int64"),
])
def test_weight_and_bias_of_the_wrong_type_are_refused_by_name(kwargs, error, match):
    args = dict(features=torch.randn(3, P, D), weight=torch.ones(D), bias=torch.zeros(()),
                cu_images=cu_of([3]), mode="shared")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        context_reweight(**args)


@pytest.mark.skipif(not _TRITON_OK, reason="no GPU and TRITON_INTERPRET is not 1")
@pytest.mark.parametrize("shape", [(3, 0, 8), (3, 4, 0)])
def test_triton_empty_patch_or_feature_axis(monkeypatch, shape):
    """No patches or no features: empty outputs and zero gradients (the launcher divided by a
    zero block size)."""
    if torch.cuda.is_available():
        pytest.skip("interpreter run")
    _force(monkeypatch, "triton", torch.zeros(1, 1, 1))
    F = torch.randn(shape, requires_grad=True)
    w = torch.randn(shape[2], requires_grad=True)
    out = context_reweight(F, w, torch.zeros(()), cu_of([1, 2]), "leave_one_out")
    assert out.shape == shape
    out.sum().backward()
    assert F.grad.shape == shape and not w.grad.abs().sum()
