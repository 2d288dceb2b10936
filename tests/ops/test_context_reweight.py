"""context_reweight (sam_fast/ops/context_reweight.py) on every backend that runs here (reference,
C++ CPU, Triton under TRITON_INTERPRET=1; the CUDA kernels share the per-column arithmetic of
csrc/context_reweight_common.h with the CPU kernel) against one float64 oracle (`oracle`), with one
error-budget table (`FLOOR`, below): forward and every gradient, the weight form and the given
scores form, non-finite input, bad input."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sam_fast.ops import context_reweight, context_reweight_ref


def oracle(F, s, counts, mode):
    """The one float64 oracle of this op (used in the dtype it is given): the formula written
    directly from the scores s [T, P], sample by sample (masked softmax over the other images)."""
    out, start = [], 0
    for n in counts:
        x, sc = F[start : start + n], s[start : start + n]
        if mode == "shared":
            out.append(torch.einsum("mp,mpd->pd", torch.softmax(sc, 0), x)[None])
        elif n == 1:
            out.append(x * 0)
        else:
            eye = torch.eye(n, dtype=torch.bool)[:, :, None]
            a = torch.softmax(sc[None].expand(n, n, -1).masked_fill(eye, float("-inf")), 1)
            out.append(torch.einsum("imp,mpd->ipd", a, x))
        start += n
    return torch.cat(out)


def scores_of(F, w, b):
    """s = F . w + b (zeros for w None: uniform weights)."""
    if w is None:
        return F.new_zeros(F.shape[:2])
    return F @ w.reshape(-1) + (b.reshape(()) if b is not None else 0.0)


def oracle_wb(F, w, b, counts, mode):
    """`oracle` in float64 with the scores of a Linear(D, 1) (weight w, bias b)."""
    F = F.double()
    return oracle(F, scores_of(F, None if w is None else w.double(), None if b is None else b.double()), counts, mode)


def cu_of(counts, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=dtype)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("counts", [[1], [2], [1, 2, 3, 5], [17, 1, 4]])
def test_forward_and_grads_match_oracle(mode, counts):
    torch.manual_seed(0)
    T, P, D = sum(counts), 7, 24
    F = torch.randn(T, P, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, dtype=torch.float64, requires_grad=True)
    b = torch.randn((), dtype=torch.float64, requires_grad=True)
    out = context_reweight(F, w, b, cu_of(counts), mode)
    ref = oracle_wb(F, w, b, counts, mode)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (F, w, b), g, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, (F, w, b), g, allow_unused=True, materialize_grads=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_one_image_sample_is_zero_in_leave_one_out_and_mean_is_uniform():
    F = torch.randn(4, 3, 8)
    out = context_reweight(F, None, None, cu_of([1, 3]), "leave_one_out")
    assert out[0].abs().max() == 0
    torch.testing.assert_close(out[1], (F[2] + F[3]) / 2)
    shared = context_reweight(F, None, None, cu_of([1, 3]), "shared")
    torch.testing.assert_close(shared[1], F[1:].mean(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_scores_are_stable(dtype):
    """Scores ~1e4: a naive exp overflows; error within 2x of torch's same-dtype softmax."""
    torch.manual_seed(1)
    counts, P, D = [3, 1, 4], 5, 16
    F = torch.randn(sum(counts), P, D).to(dtype)
    w = (torch.randn(D) * 3e3).to(dtype)
    b = torch.zeros((), dtype=dtype)
    for mode in ("leave_one_out", "shared"):
        ref = oracle_wb(F, w, b, counts, mode)
        out = context_reweight(F, w, b, cu_of(counts), mode)
        assert out.dtype == dtype and torch.isfinite(out).all()
        plain = oracle_wb(F.double(), w.double(), b.double(), counts, mode).to(dtype)  # torch rounding of the result
        budget = 2 * (plain.double() - ref).abs().max().item() + 1e-2 * (1 if dtype != torch.float32 else 1e-3)
        assert (out.double() - ref).abs().max().item() <= budget


def test_non_contiguous_and_int64_offsets():
    F = torch.randn(8, 6, 5).transpose(1, 2)  # [8, 5, 6] non-contiguous
    w = torch.randn(6)
    out = context_reweight(F, w, torch.zeros(1), cu_of([3, 5], torch.int64), "leave_one_out")
    torch.testing.assert_close(out.double(), oracle_wb(F, w, torch.zeros(1), [3, 5], "leave_one_out"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=torch.randn(4, 3)), r"\[T, P, D\]"),
        (dict(weight=torch.randn(7)), "weight must be"),
        (dict(cu_images=torch.tensor([0, 2, 4], dtype=torch.float32)), "int32 or int64"),
        (dict(cu_images=torch.tensor([[0, 4]], dtype=torch.int32)), "1-D"),
        (dict(cu_images=torch.tensor([1, 4], dtype=torch.int32)), r"cu_images\[0\]=1"),
        (dict(cu_images=torch.tensor([0, 3, 2, 4], dtype=torch.int32)), "decreases at sample 1"),
        (dict(cu_images=torch.tensor([0, 3], dtype=torch.int32)), "must equal T=4"),
        (dict(cu_images=torch.tensor([0, 2, 2, 4], dtype=torch.int32)), "sample 1 is empty"),
        (dict(mode="both"), "mode='both'"),
        (dict(weight=torch.randn(8, device="meta")), "on meta"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(features=torch.randn(4, 3, 8), weight=torch.randn(8), bias=torch.zeros(()),
                cu_images=torch.tensor([0, 2, 4], dtype=torch.int32), mode="leave_one_out")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        context_reweight(**args)


def test_reference_is_what_dispatch_falls_back_to():
    F = torch.randn(5, 3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    cu = cu_of([2, 3])
    torch.testing.assert_close(context_reweight(F, w, None, cu), context_reweight_ref(F, w, None, cu))


# ------------------------------------------------------------------ compiled backends (cpu, triton)
# Every backend that can run here, forced through the public op (SAM_FAST_BACKEND), against the
# float64 oracle, forward and all gradients. Error budget (flash-attention's rule): the backend's
# error <= 2 x the error of the plain torch formula in the same dtype + a small floor relative to
# the quantity's natural scale.

FLOOR = {torch.float32: 2e-6, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}


def forward_and_grads(F, w, b, counts, mode, g, fn=None):
    """(out, dF, dw, db, ds) of `fn` (default: the formula in F's dtype) for upstream grad g."""
    F = F.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    if fn is None:
        s = F @ w + b
        s.retain_grad()
        out = oracle(F, s, counts, mode)
    else:
        s, out = None, fn(F, w, b)
    dF, dw, db = torch.autograd.grad(out, (F, w, b), g.to(out.dtype), retain_graph=s is not None,
                                     allow_unused=True, materialize_grads=True)
    ds = None
    if s is not None:
        ds = torch.autograd.grad(out, s, g.to(out.dtype), allow_unused=True, materialize_grads=True)[0]
    return out.detach(), dF, dw, db, ds


def make(counts, P, D, dtype, scale=1.0, bias=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(sum(counts), P, D, generator=g).to(dtype)
    w = (torch.randn(D, generator=g) * scale / D**0.5).to(dtype)
    return F, w, torch.tensor(bias, dtype=dtype)


def check_backend(backend, counts, P, D, dtype, mode, scale=1.0, bias=0.0, seed=0, layout=None, dominate=0.0,
                  device="cpu"):
    """Run `backend` through the public op and assert the error budget on out, dF, dw, db.
    `dominate` adds that much to the score of the first image of every sample. The inputs are
    made on the host (the float64 oracle and the plain formula run there); the op under test gets
    copies on `device` (with `layout` applied there) and its results come back to the host.
    Returns (out, dF, dw, db, None) of the op, on the host."""
    F, w, b = make(counts, P, D, dtype, scale, bias, seed)
    if dominate:
        first = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()[:-1]])
        F = F.clone()
        F[first] += (w.float() * (dominate / w.float().square().sum())).to(dtype)
    Fd, wd, bd, cu = F.to(device), w.to(device), b.to(device), cu_of(counts).to(device)
    if layout is not None:
        F, Fd = layout(F), layout(Fd)
    rows = len(counts) if mode == "shared" else sum(counts)
    g = torch.randn(rows, P, D, generator=torch.Generator().manual_seed(seed + 1))
    ref = forward_and_grads(F.double(), w.double(), b.double(), counts, mode, g.double())
    plain = forward_and_grads(F, w, b, counts, mode, g)
    fast = forward_and_grads(Fd, wd, bd, counts, mode, g.to(device),
                             fn=lambda F_, w_, b_: context_reweight(F_, w_, b_, cu, mode))
    assert fast[0].device == Fd.device, f"{backend}: result on {fast[0].device}, inputs on {Fd.device}"
    fast = tuple(x.cpu() if x is not None else None for x in fast)
    ds = ref[4]
    scales = {  # natural magnitude of each result (d bias is 0 mathematically: scale it by |ds|)
        "out": ref[0].abs().max().item(),
        "dF": ref[1].abs().max().item(),
        "dw": (ds.abs().reshape(-1, 1) * F.double().abs().reshape(-1, D)).sum(0).max().item(),
        "db": ds.abs().sum().item(),
    }
    assert fast[0].dtype == dtype and fast[0].shape == ref[0].shape
    for i, name in enumerate(("out", "dF", "dw", "db")):
        assert fast[i].dtype == (dtype if i < 2 else w.dtype), name
        assert torch.isfinite(fast[i]).all(), name
        err = (fast[i].double() - ref[i]).abs().max().item()
        # (+1e-30: fp32 subnormals; a saturated softmax gives score grads of ~exp(-1e4))
        budget = 2 * (plain[i].double() - ref[i]).abs().max().item() + FLOOR[dtype] * scales[name] + 1e-30
        assert err <= budget, f"{backend} {name}: error {err:.3g} > budget {budget:.3g} (scale {scales[name]:.3g})"
    return fast


def _force(monkeypatch, backend, features):
    from sam_fast.ops.dispatch import dispatcher

    monkeypatch.setenv("SAM_FAST_BACKEND", backend)
    why = dict(dispatcher("context_reweight").reasons(features, None, None, cu_of([features.shape[0]]), "shared"))[backend]
    if why is not None:
        pytest.skip(f"backend {backend} cannot run here: {why}")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernel_real_shape(monkeypatch, dtype, mode):
    """EVA ViT-g features (P=257, D=1408), samples of 1, 3 and 6 images, forward and all grads."""
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    check_backend("cpu", [1, 3, 6], 257, 1408, dtype, mode, scale=3.0, bias=0.5)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("scale", "bias"), [(1.0, 0.0), (100.0, -30.0), (1e4, 0.0), (10.0, 1e4)])
def test_cpu_kernel_ragged_and_large_scores(monkeypatch, dtype, mode, scale, bias):
    """Ragged 1..17 images per sample, odd P and D, scores (or bias) up to 1e4 in magnitude."""
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    counts = [1, 17, 2, 5, 3]
    check_backend("cpu", counts, 13, 37, dtype, mode, scale=scale, bias=bias, seed=int(scale))


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_cpu_kernel_non_contiguous_and_batch_of_one(monkeypatch, mode):
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    layout = lambda F: F.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    check_backend("cpu", [4], 11, 40, torch.float32, mode, scale=5.0, layout=layout)
    wide = lambda F: torch.cat([F, F], dim=2)[:, :, : F.shape[2]]  # noqa: E731  (a D-slice)
    check_backend("cpu", [1], 11, 40, torch.float32, mode, layout=wide)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_cpu_kernel_dominating_image_gives_accurate_tiny_score_grads(monkeypatch, mode):
    """One image dominates every softmax (score gap ~1e3): d(weight) is ~0 and must not come out
    as the difference of two large, nearly equal numbers."""
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    fast = check_backend("cpu", [5, 3], 7, 32, torch.float32, mode, scale=3.0, dominate=1e3)
    if mode == "shared":  # (in leave-one-out the dominant image's own map is not saturated)
        assert fast[2].abs().max() < 1e-6 * fast[1].abs().max()


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_cpu_kernel_backward_is_bitwise_deterministic(monkeypatch, mode):
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    F, w, b = make([3, 1, 6], 67, 96, torch.float32, scale=3.0)
    g = torch.randn(3 if mode == "shared" else 10, 67, 96)
    runs = [forward_and_grads(F, w, b, None, mode, g, fn=lambda F_, w_, b_: context_reweight(F_, w_, b_, cu_of([3, 1, 6]), mode))
            for _ in range(2)]
    threads = torch.get_num_threads()
    try:  # and independent of the thread count
        torch.set_num_threads(1)
        runs.append(forward_and_grads(F, w, b, None, mode, g, fn=lambda F_, w_, b_: context_reweight(F_, w_, b_, cu_of([3, 1, 6]), mode)))
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        for x, y in zip(runs[0][:4], r[:4]):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mean_guidance_is_uniform_weights_with_feature_grads(monkeypatch, backend):
    _force(monkeypatch, backend, torch.zeros(1, 1, 1))
    F = torch.randn(5, 3, 8, requires_grad=True)
    out = context_reweight(F, None, None, cu_of([2, 3]), "leave_one_out")
    torch.testing.assert_close(out[2], (F[3] + F[4]) / 2)
    (gF,) = torch.autograd.grad(out.sum(), F)
    want = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])  # each image feeds its n-1 siblings with weight 1/(n-1)
    torch.testing.assert_close(gF.sum((1, 2)) / 24, want)


def test_frozen_features_get_no_gradient_and_compiled_op_trains(monkeypatch):
    """The model's case: features from the frozen encoder, Linear weights trainable."""
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    F = torch.randn(6, 5, 16)
    lin = torch.nn.Linear(16, 1)
    out = context_reweight(F, lin.weight, lin.bias, cu_of([2, 4]), "leave_one_out")
    out.square().sum().backward()
    assert lin.weight.grad.shape == (1, 16) and lin.bias.grad.shape == (1,)
    assert lin.weight.grad.abs().sum() > 0


def test_opcheck_compiled_ops():
    """Schema, fake tensors, autograd registration of sam_fast::context_reweight_fwd/_bwd."""
    from sam_fast import _ext

    if _ext.load() is None:
        pytest.skip(f"extension not available: {_ext.info()['error']}")
    from sam_fast.ops.context_reweight import _cpp_ops

    fwd = _cpp_ops()
    for shared in (False, True):
        F, w, b = make([3, 1], 5, 8, torch.float32)
        args = (F.requires_grad_(), w.requires_grad_(), b.requires_grad_(), cu_of([3, 1]), shared)
        torch.library.opcheck(fwd.default, args)
        g = torch.randn(2 if shared else 4, 5, 8)
        torch.library.opcheck(torch.ops.sam_fast.context_reweight_bwd.default,
                              (g, F.detach(), w.detach(), b.detach(), cu_of([3, 1]), shared, True))


def test_torch_compile_fullgraph_on_cpu():
    """A function calling the op compiles as one graph (the op is opaque, with fake shapes) and
    matches eager, forward and backward."""
    torch._dynamo.reset()
    F = torch.randn(5, 7, 16)
    w = torch.randn(16, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    cu = cu_of([2, 3])

    def f(F, w, b):
        return context_reweight(F * 2, w, b, cu, "leave_one_out").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(F, w, b)
    want = f(F, w, b)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, w), torch.autograd.grad(want, w))


def test_host_offsets_replace_the_device_read(monkeypatch):
    """With `offsets` (a host copy of cu_images) validation never reads cu_images (on a GPU that
    read is a device-to-host sync per call); wrong offsets are still refused."""
    from sam_fast.ops.context_reweight import validate_context_reweight

    F = torch.randn(5, 3, 4)
    w, cu = torch.randn(4), torch.tensor([0, 2, 5])

    def no_read(self):
        raise AssertionError("cu_images read on the host")

    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    validate_context_reweight(F, w, None, cu, "leave_one_out", offsets=[0, 2, 5])
    with pytest.raises(ValueError, match="must equal T=5"):
        validate_context_reweight(F, w, None, cu, "leave_one_out", offsets=[0, 2, 4])
    with pytest.raises(ValueError, match="offsets has 2 entries"):
        validate_context_reweight(F, w, None, cu, "leave_one_out", offsets=[0, 5])
    with pytest.raises(AssertionError, match="read on the host"):  # without offsets it reads them
        validate_context_reweight(F, w, None, cu, "leave_one_out")


# ------------------------------------------------------------------ Triton kernels
# Without a GPU they run under TRITON_INTERPRET=1 (set by conftest.py) on small shapes with one
# program per sample (every interpreted program costs milliseconds).

_needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no GPU and TRITON_INTERPRET is not 1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton(monkeypatch):
    _force(monkeypatch, "triton", torch.zeros(1, 1, 1, device=DEVICE))


@_needs_triton
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_ragged_batch(monkeypatch, dtype, mode):
    """Samples of 1, 4 and 2 images, P not a multiple of anything, D not a power of two."""
    _triton(monkeypatch)
    check_backend("triton", [1, 4, 2], 9, 24, dtype, mode, scale=3.0, bias=0.5, device=DEVICE)


@_needs_triton
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_triton_seventeen_images_and_large_scores(monkeypatch, mode):
    _triton(monkeypatch)
    check_backend("triton", [17], 3, 16, torch.float32, mode, scale=1e4, seed=3, device=DEVICE)


@_needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_large_scores_half(monkeypatch, dtype):
    _triton(monkeypatch)
    for mode in ("leave_one_out", "shared"):
        check_backend("triton", [3, 2], 5, 16, dtype, mode, scale=1e4, seed=4, device=DEVICE)


@_needs_triton
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_triton_dominating_image_and_non_contiguous(monkeypatch, mode):
    _triton(monkeypatch)
    layout = lambda F: F.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    fast = check_backend("triton", [4, 1], 5, 16, torch.float32, mode, scale=3.0, dominate=1e3, layout=layout,
                         device=DEVICE)
    if mode == "shared":
        assert fast[2].abs().max() < 1e-6 * fast[1].abs().max()


@_needs_triton
def test_triton_backward_is_bitwise_deterministic_and_mean_guidance(monkeypatch):
    _triton(monkeypatch)
    F, w, b = (t.to(DEVICE) for t in make([3, 2], 5, 16, torch.float32, scale=3.0))
    cu = cu_of([3, 2]).to(DEVICE)
    g = torch.randn(5, 5, 16).to(DEVICE)
    fn = lambda F_, w_, b_: context_reweight(F_, w_, b_, cu, "leave_one_out")  # noqa: E731
    r1, r2 = (forward_and_grads(F, w, b, None, None, g, fn=fn) for _ in range(2))
    assert r1[0].device == F.device
    for x, y in zip(r1[:4], r2[:4]):
        assert torch.equal(x, y)
    Fg = F.clone().requires_grad_()
    out = context_reweight(Fg, None, None, cu, "leave_one_out")
    torch.testing.assert_close(out[0], (F[1] + F[2]) / 2)
    torch.testing.assert_close(out[3], F[4])
    (gF,) = torch.autograd.grad(out.sum(), Fg)
    torch.testing.assert_close(gF, torch.ones_like(F))


@_needs_triton
def test_triton_opcheck():
    from sam_fast.ops.context_reweight import _triton_fwd_op

    F, w, b = make([2, 1], 3, 16, torch.float32)
    args = (F.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_(), b.to(DEVICE).requires_grad_(),
            cu_of([2, 1]).to(DEVICE), False)
    torch.library.opcheck(_triton_fwd_op, args)


# ------------------------------------------------------------------ non-finite input, every backend
# The rule (module docstring of the op): a column (sample, patch) with a NaN or inf feature or
# score gives NaN in all its outputs and feature gradients, and NaN weight / bias gradients;
# every other column is unaffected.

COUNTS = [1, 3, 2]  # rows 0 | 1 2 3 | 4 5
STARTS = [0, 1, 4]
NP, ND = 4, 8  # patches, feature width of these cases
BIG = 3e38  # finite in fp32; a row of it gives a score beyond fp32 range


def _base(seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(sum(COUNTS), NP, ND, generator=g)
    w = torch.randn(ND, generator=g) * 0.5 + torch.where(torch.arange(ND) % 2 == 0, 0.7, -0.7)  # sum |w| > 2
    return F, w, torch.tensor(0.25)


def _poisoned(kind):
    """(F, w, b, bad) with bad = the set of (sample, patch) columns the poison reaches."""
    F, w, b = _base()
    every = {(s, j) for s in range(len(COUNTS)) for j in range(NP)}
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
        return F.abs() + 1, torch.full((ND,), 1e38), b, every
    raise AssertionError(kind)


KINDS = ["nan_feature", "inf_feature", "neg_inf_feature_one_image", "pos_inf_score", "neg_inf_score",
         "two_columns", "nan_bias", "inf_weight", "huge_weight"]


def _column_mask(bad, mode):
    """[rows, NP] bool: the outputs of the bad columns (rows: samples or images)."""
    rows = len(COUNTS) if mode == "shared" else sum(COUNTS)
    m = torch.zeros(rows, NP, dtype=torch.bool)
    for s, j in bad:
        if mode == "shared":
            m[s, j] = True
        else:
            m[STARTS[s] : STARTS[s] + COUNTS[s], j] = True
    return m


def _image_mask(bad):
    m = torch.zeros(sum(COUNTS), NP, dtype=torch.bool)
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
    g = torch.randn(rows, NP, ND, generator=torch.Generator().manual_seed(7))
    out, dF, dw, db = _run(F, w, b, mode, g, dtype)

    bad_out = _column_mask(bad, mode)[..., None].expand(-1, -1, ND)
    assert torch.isnan(out[bad_out]).all(), f"{backend} {kind}: a non-finite column is not all NaN"
    assert torch.isfinite(out[~bad_out]).all(), f"{backend} {kind}: NaN leaked into finite columns"
    bad_in = _image_mask(bad)[..., None].expand(-1, -1, ND)
    assert torch.isnan(dF[bad_in]).all(), f"{backend} {kind}: feature grads of a non-finite column not NaN"
    assert torch.isfinite(dF[~bad_in]).all(), f"{backend} {kind}: NaN leaked into other feature grads"
    assert torch.isnan(dw).all() and torch.isnan(db), f"{backend} {kind}: weight/bias grads not NaN"

    # The finite columns are the op's usual result (float64 oracle written in the tests).
    if (~bad_out).any():
        Fd = F.to(dtype).double().detach().requires_grad_()
        want = oracle_wb(Fd, w.to(dtype).double(), b.to(dtype).double(), COUNTS, mode)
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
    w = torch.full((ND,), 1.0)
    F = F.abs() * 1e37 / ND * -4 - 1e38 / ND  # every score in (-2.2e38, -1e38)
    backends = ["reference", "cpu"] + (["triton"] if _TRITON_OK and not torch.cuda.is_available() else [])
    want = oracle_wb(F.double(), w.double(), b.double(), COUNTS, "shared")
    for backend in backends:
        with monkeypatch.context() as m:
            _force(m, backend, torch.zeros(1, 1, 1))
            out = context_reweight(F, w, b, cu_of(COUNTS), "shared")
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_upstream_gradient_stays_in_its_column(monkeypatch, backend):
    _force(monkeypatch, backend, torch.zeros(1, 1, 1))
    F, w, b = _base()
    g = torch.randn(sum(COUNTS), NP, ND)
    g[2, 1, 4] = float("nan")
    _, dF, dw, db = _run(F, w, b, "leave_one_out", g)
    other = torch.ones(sum(COUNTS), NP, dtype=torch.bool)
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
    (dict(weight=[1.0] * ND), TypeError, "weight must be a tensor"),
    (dict(bias=0.5), TypeError, "bias must be a tensor"),
    (dict(weight=torch.ones(ND, dtype=torch.int64)), ValueError, "weight dtype torch.int64"),
])
def test_weight_and_bias_of_the_wrong_type_are_refused_by_name(kwargs, error, match):
    args = dict(features=torch.randn(3, NP, ND), weight=torch.ones(ND), bias=torch.zeros(()),
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


# ------------------------------------------------------------------ given scores (scores=[T, P])
# The model's call: the cross-attention K/V of the images [T, P, C] re-weighted with Adaptive
# Adjustment scores computed from other tensors (the features); the gradient reaches the values
# and the scores. Same oracle, same budget table.

BACKENDS = ["reference", "cpu", "triton"]


def _force_any(monkeypatch, backend):
    device = DEVICE if backend == "triton" else "cpu"
    if backend == "triton" and not _TRITON_OK:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    _force(monkeypatch, backend, torch.zeros(1, 1, 1, device=device))
    return device


def _scores_case(counts, P, D, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(sum(counts), P, D, generator=g).to(dtype)
    s = torch.randn(sum(counts), P, generator=g) * scale  # fp32, as the model passes them
    return V, s


def _grads(fn, V, s, G):
    V = V.detach().requires_grad_()
    s = s.detach().requires_grad_()
    out = fn(V, s)
    dV, ds = torch.autograd.grad(out, (V, s), G.to(out.dtype))
    return out.detach(), dV, ds


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_given_scores_forward_and_grads_within_budget(monkeypatch, backend, dtype, mode):
    device = _force_any(monkeypatch, backend)
    counts, P, D = [1, 4, 2], 5, 24
    V, s = _scores_case(counts, P, D, dtype)
    rows = len(counts) if mode == "shared" else sum(counts)
    G = torch.randn(rows, P, D, generator=torch.Generator().manual_seed(1))
    ref = _grads(lambda V_, s_: oracle(V_, s_, counts, mode), V.double(), s.double(), G.double())
    plain = _grads(lambda V_, s_: oracle(V_, s_, counts, mode), V, s.to(dtype), G.to(dtype))
    cu = cu_of(counts).to(device)
    fast = _grads(lambda V_, s_: context_reweight(V_, None, None, cu, mode, scores=s_), V.to(device), s.to(device),
                  G.to(device))
    assert fast[0].dtype == dtype and fast[1].dtype == dtype and fast[2].dtype == torch.float32
    for name, f, p, r in zip(("out", "dV", "ds"), fast, plain, ref):
        f = f.cpu().double()
        assert torch.isfinite(f).all(), name
        err = (f - r).abs().max().item()
        budget = 2 * (p.double() - r).abs().max().item() + FLOOR[dtype] * r.abs().max().item() + 1e-30
        assert err <= budget, f"{backend} {dtype} {mode} {name}: error {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_given_scores_equal_the_weight_form(monkeypatch, backend, mode):
    """scores = F . w + b given from outside gives what the op computes from w and b itself."""
    device = _force_any(monkeypatch, backend)
    F, w, b = (t.to(device) for t in make([3, 1, 2], 5, 16, torch.float32, scale=3.0, bias=0.5))
    cu = cu_of([3, 1, 2]).to(device)
    want = context_reweight(F, w, b, cu, mode)
    got = context_reweight(F, None, None, cu, mode, scores=F @ w + b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_scores_non_finite(monkeypatch, backend):
    """A non-finite score poisons its column (every output NaN, its score gradients NaN); a NaN
    value with finite scores makes NaN the outputs whose support holds it; other columns exact."""
    device = _force_any(monkeypatch, backend)
    counts, P, D = [3, 2], 4, 8
    V, s = _scores_case(counts, P, D, torch.float32, seed=5)
    cu = cu_of(counts).to(device)
    s_bad = s.clone()
    s_bad[1, 2] = float("nan")
    Vg, sg = V.to(device).requires_grad_(), s_bad.to(device).requires_grad_()
    out = context_reweight(Vg, None, None, cu, "leave_one_out", scores=sg)
    (ds,) = torch.autograd.grad(out.sum(), sg)
    out, ds = out.detach().cpu(), ds.cpu()
    assert torch.isnan(out[0:3, 2]).all() and torch.isnan(ds[0:3, 2]).all()
    keep = torch.ones(5, P, dtype=torch.bool)
    keep[0:3, 2] = False
    want = oracle(V.double(), s_bad.double(), counts, "leave_one_out")
    assert torch.isfinite(out[keep]).all() and torch.isfinite(ds[keep]).all()
    torch.testing.assert_close(out[keep].double(), want[keep], rtol=1e-5, atol=1e-5)

    V_bad = V.clone()
    V_bad[3, 1, 5] = float("nan")  # sample 1 (images 3, 4), patch 1
    out = context_reweight(V_bad.to(device), None, None, cu, "leave_one_out", scores=s.to(device)).cpu()
    assert torch.isnan(out[4, 1, 5])  # image 4's support is {3}
    shared = context_reweight(V_bad.to(device), None, None, cu, "shared", scores=s.to(device)).cpu()
    assert torch.isnan(shared[1, 1, 5])
    keep = torch.ones(5, P, dtype=torch.bool)
    keep[3:5, 1] = False
    torch.testing.assert_close(out[keep].double(), oracle(V.double(), s.double(), counts, "leave_one_out")[keep],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(weight=torch.ones(8)), ValueError, "either scores or weight/bias"),
    (dict(bias=torch.zeros(())), ValueError, "either scores or weight/bias"),
    (dict(scores=torch.zeros(4, 2)), ValueError, r"scores must be \[T, P\] = \[4, 3\], got \(4, 2\)"),
    (dict(scores=torch.zeros(4, 3, dtype=torch.int64)), ValueError, "scores dtype torch.int64"),
    (dict(scores=torch.zeros(4, 3, device="meta")), ValueError, "scores is on meta"),
    (dict(scores=[[0.0] * 3] * 4), TypeError, "scores must be a tensor"),
])
def test_given_scores_bad_input_is_refused_by_name(kwargs, error, match):
    args = dict(features=torch.randn(4, 3, 8), weight=None, bias=None, cu_images=cu_of([2, 2]),
                mode="leave_one_out", scores=torch.zeros(4, 3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        context_reweight(**args)


def test_given_scores_opcheck_compiled_ops():
    """Schema, fake tensors and autograd of the compiled ops with the optional scores input."""
    from sam_fast import _ext
    from sam_fast.ops.context_reweight import _triton_fwd_op

    V, s = _scores_case([3, 1], 5, 8, torch.float32)
    zw, zb = torch.zeros(8), torch.zeros(())
    for shared in (False, True):
        if _ext.load() is not None:
            args = (V.clone().requires_grad_(), zw, zb, cu_of([3, 1]), shared, s.clone().requires_grad_())
            torch.library.opcheck(torch.ops.sam_fast.context_reweight_fwd.default, args)
        if _TRITON_OK:
            args = (V.to(DEVICE).requires_grad_(), zw.to(DEVICE), zb.to(DEVICE), cu_of([3, 1]).to(DEVICE), shared,
                    s.to(DEVICE).requires_grad_())
            torch.library.opcheck(_triton_fwd_op, args)
