"""context_reweight (sam_fast/ops/context_reweight.py) on every backend that runs here (reference,
C++ CPU, Triton under TRITON_INTERPRET=1; the CUDA kernels share the per-column arithmetic of
csrc/context_reweight_common.h with the CPU kernel) against one float64 oracle (`oracle`), with one
error-budget table (`FLOOR`, below): forward and both gradients (values, scores), non-finite input,
bad input. The scores come as the model passes them: fp32 [T, P] (Adaptive Adjustment
``Linear(E)``), the values are the images' K/V or features in any kernel dtype."""

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sam_fast.ops import context_reweight, context_reweight_ref
from sam_fast.ops._common import triton_import_error


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


def cu_of(counts, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=dtype)


def make(counts, P, D, dtype, scale=1.0, shift=0.0, seed=0):
    """Values [T, P, D] in `dtype` and fp32 scores [T, P] of standard deviation `scale` around
    `shift`."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(sum(counts), P, D, generator=g).to(dtype)
    s = torch.randn(sum(counts), P, generator=g) * scale + shift
    return V, s


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("counts", [[1], [2], [1, 2, 3, 5], [17, 1, 4]])
def test_forward_and_grads_match_oracle(mode, counts):
    torch.manual_seed(0)
    T, P, D = sum(counts), 7, 24
    V = torch.randn(T, P, D, dtype=torch.float64, requires_grad=True)
    s = (torch.randn(T, P, dtype=torch.float64) * 3).requires_grad_()
    out = context_reweight(V, s, cu_of(counts), mode)
    ref = oracle(V, s, counts, mode)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (V, s), g, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, (V, s), g, allow_unused=True, materialize_grads=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_signature_takes_scores_only():
    """The op, its compiled schema and the Triton op take the values and their scores: there is no
    weight/bias form (scores computed in the kernel from a Linear) left to call."""
    from sam_fast import _ext
    from sam_fast.ops.context_reweight import _triton_fwd_op

    assert list(inspect.signature(context_reweight).parameters) == ["values", "scores", "cu_images", "mode",
                                                                    "offsets"]
    assert list(inspect.signature(context_reweight_ref).parameters) == ["values", "scores", "cu_images", "mode"]
    want = ["values", "scores", "cu_images", "shared"]
    assert [a.name for a in _triton_fwd_op._opoverload._schema.arguments] == want
    if _ext.load() is not None:
        assert [a.name for a in torch.ops.sam_fast.context_reweight_fwd.default._schema.arguments] == want
        bwd = [a.name for a in torch.ops.sam_fast.context_reweight_bwd.default._schema.arguments]
        assert bwd == ["grad_out", "values", "scores", "cu_images", "shared", "values_grad"]
        assert len(torch.ops.sam_fast.context_reweight_bwd.default._schema.returns) == 2
    V, s = make([2, 1], 3, 8, torch.float32)
    with pytest.raises(ValueError, match=r"scores must be \[T, P\] = \[3, 3\], got \(8,\)"):
        context_reweight(V, torch.randn(8), cu_of([2, 1]), "shared")  # a Linear's weight is no score


def test_one_image_sample_is_zero_in_leave_one_out_and_zero_scores_are_uniform():
    V = torch.randn(4, 3, 8)
    zero = torch.zeros(4, 3)
    out = context_reweight(V, zero, cu_of([1, 3]), "leave_one_out")
    assert out[0].abs().max() == 0
    torch.testing.assert_close(out[1], (V[2] + V[3]) / 2)
    shared = context_reweight(V, zero, cu_of([1, 3]), "shared")
    torch.testing.assert_close(shared[1], V[1:].mean(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_scores_are_stable(dtype):
    """Scores ~1e4: a naive exp overflows; error within 2x of rounding the exact result to dtype."""
    counts, P, D = [3, 1, 4], 5, 16
    V, s = make(counts, P, D, dtype, scale=1e4, seed=1)
    for mode in ("leave_one_out", "shared"):
        ref = oracle(V.double(), s.double(), counts, mode)
        out = context_reweight(V, s, cu_of(counts), mode)
        assert out.dtype == dtype and torch.isfinite(out).all()
        plain = ref.to(dtype)  # torch rounding of the result
        budget = 2 * (plain.double() - ref).abs().max().item() + 1e-2 * (1 if dtype != torch.float32 else 1e-3)
        assert (out.double() - ref).abs().max().item() <= budget


def test_non_contiguous_and_int64_offsets():
    V = torch.randn(8, 6, 5).transpose(1, 2)  # [8, 5, 6] non-contiguous
    s = torch.randn(5, 8).t()  # [8, 5] non-contiguous
    out = context_reweight(V, s, cu_of([3, 5], torch.int64), "leave_one_out")
    torch.testing.assert_close(out.double(), oracle(V.double(), s.double(), [3, 5], "leave_one_out"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(values=torch.randn(4, 3)), ValueError, r"values must be \[T, P, D\], got \(4, 3\)"),
        (dict(values=torch.ones(4, 3, 8, dtype=torch.int64)), ValueError, "values dtype torch.int64"),
        (dict(scores=torch.zeros(4, 2)), ValueError, r"scores must be \[T, P\] = \[4, 3\], got \(4, 2\)"),
        (dict(scores=torch.zeros(4, 3, dtype=torch.int64)), ValueError, "scores dtype torch.int64"),
        (dict(scores=torch.zeros(4, 3, device="meta")), ValueError, "scores is on meta"),
        (dict(scores=[[0.0] * 3] * 4), TypeError, "scores must be a .T, P. tensor, got list"),
        (dict(scores=None), TypeError, "scores must be a .T, P. tensor, got NoneType"),
        (dict(cu_images=torch.tensor([0, 2, 4], dtype=torch.float32)), ValueError, "int32 or int64"),
        (dict(cu_images=torch.tensor([[0, 4]], dtype=torch.int32)), ValueError, "1-D"),
        (dict(cu_images=torch.tensor([1, 4], dtype=torch.int32)), ValueError, r"cu_images\[0\]=1"),
        (dict(cu_images=torch.tensor([0, 3, 2, 4], dtype=torch.int32)), ValueError, "decreases at sample 1"),
        (dict(cu_images=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "must equal T=4"),
        (dict(cu_images=torch.tensor([0, 2, 2, 4], dtype=torch.int32)), ValueError, "sample 1 is empty"),
        (dict(cu_images=torch.tensor([0, 2, 4], dtype=torch.int32, device="meta")), ValueError,
         "cu_images is on meta"),
        (dict(mode="both"), ValueError, "mode='both'"),
        (dict(mode="x" * 500), ValueError, r"mode='x+\.\.\. is not one of"),
    ],
)
def test_bad_input_is_refused_by_name(kwargs, error, match):
    args = dict(values=torch.randn(4, 3, 8), scores=torch.zeros(4, 3),
                cu_images=torch.tensor([0, 2, 4], dtype=torch.int32), mode="leave_one_out")
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        context_reweight(**args)
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)


def test_reference_is_what_dispatch_falls_back_to():
    V = torch.randn(5, 3, 8, dtype=torch.float64)
    s = torch.randn(5, 3, dtype=torch.float64)
    cu = cu_of([2, 3])
    torch.testing.assert_close(context_reweight(V, s, cu), context_reweight_ref(V, s, cu), rtol=0, atol=0)


# ------------------------------------------------------------------ every backend (reference, cpu, triton)
# Every backend that can run here, forced through the public op (SAM_FAST_BACKEND), against the
# float64 oracle, forward and both gradients. Error budget (flash-attention's rule): the backend's
# error <= 2 x the error of the plain torch formula in the values' dtype + a small floor relative to
# the quantity's natural scale.

FLOOR = {torch.float32: 2e-6, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["reference", "cpu", "triton"]
_TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def forward_and_grads(V, s, counts, mode, g, fn=None):
    """(out, dV, ds) of `fn` (default: the oracle's formula in V's dtype) for upstream grad g."""
    V = V.detach().requires_grad_()
    s = s.detach().requires_grad_()
    out = oracle(V, s, counts, mode) if fn is None else fn(V, s)
    dV, ds = torch.autograd.grad(out, (V, s), g.to(out.dtype), allow_unused=True, materialize_grads=True)
    return out.detach(), dV, ds


def check_backend(backend, counts, P, D, dtype, mode, scale=1.0, shift=0.0, seed=0, layout=None, dominate=0.0,
                  device="cpu"):
    """Run `backend` through the public op and assert the error budget on out, dV, ds.
    `dominate` adds that much to the score of the first image of every sample. The inputs are
    made on the host (the float64 oracle and the plain formula run there); the op under test gets
    copies on `device` (with `layout` applied to the values there) and its results come back to
    the host. Returns (out, dV, ds) of the op, on the host."""
    V, s = make(counts, P, D, dtype, scale, shift, seed)
    if dominate:
        first = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()[:-1]])
        s[first] += dominate
    Vd, sd, cu = V.to(device), s.to(device), cu_of(counts).to(device)
    if layout is not None:
        V, Vd = layout(V), layout(Vd)
    rows = len(counts) if mode == "shared" else sum(counts)
    g = torch.randn(rows, P, D, generator=torch.Generator().manual_seed(seed + 1))
    ref = forward_and_grads(V.double(), s.double(), counts, mode, g.double())
    plain = forward_and_grads(V, s.to(dtype), counts, mode, g)
    fast = forward_and_grads(Vd, sd, counts, mode, g.to(device),
                             fn=lambda V_, s_: context_reweight(V_, s_, cu, mode))
    assert fast[0].device == Vd.device, f"{backend}: result on {fast[0].device}, inputs on {Vd.device}"
    fast = tuple(x.cpu() for x in fast)
    assert fast[0].shape == ref[0].shape
    for i, (name, want_dtype) in enumerate((("out", dtype), ("dV", dtype), ("ds", torch.float32))):
        assert fast[i].dtype == want_dtype, name
        assert torch.isfinite(fast[i]).all(), name
        err = (fast[i].double() - ref[i]).abs().max().item()
        # (+1e-30: fp32 subnormals; a saturated softmax gives score grads of ~exp(-1e4))
        budget = 2 * (plain[i].double() - ref[i]).abs().max().item() + FLOOR[dtype] * ref[i].abs().max().item() + 1e-30
        assert err <= budget, f"{backend} {name}: error {err:.3g} > budget {budget:.3g}"
    return fast


def _force(monkeypatch, backend, values):
    from sam_fast.ops.dispatch import dispatcher

    monkeypatch.setenv("SAM_FAST_BACKEND", backend)
    why = dict(dispatcher("context_reweight").reasons(values, values.new_zeros(values.shape[:2]),
                                                      cu_of([values.shape[0]]), "shared"))[backend]
    if why is not None:
        pytest.skip(f"backend {backend} cannot run here: {why}")


def _force_any(monkeypatch, backend):
    """Force `backend` (skip where it cannot run); returns the device its inputs go to."""
    device = DEVICE if backend == "triton" else "cpu"
    if backend == "triton" and not _TRITON_OK:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    _force(monkeypatch, backend, torch.zeros(1, 1, 1, device=device))
    return device


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_grads_within_budget(monkeypatch, backend, dtype, mode):
    """Samples of 1, 4 and 2 images, P not a multiple of anything, D not a power of two."""
    device = _force_any(monkeypatch, backend)
    check_backend(backend, [1, 4, 2], 5, 24, dtype, mode, scale=3.0, shift=0.5, device=device)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernel_real_shape(monkeypatch, dtype, mode):
    """EVA ViT-g width (P=257, D=1408), samples of 1, 3 and 6 images, forward and both grads."""
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    check_backend("cpu", [1, 3, 6], 257, 1408, dtype, mode, scale=3.0, shift=0.5)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (100.0, -30.0), (1e4, 0.0), (10.0, 1e4)])
def test_cpu_kernel_ragged_and_large_scores(monkeypatch, dtype, mode, scale, shift):
    """Ragged 1..17 images per sample, odd P and D, scores (or their offset) up to 1e4 in magnitude."""
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    check_backend("cpu", [1, 17, 2, 5, 3], 13, 37, dtype, mode, scale=scale, shift=shift, seed=int(scale))


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_cpu_kernel_non_contiguous_and_batch_of_one(monkeypatch, mode):
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    layout = lambda V: V.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    check_backend("cpu", [4], 11, 40, torch.float32, mode, scale=5.0, layout=layout)
    wide = lambda V: torch.cat([V, V], dim=2)[:, :, : V.shape[2]]  # noqa: E731  (a D-slice)
    check_backend("cpu", [1], 11, 40, torch.float32, mode, layout=wide)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_dominating_image_gives_accurate_tiny_score_grads(monkeypatch, backend, mode):
    """One image dominates every softmax (score gap ~1e3): its score gradient is ~0 and must not
    come out as the difference of two large, nearly equal numbers; non-contiguous values."""
    device = _force_any(monkeypatch, backend)
    layout = lambda V: V.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    fast = check_backend(backend, [5, 3], 7, 32, torch.float32, mode, scale=3.0, dominate=1e3, layout=layout,
                         device=device)
    if mode == "shared":  # (in leave-one-out the dominant image's own map is not saturated)
        assert fast[2].abs().max() < 1e-6 * fast[1].abs().max()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_backward_is_bitwise_deterministic(monkeypatch, backend, mode):
    device = _force_any(monkeypatch, backend)
    # (Triton: a sample of two register chunks, score gradients summed over 3 channel blocks)
    counts = [3, 1, 6] if backend == "cpu" else [3, 2, 9]
    P, D = (67, 96) if backend == "cpu" else (5, 37)
    V, s = (t.to(device) for t in make(counts, P, D, torch.float32, scale=3.0))
    g = torch.randn(len(counts) if mode == "shared" else sum(counts), P, D).to(device)
    fn = lambda V_, s_: context_reweight(V_, s_, cu_of(counts).to(device), mode)  # noqa: E731
    runs = [forward_and_grads(V, s, None, mode, g, fn=fn) for _ in range(2)]
    threads = torch.get_num_threads()
    try:  # and independent of the thread count
        torch.set_num_threads(1)
        runs.append(forward_and_grads(V, s, None, mode, g, fn=fn))
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        for x, y in zip(runs[0], r):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_scores_are_uniform_weights_with_value_grads(monkeypatch, backend):
    """The "mean" guidance: zero scores, uniform weights; each image feeds its n-1 siblings with
    weight 1/(n-1); the score gradients of uniform weights are exact differences."""
    device = _force_any(monkeypatch, backend)
    V = torch.randn(5, 3, 8, device=device, requires_grad=True)
    s = torch.zeros(5, 3, device=device, requires_grad=True)
    out = context_reweight(V, s, cu_of([2, 3]).to(device), "leave_one_out")
    torch.testing.assert_close(out[2], (V[3] + V[4]) / 2)
    torch.testing.assert_close(out[0], V[1])
    gV, gs = torch.autograd.grad(out.sum(), (V, s))
    torch.testing.assert_close(gV, torch.ones_like(V))
    # ds_k = sum_{i != k} a_ik (1 . V_k - 1 . y_i): sample 1 has a_ik = 1/2
    tot = V.detach().sum(-1)  # [T, P]
    want = torch.stack([tot[0] * 0, tot[1] * 0,  # two images: each output is the other, weight 1
                        *[sum(0.5 * (tot[k] - (tot[2:5].sum(0) - tot[i]) / 2) for i in range(2, 5) if i != k)
                          for k in range(2, 5)]])
    torch.testing.assert_close(gs, want, rtol=1e-5, atol=1e-5)


def test_frozen_values_and_scores_from_a_trainable_linear(monkeypatch):
    """The model's case: values (K/V of the frozen encoder) need no gradient, the scores come from
    the trainable Adaptive Adjustment Linear of other features; its gradient arrives."""
    _force(monkeypatch, "cpu", torch.zeros(1, 1, 1))
    E, V = torch.randn(6, 5, 16), torch.randn(6, 5, 12)
    lin = torch.nn.Linear(16, 1)
    out = context_reweight(V, lin(E)[..., 0], cu_of([2, 4]), "leave_one_out")
    out.square().sum().backward()
    assert lin.weight.grad.shape == (1, 16) and lin.bias.grad.shape == (1,)
    assert lin.weight.grad.abs().sum() > 0
    s64 = E.double() @ lin.weight[0].double() + lin.bias.double()
    want = torch.autograd.grad(oracle(V.double(), s64, [2, 4], "leave_one_out").square().sum(), lin.weight)[0]
    torch.testing.assert_close(lin.weight.grad.double(), want.double(), rtol=1e-4, atol=1e-5)


def test_opcheck_compiled_ops():
    """Schema, fake tensors, autograd registration of sam_fast::context_reweight_fwd/_bwd and of
    the Triton pair."""
    from sam_fast import _ext
    from sam_fast.ops.context_reweight import _triton_fwd_op

    V, s = make([3, 1], 5, 8, torch.float32)
    for shared in (False, True):
        if _ext.load() is not None:
            for v_grad in (True, False):
                args = (V.clone().requires_grad_(v_grad), s.clone().requires_grad_(), cu_of([3, 1]), shared)
                torch.library.opcheck(torch.ops.sam_fast.context_reweight_fwd.default, args)
            g = torch.randn(2 if shared else 4, 5, 8)
            for v_grad in (True, False):
                torch.library.opcheck(torch.ops.sam_fast.context_reweight_bwd.default,
                                      (g, V, s, cu_of([3, 1]), shared, v_grad))
        if _TRITON_OK:
            args = (V.to(DEVICE, copy=True).requires_grad_(), s.to(DEVICE, copy=True).requires_grad_(),
                    cu_of([3, 1]).to(DEVICE), shared)
            torch.library.opcheck(_triton_fwd_op, args)


def test_torch_compile_fullgraph_on_cpu():
    """A function calling the op compiles as one graph (the op is opaque, with fake shapes) and
    matches eager, forward and backward."""
    torch._dynamo.reset()
    V = torch.randn(5, 7, 16)
    s = torch.randn(5, 7, requires_grad=True)
    cu = cu_of([2, 3])

    def f(V, s):
        return context_reweight(V * 2, s * 3, cu, "leave_one_out").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(V, s)
    want = f(V, s)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, s), torch.autograd.grad(want, s))


def test_host_offsets_replace_the_device_read(monkeypatch):
    """With `offsets` (a host copy of cu_images) validation never reads cu_images (on a GPU that
    read is a device-to-host sync per call); wrong offsets are still refused."""
    from sam_fast.ops.context_reweight import validate_context_reweight

    V, s, cu = torch.randn(5, 3, 4), torch.randn(5, 3), torch.tensor([0, 2, 5])

    def no_read(self):
        raise AssertionError("cu_images read on the host")

    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    validate_context_reweight(V, s, cu, "leave_one_out", offsets=[0, 2, 5])
    with pytest.raises(ValueError, match="must equal T=5"):
        validate_context_reweight(V, s, cu, "leave_one_out", offsets=[0, 2, 4])
    with pytest.raises(ValueError, match="offsets has 2 entries"):
        validate_context_reweight(V, s, cu, "leave_one_out", offsets=[0, 5])
    with pytest.raises(AssertionError, match="read on the host"):  # without offsets it reads them
        validate_context_reweight(V, s, cu, "leave_one_out")


# ------------------------------------------------------------------ Triton kernels
# Without a GPU they run under TRITON_INTERPRET=1 (set by conftest.py) on small shapes with one
# program per sample (every interpreted program costs milliseconds).

_needs_triton = pytest.mark.skipif(not _TRITON_OK, reason="no GPU and TRITON_INTERPRET is not 1")


@_needs_triton
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_triton_seventeen_images_and_large_scores(monkeypatch, mode):
    _force_any(monkeypatch, "triton")
    check_backend("triton", [17], 3, 16, torch.float32, mode, scale=1e4, seed=3, device=DEVICE)


@_needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_large_scores_half(monkeypatch, dtype):
    _force_any(monkeypatch, "triton")
    for mode in ("leave_one_out", "shared"):
        check_backend("triton", [3, 2], 5, 16, dtype, mode, scale=1e4, seed=4, device=DEVICE)


@_needs_triton
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("counts", "D"), [([1, 2, 3, 7, 16], 37), ([16], 16), ([2, 1], 40)],
                         ids=["n1-2-3-7-16_D37", "n16_D16", "n2-1_D40"])
def test_triton_image_counts_and_channel_blocks(monkeypatch, counts, D, dtype, mode):
    """Samples of 1, 2, 3, 7 and 16 images: one register chunk (NB = 8 here, 16 for the lone
    16-image sample) or several (the 16-image sample of the first batch); channel widths split
    into blocks with a ragged edge (37 = 16 + 16 + 5 under the interpreter) or one block."""
    device = _force_any(monkeypatch, "triton")
    check_backend("triton", counts, 3, D, dtype, mode, scale=3.0, shift=0.5, seed=len(counts), device=device)


def test_triton_launch_blocks_follow_the_roofline(monkeypatch):
    """GPU launch configuration: the model's K/V width 9216 and the vision width 1408 are split
    into channel blocks that idle at most 1/8 of the lanes (1408 was padded to 2048), NB covers
    the mean sample, and the Triton backend takes any width (it refused D > 8192)."""
    from sam_fast.ops.context_reweight import _check_triton, _triton_blocks

    for T, B, D, nb in [(30, 8, 9216, 4), (32, 4, 1408, 8), (16, 1, 1408, 16), (3, 3, 24, 2)]:
        for backward in (False, True):
            got_nb, block_d, warps = _triton_blocks(T, B, D, backward, interpret=False)
            assert got_nb == nb and block_d & (block_d - 1) == 0 and warps in (4, 8)
            covered = -(-D // block_d) * block_d
            assert covered - D <= max(D // 8, block_d - D), (T, B, D, block_d)
            assert nb * block_d <= (2048 if backward else 4096) or block_d <= 64
    assert _triton_blocks(30, 8, 9216, False, interpret=False)[1] == 1024
    assert _triton_blocks(32, 4, 1408, False, interpret=False)[1] == 512
    if triton_import_error() is None:  # (the interpreter rule lets CPU tensors stand in for CUDA ones)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("SAM_FAST_BACKEND", "triton")
        assert _check_triton(torch.zeros(2, 1, 9216), torch.zeros(2, 1), cu_of([2])) is None


@_needs_triton
def test_triton_model_width_forward(monkeypatch):
    """The model's K/V width (6 cross-attention layers x K, V x 768 = 9216 channels) runs on the
    Triton backend (it fell back to another backend above 8192) and matches the oracle."""
    device = _force_any(monkeypatch, "triton")
    V, s = make([3], 1, 9216, torch.float32, scale=2.0)
    for mode in ("leave_one_out", "shared"):
        out = context_reweight(V.to(device), s.to(device), cu_of([3]).to(device), mode).cpu()
        torch.testing.assert_close(out.double(), oracle(V.double(), s.double(), [3], mode), rtol=1e-5, atol=1e-5)


@_needs_triton
@pytest.mark.parametrize("shape", [(3, 0, 8), (3, 4, 0)])
def test_triton_empty_patch_or_feature_axis(monkeypatch, shape):
    """No patches or no value width: empty outputs and zero gradients (the launcher divided by a
    zero block size)."""
    if torch.cuda.is_available():
        pytest.skip("interpreter run")
    _force_any(monkeypatch, "triton")
    V = torch.randn(shape, requires_grad=True)
    s = torch.randn(shape[:2], requires_grad=True)
    out = context_reweight(V, s, cu_of([1, 2]), "leave_one_out")
    assert out.shape == shape
    out.sum().backward()
    assert V.grad.shape == shape and s.grad.shape == shape[:2] and not s.grad.abs().sum()


# ------------------------------------------------------------------ non-finite input, every backend
# The rule (module docstring of the op): a column (sample, patch) with a NaN or inf score gives NaN
# in all its outputs, value gradients and score gradients; every other column is unaffected.

COUNTS = [1, 3, 2]  # rows 0 | 1 2 3 | 4 5
STARTS = [0, 1, 4]
NP, ND = 4, 8  # patches, value width of these cases


def _base(seed=0):
    return make(COUNTS, NP, ND, torch.float32, scale=2.0, seed=seed)


def _poisoned(kind):
    """(V, s, bad) with bad = the set of (sample, patch) columns the poison reaches."""
    V, s = _base()
    every = {(b, j) for b in range(len(COUNTS)) for j in range(NP)}
    if kind == "nan_score":
        s[2, 2] = float("nan")
        return V, s, {(1, 2)}
    if kind == "pos_inf_score":
        s[3, 0] = float("inf")
        return V, s, {(1, 0)}
    if kind == "neg_inf_score":
        s[5, 3] = float("-inf")
        return V, s, {(2, 3)}
    if kind == "neg_inf_score_one_image":  # the one-image sample: NaN in leave-one-out too
        s[0, 3] = float("-inf")
        return V, s, {(0, 3)}
    if kind == "two_columns":
        s[1, 1] = float("nan")
        s[5, 2] = float("inf")
        return V, s, {(1, 1), (2, 2)}
    if kind == "all_inf":  # every score +inf (an overflowed Linear)
        return V, torch.full_like(s, float("inf")), every
    raise AssertionError(kind)


KINDS = ["nan_score", "pos_inf_score", "neg_inf_score", "neg_inf_score_one_image", "two_columns", "all_inf"]


def _column_mask(bad, mode):
    """[rows, NP] bool: the outputs of the bad columns (rows: samples or images)."""
    rows = len(COUNTS) if mode == "shared" else sum(COUNTS)
    m = torch.zeros(rows, NP, dtype=torch.bool)
    for b, j in bad:
        if mode == "shared":
            m[b, j] = True
        else:
            m[STARTS[b] : STARTS[b] + COUNTS[b], j] = True
    return m


def _image_mask(bad):
    m = torch.zeros(sum(COUNTS), NP, dtype=torch.bool)
    for b, j in bad:
        m[STARTS[b] : STARTS[b] + COUNTS[b], j] = True
    return m


def _run(V, s, mode, g, dtype=torch.float32, device="cpu"):
    Vg = V.to(device, dtype).requires_grad_()
    sg = s.to(device).requires_grad_()
    out = context_reweight(Vg, sg, cu_of(COUNTS).to(device), mode)
    dV, ds = torch.autograd.grad(out, (Vg, sg), g.to(device, out.dtype))
    return out.detach().float().cpu(), dV.float().cpu(), ds.cpu()


def _check(backend, monkeypatch, kind, mode, dtype=torch.float32):
    device = _force_any(monkeypatch, backend)
    V, s, bad = _poisoned(kind)
    rows = len(COUNTS) if mode == "shared" else sum(COUNTS)
    g = torch.randn(rows, NP, ND, generator=torch.Generator().manual_seed(7))
    out, dV, ds = _run(V, s, mode, g, dtype, device)

    bad_out = _column_mask(bad, mode)[..., None].expand(-1, -1, ND)
    assert torch.isnan(out[bad_out]).all(), f"{backend} {kind}: a non-finite column is not all NaN"
    assert torch.isfinite(out[~bad_out]).all(), f"{backend} {kind}: NaN leaked into finite columns"
    bad_s = _image_mask(bad)
    bad_in = bad_s[..., None].expand(-1, -1, ND)
    assert torch.isnan(dV[bad_in]).all(), f"{backend} {kind}: value grads of a non-finite column not NaN"
    assert torch.isfinite(dV[~bad_in]).all(), f"{backend} {kind}: NaN leaked into other value grads"
    assert torch.isnan(ds[bad_s]).all(), f"{backend} {kind}: score grads of a non-finite column not NaN"
    assert torch.isfinite(ds[~bad_s]).all(), f"{backend} {kind}: NaN leaked into other score grads"

    # The finite columns are the op's usual result (float64 oracle written in the tests).
    if (~bad_out).any():
        Vd = V.to(dtype).double().requires_grad_()
        sd = s.double().requires_grad_()
        want = oracle(Vd, sd, COUNTS, mode)
        want_dV, want_ds = torch.autograd.grad(want, (Vd, sd), g.double())
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out[~bad_out].double(), want.detach()[~bad_out], rtol=tol, atol=tol)
        torch.testing.assert_close(dV[~bad_in].double(), want_dV[~bad_in], rtol=tol, atol=tol)
        torch.testing.assert_close(ds[~bad_s].double(), want_ds[~bad_s], rtol=tol, atol=tol * 10)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN / inf
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_columns_are_nan_and_others_exact(monkeypatch, backend, kind, mode):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the interpreter run covers the kernel's logic; GPU runs use the same code")
    _check(backend, monkeypatch, kind, mode)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_non_finite_column_across_chunks_and_channel_blocks(monkeypatch, mode):
    """Triton: a NaN score in a 16-image sample (two register chunks of NB = 8) and an inf score in
    a one-image sample, D = 37 (three channel blocks): exactly those columns are NaN, forward and
    both gradients; the others match the oracle."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter run covers the kernel's logic; GPU runs use the same code")
    device = _force_any(monkeypatch, "triton")
    counts, P, D = [16, 1, 3], 3, 37
    V, s = make(counts, P, D, torch.float32, scale=2.0, seed=9)
    s[11, 1] = float("nan")  # sample 0, patch 1 (image 11: second chunk)
    s[16, 2] = float("inf")  # sample 1, patch 2
    bad = torch.zeros(sum(counts), P, dtype=torch.bool)
    bad[:16, 1] = bad[16, 2] = True
    rows = len(counts) if mode == "shared" else sum(counts)
    g = torch.randn(rows, P, D, generator=torch.Generator().manual_seed(2))
    Vg, sg = V.clone().requires_grad_(), s.clone().requires_grad_()
    out = context_reweight(Vg.to(device), sg.to(device), cu_of(counts).to(device), mode)
    dV, ds = torch.autograd.grad(out, (Vg, sg), g.to(device))
    bad_out = torch.stack([bad[:16].any(0), bad[16], bad[17:].any(0)]) if mode == "shared" else bad
    assert torch.isnan(out[bad_out]).all() and torch.isfinite(out[~bad_out]).all()
    assert torch.isnan(dV[bad]).all() and torch.isfinite(dV[~bad]).all()
    assert torch.isnan(ds[bad]).all() and torch.isfinite(ds[~bad]).all()
    Vd, sd = V.double().requires_grad_(), torch.where(bad, 0.0, s).double().requires_grad_()
    want = oracle(Vd, sd, counts, mode)
    want_dV, want_ds = torch.autograd.grad(want, (Vd, sd), g.double())
    torch.testing.assert_close(out.detach()[~bad_out].double(), want.detach()[~bad_out], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dV[~bad].double(), want_dV[~bad], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds[~bad].double(), want_ds[~bad], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("kind", ["nan_score", "neg_inf_score_one_image", "two_columns"])
def test_non_finite_half_precision_cpu(monkeypatch, kind, mode):
    _check("cpu", monkeypatch, kind, mode, dtype=torch.bfloat16)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_value_with_finite_scores(monkeypatch, backend):
    """A NaN value with finite scores makes NaN the outputs whose support holds it; the columns
    without it are exact."""
    device = _force_any(monkeypatch, backend)
    V, s = _base(seed=5)
    cu = cu_of(COUNTS).to(device)
    V_bad = V.clone()
    V_bad[4, 1, 5] = float("nan")  # sample 2 (images 4, 5), patch 1
    out = context_reweight(V_bad.to(device), s.to(device), cu, "leave_one_out").cpu()
    assert torch.isnan(out[5, 1, 5])  # image 5's support is {4}
    shared = context_reweight(V_bad.to(device), s.to(device), cu, "shared").cpu()
    assert torch.isnan(shared[2, 1, 5])
    keep = torch.ones(sum(COUNTS), NP, dtype=torch.bool)
    keep[4:6, 1] = False
    want = oracle(V.double(), s.double(), COUNTS, "leave_one_out")
    torch.testing.assert_close(out[keep].double(), want[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_scores_below_minus_1e38_still_form_a_softmax(monkeypatch, backend):
    """Finite scores of about -2e38 (not -inf): a proper softmax, not zeros (the Triton kernel's
    running maximum started at -1e38)."""
    device = _force_any(monkeypatch, backend)
    V, s = _base()
    s = -1e38 - torch.sigmoid(s) * 1.2e38  # every score in (-2.2e38, -1e38): finite in fp32
    assert torch.isfinite(s).all()
    want = oracle(V.double(), s.double(), COUNTS, "shared")
    out = context_reweight(V.to(device), s.to(device), cu_of(COUNTS).to(device), "shared").cpu()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_upstream_gradient_stays_in_its_column(monkeypatch, backend):
    _force(monkeypatch, backend, torch.zeros(1, 1, 1))
    V, s = _base()
    g = torch.randn(sum(COUNTS), NP, ND)
    g[2, 1, 4] = float("nan")
    _, dV, ds = _run(V, s, "leave_one_out", g)
    other = torch.ones(sum(COUNTS), NP, dtype=torch.bool)
    other[1:4, 1] = False
    assert torch.isfinite(dV[other]).all() and torch.isnan(dV[~other]).any()
    assert torch.isfinite(ds[other]).all() and torch.isnan(ds[~other]).any()


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
                for where in ("value", "score", "every score"):
                    V = torch.randn(6, 3, 8)
                    s = torch.randn(6, 3)
                    if where == "value":
                        V[1, 2, 3] = value
                    elif where == "score":
                        s[1, 2] = value
                    else:
                        s.fill_(value)
                    V.requires_grad_(); s.requires_grad_()
                    out = context_reweight(V, s, cu, mode)
                    out.sum().backward()
                    assert not torch.isfinite(out).all(), (mode, value, where)
                    assert where == "value" or torch.isnan(s.grad).any(), (mode, value, where)
        print("ok")
        """
    )
    env = dict(os.environ, SAM_FAST_BACKEND="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, f"rc={r.returncode}\n{r.stderr[-2000:]}"


@_needs_triton
def test_triton_launch_is_four_calls_from_the_public_op(monkeypatch):
    """context_reweight -> dispatcher -> backend -> custom op -> kernel launch: no Python frame of
    sam_fast in between beyond those three (a deeper chain hides where the kernel is launched)."""
    import sam_fast._kernels.context_reweight as kernels

    _force_any(monkeypatch, "triton")
    stacks = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: stacks.append(
                [f.function for f in inspect.stack()[1:] if f"sam_fast{os.sep}" in f.filename])

    monkeypatch.setattr(kernels, "context_reweight_fwd_kernel", Launch())
    context_reweight(torch.randn(3, 2, 8, device=DEVICE), torch.randn(3, 2, device=DEVICE), cu_of([3]).to(DEVICE))
    assert len(stacks) == 1
    frames = stacks[0]  # sam_fast's frames, innermost (the launching function) first
    ours = frames[: frames.index("context_reweight")]
    assert len(ours) + 1 <= 4, f"context_reweight reaches its kernel launch through {ours[::-1]} (+ the launch)"


@pytest.mark.parametrize("traced", [False, True])
def test_one_validator_traced_or_not(traced):
    """The same validator runs eagerly and under torch.compile (`traced`: offsets' values unread),
    and catches the same shape, dtype and device errors in both."""
    from sam_fast.ops.context_reweight import validate_context_reweight

    V, s, cu = torch.randn(5, 3, 4), torch.randn(5, 3), cu_of([2, 3])
    validate_context_reweight(V, s, cu, "shared", traced=traced)
    bad = [(V.int(), s, cu, "shared", "values dtype"), (V, s, cu.float(), "shared", "cu_images dtype"),
           (V, s, cu[:1], "shared", "B\\+1 >= 2"), (V, s[:4], cu, "shared", "scores must be"),
           (V, s, cu, "both", "mode='both'")]
    for v, sc, c, mode, match in bad:
        with pytest.raises(ValueError, match=match):
            validate_context_reweight(v, sc, c, mode, traced=traced)
    bad_offsets = torch.tensor([0, 2, 4], dtype=torch.int32)
    if traced:
        validate_context_reweight(V, s, bad_offsets, "shared", traced=True)  # values are data: unread
    else:
        with pytest.raises(ValueError, match="must equal T=5"):
            validate_context_reweight(V, s, bad_offsets, "shared")
