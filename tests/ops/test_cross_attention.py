"""The Q-former attention ops (sam_fast.ops.cross_attention): `cross_attention` and
`cross_attention_streams` (both streams in one call, rows2 gathering, mixing plans) on every
backend (``triton``: sam_fast/_kernels/cross_attention.py; ``reference``: SDPA) against one float64 oracle,
forward and every gradient, within one error-budget table; the Triton op's registration, the
backend choice and bad inputs.

Without a GPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest.py).
"""

import importlib
import os

import pytest
import torch
from _budget import Budget, max_error

from sam_fast.ops import cross_attention

ca = importlib.import_module("sam_fast.ops.cross_attention")  # the module (sam_fast.ops exports the function)

# dtype -> error budget. `rule`: the 2x rule (error against float64 <= 2 x the error of PyTorch's
# own computation in the same dtype, + atol); `rounding` (fp16): against the fp16 rounding of the
# exact result instead, a smaller baseline than PyTorch's error, so with an allowance for the
# kernel's fp16/tf32 matmul inputs; `out` / `grad`: assert_close tolerances of the forward and of
# the gradients against float64
BUDGET = {
    torch.float32: dict(rule=Budget(factor=2, floor=0.0, atol=1e-6), out=dict(rtol=1e-5, atol=2e-6),
                        grad=dict(rtol=1e-4, atol=1e-5)),
    torch.float16: dict(rule=Budget(factor=2, floor=0.0, atol=1e-6), rounding=Budget(factor=2, floor=0.0, atol=1e-3)),
}
BACKENDS = ["triton", "reference"]
CAN_TRITON = (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") \
    and ca._triton_import_error() is None
needs_triton = pytest.mark.skipif(not CAN_TRITON, reason="no CUDA device and TRITON_INTERPRET unset, or triton missing")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
MIN = torch.finfo(torch.float32).min


# -- the float64 oracle --------------------------------------------------------------------------


def _oracle(q, k, v, bias, scale):
    """``softmax(q k^T * scale + bias) v`` in float64."""
    s = q.double() @ k.double().transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, -1) @ v.double()


def _mix_oracle(q, buf, scores, index, live, split, H, d):
    """float64: materialise the mixed K/V, then the oracle per stream."""
    k, v = _kv_views(buf.double(), H, d)
    w = torch.softmax(scores.double().masked_fill(~live[:, :, None], float("-inf")), 1)
    kh = sum(w[:, s, None, :, None] * k[index[:, s]] for s in range(index.shape[1]))
    vh = sum(w[:, s, None, :, None] * v[index[:, s]] for s in range(index.shape[1]))
    outs = [_oracle(q[:split], k[:split], v[:split], None, d ** -0.5)] if split else []
    return torch.cat(outs + [_oracle(q[split:], kh, vh, None, d ** -0.5)])


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each backend forced (SAM_FAST_BACKEND); the Triton one skipped where it cannot run."""
    if request.param == "triton" and not CAN_TRITON:
        pytest.skip("no CUDA device and TRITON_INTERPRET unset, or triton missing")
    monkeypatch.setenv("SAM_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: True)


def _kv_views(buf, H, d):
    """(k, v) [R, H, L, d] as strided views of a [R, L, 2*H*d (+ extra)] projection buffer."""
    return tuple(buf[..., i * H * d:(i + 1) * H * d].unflatten(-1, (H, d)).transpose(1, 2) for i in (0, 1))


def _assert_close(got, exact, kind, dtype=torch.float32):
    torch.testing.assert_close(got.double(), exact.double(), **BUDGET[dtype][kind])


def _assert_grads_close(out, ref, inputs, gr=None):
    """Gradients of `out` (under test) and the float64 `ref` w.r.t. `inputs` agree; returns ours."""
    gr = torch.randn_like(out) if gr is None else gr
    got = torch.autograd.grad(out, inputs, gr)
    want = torch.autograd.grad(ref, inputs, gr.double())
    for a, b in zip(got, want, strict=True):
        _assert_close(a, b, "grad")
    return got


def _assert_rule(fast, plain, exact, dtype=torch.float32, kind="rule"):
    """`fast`'s error against the float64 `exact` is within the budget `kind` of `plain`'s error."""
    rule = BUDGET[dtype][kind]
    assert max_error(fast, exact) <= rule.allowed(max_error(plain, exact), exact.abs().max().item())


def _two_stream_inputs(dtype, d=24, Lk=21, Lq=8, H=2, T=3, Tw=2, seed=0):
    """Query rows of a Q-stream (T rows) and a W-stream (Tw rows) and their K/V as strided
    views of one [R, Lk, 2*H*d + 1] buffer each, like the model's one-GEMM projection."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T + Tw, H, Lq, d, generator=g).to(DEV, dtype)
    bufs = [torch.randn(r, Lk, 2 * H * d + 1, generator=g).to(DEV, dtype) for r in (T, Tw)]
    kvs = [_kv_views(b, H, d) for b in bufs]
    return q, kvs


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


# -- cross_attention on every backend ------------------------------------------------------------


def test_matches_float64_formula_forward_and_backward(backend):
    """A key-padding bias (sample 1 sees 7 of 11 keys): output and the gradients of q, k, v."""
    torch.manual_seed(0)
    q = torch.randn(3, 4, 8, 16).to(DEV).requires_grad_()
    k = torch.randn(3, 4, 11, 16).to(DEV).requires_grad_()
    v = torch.randn(3, 4, 11, 16).to(DEV).requires_grad_()
    bias = torch.zeros(3, 1, 1, 11, device=DEV)
    bias[1, ..., 7:] = MIN
    assert ca._dispatch.choose(q, k, v, bias, 0.0, None).name == backend
    out = cross_attention(q, k, v, bias)
    ref = _oracle(q, k, v, bias, 16 ** -0.5)
    _assert_close(out, ref, "out")
    _assert_grads_close(out, ref, (q, k, v))


@pytest.mark.parametrize("d", [24, 64])
def test_two_streams_match_float64_forward_and_backward(backend, d):
    """Both streams' strided K/V, odd key count, head dims 24 (padded to 32 by the kernel) and 64:
    forward and the gradients of q, k, v against the float64 oracle, within the 2x rule."""
    q, kvs = _two_stream_inputs(torch.float32, d=d)
    scale = d ** -0.5
    q = q.requires_grad_()
    kvs = [(k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in kvs]
    T = kvs[0][0].shape[0]
    parts = [q[:T], q[T:]]
    for (k, v), qq in zip(kvs, parts):
        assert ca._dispatch.choose(qq, k, v, None, 0.0, scale).name == backend
        out = ca.cross_attention(qq, k, v, None, scale=scale)
        ref = _oracle(qq, k, v, None, scale)
        sdpa = ca.cross_attention_ref(qq, k, v, None, scale=scale)
        _assert_rule(out, sdpa, ref)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        want = torch.autograd.grad(ref, (q, k, v), g.double())
        base = torch.autograd.grad(sdpa, (q, k, v), g)
        for a, b, c in zip(got, want, base):
            _assert_rule(a, c, b)


def test_self_attention_with_padding_bias(backend):
    """Self-attention over [queries ; text] rows with text padding (a [N, 1, 1, L] bias), rows
    longer than one query block of the kernel."""
    g = torch.Generator().manual_seed(1)
    N, H, L, d = 3, 2, 70, 16
    x = torch.randn(N, H, L, d, generator=g).to(DEV).requires_grad_()
    bias = torch.zeros(N, 1, 1, L, device=DEV)
    bias[1, ..., 60:] = MIN
    out = ca.cross_attention(x, x, x, bias)
    ref = _oracle(x, x, x, bias, d ** -0.5)
    _assert_close(out, ref, "out")
    gr = torch.randn_like(out)
    (a,) = torch.autograd.grad(out, x, gr)
    (b,) = torch.autograd.grad(ref, x, gr.double())
    _assert_close(a, b, "grad")


def test_half_precision_forward(backend):
    """fp16: the error against float64 within the 2x rule of the fp16 rounding of the exact
    result (SDPA in fp32, rounded)."""
    q, kvs = _two_stream_inputs(torch.float16, d=32)
    k, v = kvs[0]
    qq = q[: k.shape[0]]
    out = ca.cross_attention(qq, k, v)
    ref = _oracle(qq, k, v, None, 32 ** -0.5)
    sdpa = ca.cross_attention_ref(qq.float(), k.float(), v.float()).half()  # fp16 rounding of the exact result
    assert out.dtype == torch.float16
    _assert_rule(out, sdpa, ref, torch.float16, "rounding")


# -- cross_attention_streams on every backend ----------------------------------------------------


@pytest.mark.parametrize("rows2", [None, [1, 0, 1, 1]])
def test_streams_one_call_matches_float64(backend, rows2):
    """Q-stream (3 rows, own K/V) and W-stream (4 rows) in one call (one launch on Triton); with
    rows2 several W rows share a K/V row (shared-mode dedup) and their K/V gradients add up."""
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
    assert ca._streams.choose(q, k1, v1, k2, v2, r2, 0.0, None).name == backend
    out = ca.cross_attention_streams(q, k1, v1, k2, v2, r2)
    k2r, v2r = (k2, v2) if r2 is None else (k2.index_select(0, r2), v2.index_select(0, r2))
    ref = torch.cat([_oracle(q[:3], k1, v1, None, d ** -0.5), _oracle(q[3:], k2r, v2r, None, d ** -0.5)])
    _assert_close(out, ref, "out")
    _assert_grads_close(out, ref, (q, buf1, buf2))
    # the reference function agrees
    _assert_close(ca.cross_attention_streams_ref(q, k1, v1, k2, v2, r2), ref, "out")


@pytest.mark.parametrize("split", [4, 0])
def test_mixed_kv_match_float64(backend, split):
    """The leave_one_out W-stream: mixed K/V from the images' K/V and softmax weights (padding
    slots at weight 0), with the Q-stream in the same call (split=4) or alone (split=0, the
    W-stream at layer k). Triton forms them in the kernel in one launch; the reference
    materialises them. Values and the gradients of q, the K/V buffer and the scores (through
    the weights) against float64."""
    d, H = 16, 2
    q, buf, scores, index, live = _mix_case(split)
    k, v = _kv_views(buf, H, d)
    w = torch.softmax(scores.masked_fill(~live[:, :, None], float("-inf")), 1)
    k1, v1 = k[:split], v[:split]
    assert ca._streams.choose(q, k1, v1, k, v, None, 0.0, None, mix=(index, w)).name == backend
    launches = []
    real = ca._triton_fwd
    ca_fwd = lambda *a, **kw: launches.append(a[-1] is not None) or real(*a, **kw)  # noqa: E731
    try:
        ca._triton_fwd = ca_fwd
        out = ca.cross_attention_streams(q, k1, v1, k, v, mix=(index, w))
    finally:
        ca._triton_fwd = real
    assert launches == ([True] if backend == "triton" else [])  # one launch, with the mixing plan
    ref = _mix_oracle(q, buf, scores, index, live, split, H, d)
    _assert_close(out, ref, "out")
    got = _assert_grads_close(out, ref, (q, buf, scores))
    assert got[2].abs().sum() > 0  # the scores (Adaptive Adjustment) get a gradient
    # the reference function (materialised mix) agrees
    _assert_close(ca.cross_attention_streams_ref(q, k1, v1, k, v, mix=(index, w)), ref, "out")


def test_mixed_half_precision_within_budget(backend):
    """fp16 inputs: the error against float64 stays within the 2x rule of SDPA on the
    materialised fp16 K/V (PyTorch's own fp16 computation of the same thing)."""
    d, H = 16, 2
    q, buf, scores, index, live = _mix_case(4, seed=7, dtype=torch.float16)
    k, v = _kv_views(buf, H, d)
    w = torch.softmax(scores.masked_fill(~live[:, :, None], float("-inf")), 1)
    with torch.no_grad():
        ours = ca.cross_attention_streams(q, k[:4], v[:4], k, v, mix=(index, w))
        torch_own = ca.cross_attention_streams_ref(q, k[:4], v[:4], k, v, mix=(index, w))
        ref = _mix_oracle(q, buf, scores, index, live, 4, H, d)
    _assert_rule(ours, torch_own, ref, torch.float16)


# -- the Triton backend: choice and registration -------------------------------------------------


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


@pytest.mark.parametrize("allowed", [False, True])
@pytest.mark.parametrize("forced", ["", "reference", "triton", "cpu"])
def test_mixes_in_kernel_answers_as_the_dispatch_without_a_tensor(monkeypatch, allowed, forced):
    """`mixes_in_kernel` decides from device type, dtype and sizes alone (the model asks it once,
    not per call) and gives the answer of the streams op's own dispatch on mixed inputs of that
    kind, for every forced backend ("cpu" is no backend of this op: ignored), dtype, head dim and
    dropout here (tests/modules/test_schedules.py checks that the decision calls no torch function)."""
    from sam_fast.ops.dispatch import BackendUnavailable

    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: allowed)
    if forced:
        monkeypatch.setenv("SAM_FAST_BACKEND", forced)
    else:
        monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    for dtype, d, p in [(torch.float32, 8, 0.0), (torch.float64, 8, 0.0), (torch.bfloat16, 8, 0.0),
                        (torch.float32, 12, 0.0), (torch.float32, 8, 0.1)]:
        try:
            want = ca.streams_backend(2, d, dtype, "cpu", dropout_p=p, mixed=True) == "triton"
        except BackendUnavailable:  # the forced kernel cannot run these: the model merges once
            want = False
        assert ca.mixes_in_kernel(2, d, dtype, "cpu", p) is want, (dtype, d, p, forced, allowed)
        assert ca.mixes_in_kernel(2, d, dtype, torch.device("cpu"), p) is want


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


# -- bad inputs ----------------------------------------------------------------------------------


def test_bad_shapes():
    with pytest.raises(ValueError, match="must be"):
        cross_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="incompatible"):
        cross_attention(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))


def test_streams_bad_shapes():
    q = torch.randn(5, 2, 4, 8)
    k = torch.randn(3, 2, 6, 8)
    with pytest.raises(ValueError, match="query rows"):
        ca.cross_attention_streams(q, k, k)
    with pytest.raises(ValueError, match="rows2"):
        ca.cross_attention_streams(q, k, k, k[:1], k[:1], torch.tensor([0, 0, 0]))


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
