"""context_reweight (public op, reference backend) against a float64 oracle written here."""

import pytest
import torch

from sam_fast.ops import context_reweight, context_reweight_ref


def oracle(F, w, b, counts, mode):
    """Direct formula in float64, image by image (no masking tricks)."""
    F = F.double()
    s = F @ w.double().reshape(-1) + (b.double().reshape(()) if b is not None else 0.0) if w is not None else F.new_zeros(F.shape[:2])
    out, start = [], 0
    for n in counts:
        idx = list(range(start, start + n))
        if mode == "shared":
            a = torch.softmax(s[idx], 0)
            out.append((a[..., None] * F[idx]).sum(0, keepdim=True))
        else:
            for i in idx:
                others = [m for m in idx if m != i]
                if not others:
                    out.append(F[i : i + 1] * 0)
                    continue
                a = torch.softmax(s[others], 0)
                out.append((a[..., None] * F[others]).sum(0, keepdim=True))
        start += n
    return torch.cat(out)


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
    ref = oracle(F, w, b, counts, mode)
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
        ref = oracle(F, w, b, counts, mode)
        out = context_reweight(F, w, b, cu_of(counts), mode)
        assert out.dtype == dtype and torch.isfinite(out).all()
        plain = oracle(F.double(), w.double(), b.double(), counts, mode).to(dtype)  # torch rounding of the result
        budget = 2 * (plain.double() - ref).abs().max().item() + 1e-2 * (1 if dtype != torch.float32 else 1e-3)
        assert (out.double() - ref).abs().max().item() <= budget


def test_non_contiguous_and_int64_offsets():
    F = torch.randn(8, 6, 5).transpose(1, 2)  # [8, 5, 6] non-contiguous
    w = torch.randn(6)
    out = context_reweight(F, w, torch.zeros(1), cu_of([3, 5], torch.int64), "leave_one_out")
    torch.testing.assert_close(out.double(), oracle(F, w, torch.zeros(1), [3, 5], "leave_one_out"), rtol=1e-5, atol=1e-5)


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


def oracle_from_scores(F, s, counts, mode):
    """The formula with the scores given (so d/ds of the oracle is available)."""
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


def forward_and_grads(F, w, b, counts, mode, g, fn=None):
    """(out, dF, dw, db, ds) of `fn` (default: the formula in F's dtype) for upstream grad g."""
    F = F.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    if fn is None:
        s = F @ w + b
        s.retain_grad()
        out = oracle_from_scores(F, s, counts, mode)
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
