import pytest
import torch

from sam_fast.ops import cross_attention


def test_matches_float64_formula_forward_and_backward():
    torch.manual_seed(0)
    q = torch.randn(3, 4, 8, 16, requires_grad=True)
    k = torch.randn(3, 4, 11, 16, requires_grad=True)
    v = torch.randn(3, 4, 11, 16, requires_grad=True)
    bias = torch.zeros(3, 1, 1, 11)
    bias[1, ..., 7:] = torch.finfo(torch.float32).min
    out = cross_attention(q, k, v, bias)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(qd @ kd.transpose(-1, -2) / 4.0 + bias.double(), -1) @ vd
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(ref, (qd, kd, vd), g)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_bad_shapes():
    with pytest.raises(ValueError, match="must be"):
        cross_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="incompatible"):
        cross_attention(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))


# -- the fused Triton kernel (under TRITON_INTERPRET=1 on CPU, see tests/conftest.py) ----------

import importlib  # noqa: E402
import os  # noqa: E402

ca = importlib.import_module("sam_fast.ops.cross_attention")  # the module (sam_fast.ops exports the function)

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") or ca._triton_import_error() is not None,
    reason="no CUDA device and TRITON_INTERPRET unset, or triton missing",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
MIN = torch.finfo(torch.float32).min


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: True)


def _oracle(q, k, v, bias, scale):
    s = q.double() @ k.double().transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, -1) @ v.double()


def _kv_views(buf, H, d):
    """(k, v) [R, H, L, d] as strided views of a [R, L, 2*H*d (+ extra)] projection buffer."""
    return tuple(buf[..., i * H * d:(i + 1) * H * d].unflatten(-1, (H, d)).transpose(1, 2) for i in (0, 1))


def _assert_grads_close(out, ref, inputs, gr=None):
    """Gradients of `out` (under test) and the float64 `ref` w.r.t. `inputs` agree; returns ours."""
    gr = torch.randn_like(out) if gr is None else gr
    got = torch.autograd.grad(out, inputs, gr)
    want = torch.autograd.grad(ref, inputs, gr.double())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    return got


def _two_stream_inputs(dtype, d=24, Lk=21, Lq=8, H=2, T=3, Tw=2, seed=0):
    """Query rows of a Q-stream (T rows) and a W-stream (Tw rows) and their K/V as strided
    views of one [R, Lk, 2*H*d + 1] buffer each, like the model's one-GEMM projection."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T + Tw, H, Lq, d, generator=g).to(DEV, dtype)
    bufs = [torch.randn(r, Lk, 2 * H * d + 1, generator=g).to(DEV, dtype) for r in (T, Tw)]
    kvs = [_kv_views(b, H, d) for b in bufs]
    return q, kvs


@needs_triton
def test_triton_backend_is_chosen_only_where_it_can_run(force_triton):
    q = torch.randn(2, 2, 4, 16, device=DEV)
    k = torch.randn(2, 2, 6, 16, device=DEV)
    assert ca._dispatch.choose(q, k, k, None, 0.0, None).name == "triton"
    reasons = ca._dispatch.reasons(q, k, k, None, 0.1, None)
    assert "dropout" in reasons["triton"]
    q12 = torch.randn(2, 2, 4, 12, device=DEV)
    assert "multiple of 8" in ca._dispatch.reasons(q12, q12, q12, None, 0.0, None)["triton"]
    full = torch.zeros(2, 1, 4, 6, device=DEV)
    assert "key-padding" in ca._dispatch.reasons(q, k, k, full, 0.0, None)["triton"]


def test_triton_refused_on_cpu_unless_forced():
    q = torch.randn(2, 2, 4, 16)
    why = ca._dispatch.reasons(q, q, q, None, 0.0, None)["triton"]
    assert why is not None and ("TRITON_INTERPRET" in why or "forced" in why or "triton" in why)


@needs_triton
@pytest.mark.parametrize("d", [24, 64])
def test_triton_two_streams_match_float64_forward_and_backward(force_triton, d):
    """Both streams' strided K/V, odd key count, head dims 24 (padded to 32) and 64: forward and
    the gradients of q, k, v against a float64 oracle, within 2x PyTorch's own fp32 error."""
    q, kvs = _two_stream_inputs(torch.float32, d=d)
    scale = d ** -0.5
    q = q.requires_grad_()
    kvs = [(k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in kvs]
    T = kvs[0][0].shape[0]
    parts = [q[:T], q[T:]]
    for (k, v), qq in zip(kvs, parts):
        out = ca.cross_attention(qq, k, v, None, scale=scale)
        ref = _oracle(qq, k, v, None, scale)
        sdpa = ca.cross_attention_ref(qq, k, v, None, scale=scale)
        budget = 2 * (sdpa.double() - ref).abs().max().item() + 1e-6
        assert (out.double() - ref).abs().max().item() <= budget
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        want = torch.autograd.grad(ref, (q, k, v), g.double())
        base = torch.autograd.grad(sdpa, (q, k, v), g)
        for a, b, c in zip(got, want, base):
            assert (a.double() - b).abs().max().item() <= 2 * (c.double() - b).abs().max().item() + 1e-6


@needs_triton
def test_triton_self_attention_with_padding_bias(force_triton):
    """Self-attention over [queries ; text] rows with text padding (a [N, 1, 1, L] bias), rows
    longer than one query block."""
    g = torch.Generator().manual_seed(1)
    N, H, L, d = 3, 2, 70, 16
    x = torch.randn(N, H, L, d, generator=g).to(DEV).requires_grad_()
    bias = torch.zeros(N, 1, 1, L, device=DEV)
    bias[1, ..., 60:] = MIN
    out = ca.cross_attention(x, x, x, bias)
    ref = _oracle(x, x, x, bias, d ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    gr = torch.randn_like(out)
    (a,) = torch.autograd.grad(out, x, gr)
    (b,) = torch.autograd.grad(ref, x, gr.double())
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


@needs_triton
def test_triton_half_precision_forward(force_triton):
    q, kvs = _two_stream_inputs(torch.float16, d=32)
    k, v = kvs[0]
    qq = q[: k.shape[0]]
    out = ca.cross_attention(qq, k, v)
    ref = _oracle(qq, k, v, None, 32 ** -0.5)
    sdpa = ca.cross_attention_ref(qq.float(), k.float(), v.float()).half()  # fp16 rounding of the exact result
    assert out.dtype == torch.float16
    assert (out.double() - ref).abs().max().item() <= 2 * (sdpa.double() - ref).abs().max().item() + 1e-3


@needs_triton
def test_triton_op_is_registered_with_fake_and_autograd(force_triton):
    q, kvs = _two_stream_inputs(torch.float32, d=16, Lk=9, Lq=4, T=1, Tw=1)
    k, v = (t.contiguous() for t in kvs[0])
    q1 = q[:1].contiguous().requires_grad_()
    k2, v2 = (t.contiguous() for t in kvs[1])
    for args in ((q1, k, v, None, None, None, 1, None, 0.25),
                 (torch.cat([q1, q1]).detach().requires_grad_(), k, v, k2, v2,
                  torch.tensor([0], dtype=torch.int32, device=DEV),
                  1, None, 0.25)):
        torch.library.opcheck(torch.ops.sam_fast.cross_attention_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_triton
@pytest.mark.parametrize("rows2", [None, [1, 0, 1, 1]])
def test_triton_streams_one_launch_matches_float64(force_triton, rows2):
    """Q-stream (3 rows, own K/V) and W-stream (4 rows) in one call; with rows2 several W rows
    share a K/V row (shared-mode dedup) and their K/V gradients add up."""
    d, H, Lq, Lk = 16, 2, 8, 19
    g = torch.Generator().manual_seed(3)
    n2 = 4 if rows2 is not None else 2
    q = torch.randn(3 + 4, H, Lq, d, generator=g).to(DEV).requires_grad_()
    buf1 = torch.randn(3, Lk, 2 * H * d + 1, generator=g).to(DEV).requires_grad_()
    buf2 = torch.randn(n2 if rows2 is None else 2, Lk, 2 * H * d + 1, generator=g).to(DEV).requires_grad_()
    if rows2 is None:
        buf2 = torch.randn(4, Lk, 2 * H * d + 1, generator=g).to(DEV).requires_grad_()

    k1, v1 = _kv_views(buf1, H, d)
    k2, v2 = _kv_views(buf2, H, d)
    r2 = None if rows2 is None else torch.tensor(rows2, device=DEV)
    assert ca._streams.choose(q, k1, v1, k2, v2, r2, 0.0, None).name == "triton"
    out = ca.cross_attention_streams(q, k1, v1, k2, v2, r2)
    k2r, v2r = (k2, v2) if r2 is None else (k2.index_select(0, r2), v2.index_select(0, r2))
    ref = torch.cat([_oracle(q[:3], k1, v1, None, d ** -0.5), _oracle(q[3:], k2r, v2r, None, d ** -0.5)])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    _assert_grads_close(out, ref, (q, buf1, buf2))
    # the reference backend agrees
    torch.testing.assert_close(ca.cross_attention_streams_ref(q, k1, v1, k2, v2, r2).double(), ref, rtol=1e-5, atol=2e-6)


def test_streams_bad_shapes():
    q = torch.randn(5, 2, 4, 8)
    k = torch.randn(3, 2, 6, 8)
    with pytest.raises(ValueError, match="query rows"):
        ca.cross_attention_streams(q, k, k)
    with pytest.raises(ValueError, match="rows2"):
        ca.cross_attention_streams(q, k, k, k[:1], k[:1], torch.tensor([0, 0, 0]))


def _mix_case(split, seed=5, d=16, H=2, Lq=8, Lk=19, dtype=torch.float32):
    """T=4 images' K/V (strided views of one buffer) and 3 mixed rows, ragged: row 1 has two live
    slots and one padding slot (weight 0), like a leave_one_out W-stream of samples [4] and [3]."""
    g = torch.Generator().manual_seed(seed)
    T, M = 4, 3
    q = torch.randn(split + 3, H, Lq, d, generator=g).to(DEV, dtype).requires_grad_()
    buf = torch.randn(T, Lk, 2 * H * d + 1, generator=g).to(DEV, dtype).requires_grad_()
    scores = torch.randn(3, M, Lk, generator=g).to(DEV).requires_grad_()
    index = torch.tensor([[1, 2, 3], [0, 2, 0], [0, 1, 2]], device=DEV)
    live = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], device=DEV).bool()
    return q, buf, scores, index, live


def _mix_oracle(q, buf, scores, index, live, split, H, d):
    """float64: materialise the mixed K/V, then attention per stream."""
    k, v = _kv_views(buf.double(), H, d)
    w = torch.softmax(scores.double().masked_fill(~live[:, :, None], float("-inf")), 1)
    kh = sum(w[:, s, None, :, None] * k[index[:, s]] for s in range(index.shape[1]))
    vh = sum(w[:, s, None, :, None] * v[index[:, s]] for s in range(index.shape[1]))
    outs = [_oracle(q[:split], k[:split], v[:split], None, d ** -0.5)] if split else []
    return torch.cat(outs + [_oracle(q[split:], kh, vh, None, d ** -0.5)])


@needs_triton
@pytest.mark.parametrize("split", [4, 0])
def test_triton_mixed_kv_formed_in_kernel_match_float64(force_triton, split):
    """The leave_one_out W-stream: mixed K/V formed in the kernel from the images' K/V and softmax
    weights (padding slots at weight 0), with the Q-stream in the same launch (split=4) or alone
    (split=0, the W-stream at layer k). Values and the gradients of q, the K/V buffer and the
    scores (through the weights) against float64."""
    d, H = 16, 2
    q, buf, scores, index, live = _mix_case(split)
    k, v = _kv_views(buf, H, d)
    w = torch.softmax(scores.masked_fill(~live[:, :, None], float("-inf")), 1)
    k1, v1 = k[:split], v[:split]
    assert ca._streams.choose(q, k1, v1, k, v, None, 0.0, None, mix=(index, w)).name == "triton"
    launches = []
    real = ca._triton_fwd
    ca_fwd = lambda *a, **kw: launches.append(a[-1] is not None) or real(*a, **kw)  # noqa: E731
    try:
        ca._triton_fwd = ca_fwd
        out = ca.cross_attention_streams(q, k1, v1, k, v, mix=(index, w))
    finally:
        ca._triton_fwd = real
    assert launches == [True]  # one launch, with the mixing plan
    ref = _mix_oracle(q, buf, scores, index, live, split, H, d)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    got = _assert_grads_close(out, ref, (q, buf, scores))
    assert got[2].abs().sum() > 0  # the scores (Adaptive Adjustment) get a gradient
    # the reference backend (materialised mix) agrees
    torch.testing.assert_close(ca.cross_attention_streams_ref(q, k1, v1, k, v, mix=(index, w)).double(), ref,
                               rtol=1e-5, atol=2e-6)


@needs_triton
def test_triton_mixed_half_precision_within_budget(force_triton):
    """fp16 inputs: the kernel's error against float64 stays within 2x that of SDPA on the
    materialised fp16 K/V (PyTorch's own fp16 computation of the same thing)."""
    d, H = 16, 2
    q, buf, scores, index, live = _mix_case(4, seed=7, dtype=torch.float16)
    k, v = _kv_views(buf, H, d)
    w = torch.softmax(scores.masked_fill(~live[:, :, None], float("-inf")), 1)
    with torch.no_grad():
        ours = ca.cross_attention_streams(q, k[:4], v[:4], k, v, mix=(index, w))
        torch_own = ca.cross_attention_streams_ref(q, k[:4], v[:4], k, v, mix=(index, w))
        ref = _mix_oracle(q, buf, scores, index, live, 4, H, d)
    assert (ours.double() - ref).abs().max() <= 2 * (torch_own.double() - ref).abs().max() + 1e-6


@needs_triton
def test_triton_mixed_op_passes_opcheck(force_triton):
    d, H = 16, 2
    q, buf, scores, index, live = _mix_case(4)
    k, v = _kv_views(buf, H, d)
    w = torch.softmax(scores.masked_fill(~live[:, :, None], float("-inf")), 1).detach().contiguous()
    args = (q.detach(), k[:4].detach(), v[:4].detach(), k.detach(), v.detach(), None, 4, None, 0.25,
            index.to(torch.int32), w)
    torch.library.opcheck(torch.ops.sam_fast.cross_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    dk_hat = torch.randn(3, H, k.shape[2], d, device=DEV)  # the kernel reads it: on the GPU where there is one
    torch.library.opcheck(torch.ops.sam_fast.mix_weight_grad.default,
                          (dk_hat, dk_hat.clone(), k.detach(), v.detach(), index.to(torch.int32)),
                          test_utils=("test_schema", "test_faketensor"))
    # and its values against float64: sum over heads and head dim of dK-hat * K_m + dV-hat * V_m
    got = torch.ops.sam_fast.mix_weight_grad(dk_hat, dk_hat * 2, k.detach(), v.detach(), index.to(torch.int32))
    kd, vd, gd = k.detach().double(), v.detach().double(), dk_hat.double()
    want = torch.stack([(gd * kd[index[:, s]] + 2 * gd * vd[index[:, s]]).sum((1, 3)) for s in range(index.shape[1])], 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_mixed_streams_bad_inputs():
    q = torch.randn(5, 2, 4, 8)
    k = torch.randn(3, 2, 6, 8)
    idx = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="mix index"):
        ca.cross_attention_streams(q, k, k, k, k, mix=(idx[:1], torch.ones(1, 2, 6)))
    with pytest.raises(ValueError, match="mix weight"):
        ca.cross_attention_streams(q, k, k, k, k, mix=(idx, torch.ones(2, 2, 5)))
    with pytest.raises(ValueError, match="not both"):
        ca.cross_attention_streams(q, k, k, k, k, torch.tensor([0, 1]), mix=(idx, torch.ones(2, 2, 6)))
    with pytest.raises(ValueError, match="need key2"):
        ca.cross_attention_streams(q[:3], k, k, mix=(idx, torch.ones(2, 2, 6)))


def test_streams_backend_reports_the_choice(monkeypatch):
    """CPU tensors take the reference backend unless the interpreter is allowed (then, where
    triton imports, the kernel): what the model asks before forming K/V in the kernel."""
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    assert ca.streams_backend(2, 8, torch.float32, "cpu", mixed=True) == "reference"
    assert ca.streams_backend(2, 8, torch.float32, "cpu", dropout_p=0.1, mixed=True) == "reference"
    if os.environ.get("TRITON_INTERPRET") == "1" and ca._triton_import_error() is None:
        monkeypatch.setattr(ca, "_interpreter_allowed", lambda: True)
        assert ca.streams_backend(2, 8, torch.float32, "cpu", mixed=True) == "triton"
        assert ca.streams_backend(2, 8, torch.float32, "cpu", dropout_p=0.1, mixed=True) == "reference"  # the kernel has no dropout


def test_plain_streams_take_sdpa_on_gpus(monkeypatch):
    """On CUDA the fused kernel is chosen only for mixed (leave_one_out) K/V, where it was 1.4-2x
    faster than materialising them on an H200; plain streams were 1.8-2.2x slower there than one
    SDPA call per stream, so they go to SDPA unless the Triton backend is forced."""
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    assert "SDPA" in ca._sdpa_preferred("cuda", mixed=False)
    assert ca._sdpa_preferred("cuda", mixed=True) is None
    assert ca._sdpa_preferred("cpu", mixed=False) is None  # the interpreter (tests) keeps the kernel
    monkeypatch.setenv("SAM_FAST_BACKEND", "triton")
    assert ca._sdpa_preferred("cuda", mixed=False) is None
    if torch.cuda.is_available() and ca._triton_import_error() is None:
        monkeypatch.delenv("SAM_FAST_BACKEND")
        assert ca.streams_backend(12, 64, torch.bfloat16, "cuda", mixed=False) == "reference"
        assert ca.streams_backend(12, 64, torch.bfloat16, "cuda", mixed=True) == "triton"
