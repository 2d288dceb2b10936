"""The LLaMA element-wise ops (sam_fast.ops.llama): RMSNorm and SwiGLU on every backend
(``triton``: sam_fast/_kernels/llama.py; ``torch``: the lean autograd Functions; ``reference``: Hugging
Face's formulas) against one float64 oracle per op, forward and every gradient, within one
error-budget table.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) on small
shapes, one program per launch. Triton in bf16 is not run here (the interpreter's bf16 arithmetic
is broken); tests/test_triton_gpu_compile.py compiles the bf16 kernels.
"""

from __future__ import annotations

import os

import pytest
import torch
from _budget import Budget, assert_within_budget, max_error, spy_calls

import sam_fast.ops.llama as llama_ops
from sam_fast.ops import rms_norm, rms_norm_ref, swiglu, swiglu_ref
from sam_fast.ops.dispatch import dispatcher

# dtype -> error budget of both ops: fast error <= 2 x PyTorch's error (same dtype, vs float64)
# + floor x max|float64 result|
BUDGET = {
    torch.float32: Budget(factor=2, floor=2e-6),
    torch.float16: Budget(factor=2, floor=2.0**-9),
    torch.bfloat16: Budget(factor=2, floor=2.0**-6),
}
BACKENDS = ["triton", "torch", "reference"]
DTYPES = list(BUDGET)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
LAUNCHERS = {"rms_fwd": "_rms_norm_forward", "rms_bwd": "_rms_norm_backward",
             "swiglu_fwd": "_swiglu_forward", "swiglu_bwd": "_swiglu_backward"}


# -- the float64 oracles (the formulas, written out) ---------------------------------------------


def rms_oracle(x, w, eps):
    """RMSNorm in float64: ``w * x / sqrt(mean(x^2) + eps)``."""
    x = x.double()
    return w.double() * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def swiglu_oracle(a, b):
    """SwiGLU in float64: ``a * sigmoid(a) * b``."""
    a = a.double()
    return a / (1 + torch.exp(-a)) * b.double()


# -- helpers -------------------------------------------------------------------------------------


def _run(fn, inputs, needs, g):
    """(out, grads of the inputs that need one) of fn(*inputs) for upstream gradient g."""
    ins = [t.detach().clone().requires_grad_(n) for t, n in zip(inputs, needs)]
    out = fn(*ins)
    grads = torch.autograd.grad(out, [t for t in ins if t.requires_grad], g.to(out.dtype))
    return [out.detach(), *grads], ins


def _rows(shape, dtype, seed):
    """Rows of very different scales (1e-3 .. 1e2), so rstd spans orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    scale = 10.0 ** torch.randint(-3, 3, (*shape[:-1], 1), generator=g).float()
    return (x * scale).to(dtype)


def _force(monkeypatch, backend, dtype, op, *sample):
    """Force `backend` (SAM_FAST_BACKEND) and skip where it cannot run `sample`; returns the
    count of Triton launches per launcher (spied), so a test can check the kernels really ran."""
    if backend == "triton" and not CAN_TRITON:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton bf16 is compiled by tests/test_triton_gpu_compile.py, not run here")
    monkeypatch.setenv("SAM_FAST_BACKEND", backend)
    why = dispatcher(op).reasons(*sample)[backend]
    if why is not None:
        pytest.skip(f"{backend} backend cannot run here: {why}")
    return spy_calls(monkeypatch, llama_ops, LAUNCHERS)


# -- RMSNorm -------------------------------------------------------------------------------------

# name -> (shape, eps, weight trainable, seed of x; the weight takes seed + 1, the upstream grad + 2)
RMS_CASES = {
    "3d-D48-frozen": ((2, 7, 48), 1e-6, False, 0),
    "2d-D40-frozen": ((5, 40), 1e-6, False, 0),
    "3d-D24-trainable": ((3, 5, 24), 1e-5, True, 3),
    "3d-D40-frozen": ((3, 7, 40), 1e-6, False, 3),
    "3d-D40-trainable": ((3, 7, 40), 1e-6, True, 3),
}


@pytest.mark.parametrize("case", RMS_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_matches_oracle(monkeypatch, backend, dtype, case):
    """Output, dx and (trainable weight) dw within the budget; a frozen weight gets no gradient;
    the lean and reference backends' forward is the reference's, bit for bit."""
    shape, eps, weight_grad, seed = RMS_CASES[case]
    D = shape[-1]
    x = _rows(shape, dtype, seed).to(DEVICE)
    w = (1 + 0.5 * torch.randn(D, generator=torch.Generator().manual_seed(seed + 1))).to(dtype).to(DEVICE)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    calls = _force(monkeypatch, backend, dtype, "rms_norm", x, w, eps)
    assert dispatcher("rms_norm").choose(x, w, eps).name == backend
    needs = (True, weight_grad)
    exact, _ = _run(lambda a, b: rms_oracle(a, b, eps), (x.double(), w.double()), needs, g.double())
    plain, _ = _run(lambda a, b: rms_norm_ref(a, b, eps), (x, w), needs, g)
    fast, ins = _run(lambda a, b: rms_norm(a, b, eps), (x, w), needs, g)
    assert all(t.dtype == dtype for t in fast)
    if not weight_grad:
        assert ins[1].grad is None
    if backend != "triton":
        assert torch.equal(fast[0], plain[0])  # the same forward ops as the reference
    assert_within_budget(fast, plain, exact, ("out", "dx", "dw")[: len(fast)], BUDGET[dtype])
    if backend == "triton":
        assert calls["rms_fwd"] == 1 and calls["rms_bwd"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_fp32_weight_half_input(monkeypatch, backend):
    """An fp32 weight with fp16 activations: fp32 output, as Hugging Face's module gives."""
    x = _rows((4, 32), torch.float16, 6).to(DEVICE)
    w = torch.linspace(0.5, 1.5, 32).to(DEVICE)
    _force(monkeypatch, backend, torch.float16, "rms_norm", x, w, 1e-6)
    out = rms_norm(x, w, 1e-6)
    want = rms_norm_ref(x, w, 1e-6)
    assert out.dtype == want.dtype == torch.float32
    ref = rms_oracle(x, w, 1e-6)
    assert max_error(out, ref) <= BUDGET[torch.float16].allowed(max_error(want, ref), ref.abs().max().item())


def test_lean_torch_backend_on_cpu_by_default(monkeypatch):
    """Without forcing, CPU tensors take the lean ``torch`` backend: its forward is HF's module's,
    bit for bit; the reference stays HF's formula."""
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = _rows((4, 24), torch.float32, 9)
    assert dispatcher("rms_norm").choose(x, torch.ones(24), 1e-6).name == "torch"
    assert dispatcher("swiglu").choose(x, x).name == "torch"
    hf = LlamaRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.linspace(0.5, 1.5, 24))
    assert torch.equal(rms_norm(x, hf.weight, 1e-5), hf(x))
    for dtype in (torch.float16, torch.bfloat16):  # the reference is HF's formula in every dtype
        assert torch.equal(rms_norm_ref(x.to(dtype), hf.weight.to(dtype), 1e-5), hf.to(dtype)(x.to(dtype)))


# -- SwiGLU --------------------------------------------------------------------------------------


def _swiglu_tails(dtype):
    """[3, 7, 40] gates spread by 4 with silu's both tails and its curved middle (+-30, 0, and
    -1.2785, where silu' = 0) in the first entries; up and the upstream gradient standard normal."""
    gen = torch.Generator().manual_seed(7)
    a = (torch.randn(3, 7, 40, generator=gen) * 4).to(dtype)
    b = torch.randn(3, 7, 40, generator=gen).to(dtype)
    a.view(-1)[:4] = torch.tensor([-30.0, 30.0, 0.0, -1.2785], dtype=dtype)
    return a, b, torch.randn(3, 7, 40, generator=gen)


def _swiglu_odd(dtype):
    """[2, 5, 33] (an odd last dimension), gate, up and upstream gradient all spread by 4."""
    gen = torch.Generator().manual_seed(6)
    a, b, g = (4 * torch.randn(2, 5, 33, generator=gen) for _ in range(3))
    return a.to(dtype), b.to(dtype), g


SWIGLU_CASES = {"tails-3d-40": _swiglu_tails, "odd-3d-33": _swiglu_odd}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_swiglu_is_hf_bit_for_bit(monkeypatch, dtype):
    """The lean backend's SwiGLU output and both gradients equal autograd of HF's formula exactly
    (its backward runs the same two ops, silu(gate) recomputed instead of kept)."""
    monkeypatch.setenv("SAM_FAST_BACKEND", "torch")
    for make in SWIGLU_CASES.values():
        a, b, g = make(dtype)
        a, b = a.requires_grad_(), b.requires_grad_()
        got = swiglu(a, b)
        want = swiglu_ref(a, b)
        assert torch.equal(got, want)
        for x, y in zip(torch.autograd.grad(got, (a, b), g.to(dtype)), torch.autograd.grad(want, (a, b), g.to(dtype))):
            assert torch.equal(x, y)


@pytest.mark.parametrize("case", SWIGLU_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_matches_oracle(monkeypatch, backend, dtype, case):
    """Output and both gradients within the budget, in the inputs' dtype; the lean and reference
    backends' forward is the reference's, bit for bit."""
    a, b, g = (t.to(DEVICE) for t in SWIGLU_CASES[case](dtype))
    calls = _force(monkeypatch, backend, dtype, "swiglu", a, b)
    assert dispatcher("swiglu").choose(a, b).name == backend
    exact, _ = _run(swiglu_oracle, (a.double(), b.double()), (True, True), g.double())
    plain, _ = _run(swiglu_ref, (a, b), (True, True), g)
    fast, _ = _run(swiglu, (a, b), (True, True), g)
    assert all(t.dtype == dtype for t in fast)
    if backend != "triton":
        assert torch.equal(fast[0], plain[0])
    assert_within_budget(fast, plain, exact, ("out", "d gate", "d up"), BUDGET[dtype])
    if backend == "triton":
        assert calls["swiglu_fwd"] == 1 and calls["swiglu_bwd"] == 1


# -- both ops ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(monkeypatch, backend):
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    _force(monkeypatch, backend, torch.float32, "rms_norm", x, torch.ones(16, device=DEVICE), 1e-6)
    out = rms_norm(x, torch.ones(16, device=DEVICE), 1e-6)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)
    a = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    swiglu(a, a).sum().backward()
    assert a.grad.shape == (0, 5)


def test_opcheck_triton_ops(monkeypatch):
    x = _rows((3, 16), torch.float32, 8).to(DEVICE).requires_grad_()
    w = torch.linspace(0.5, 1.5, 16).to(DEVICE).requires_grad_()
    _force(monkeypatch, "triton", torch.float32, "rms_norm", x, w, 1e-6)
    torch.library.opcheck(llama_ops._rms_fwd_op, (x, w, 1e-6))
    a = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(llama_ops._swiglu_fwd_op, (a, b))


def _saved_elements(fn, *args):
    """Number of elements autograd keeps for the backward of fn(*args) (parameters excluded)."""
    count = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.dim() > 1:
            count[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return count[0]


def test_torch_backend_saves_less_than_the_reference(monkeypatch):
    """The point of the ``torch`` backend: RMSNorm keeps x and one 1/rms per row (the reference's
    autograd keeps x, the normalised row and two per-row statistics), SwiGLU keeps gate and up
    (the reference also keeps silu(gate))."""
    monkeypatch.setenv("SAM_FAST_BACKEND", "torch")
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(32), requires_grad=False)
    assert _saved_elements(rms_norm, x, w, 1e-6) == 64 * 32 + 64
    assert _saved_elements(rms_norm_ref, x, w, 1e-6) >= 2 * 64 * 32 + 64
    u = torch.randn(64, 32, requires_grad=True)
    assert _saved_elements(swiglu, x, u) == 2 * 64 * 32
    assert _saved_elements(swiglu_ref, x, u) == 3 * 64 * 32


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rms_norm(torch.randn(3, 8), torch.ones(7)), r"weight must be a floating \[D\] tensor with D=8"),
        (lambda: rms_norm(torch.randn(3, 8), torch.ones(8), -1.0), "eps must be a number >= 0"),
        (lambda: rms_norm(torch.arange(8), torch.ones(8)), "x must be a floating"),
        (lambda: rms_norm(torch.randn(3, 8), torch.ones(8, device="meta")), "weight is on meta"),
        (lambda: swiglu(torch.randn(3, 8), torch.randn(3, 7)), r"gate \(3, 8\) and up \(3, 7\) differ"),
        (lambda: swiglu(torch.randn(3, 8), torch.randn(3, 8).double()), "share one floating dtype"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- rope ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rope_bit_equal_to_hugging_face_on_query_and_key_heads_at_once(dtype):
    """`rope` on the query and key heads of a [B, S, Hq + Hkv, d] view (as the fused QKV projection
    lays them out) gives Hugging Face's apply_rotary_pos_emb of q [B, Hq, S, d] and k [B, Hkv, S, d]
    bit for bit, and the same input gradient."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from sam_fast.ops.llama import rope

    g = torch.Generator().manual_seed(0)
    B, S, hq, hkv, d = 2, 5, 4, 2, 8
    qkv = torch.randn(B, S, hq + 2 * hkv, d, generator=g).to(dtype).requires_grad_()
    angles = torch.randn(B, S, d // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    up = torch.randn(B, S, hq + hkv, d, generator=g).to(dtype)
    got = rope(qkv[:, :, : hq + hkv], cos, sin)
    (d_got,) = torch.autograd.grad(got, qkv, up)
    q, k = qkv[:, :, :hq].transpose(1, 2), qkv[:, :, hq: hq + hkv].transpose(1, 2)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    want = torch.cat([want_q.transpose(1, 2), want_k.transpose(1, 2)], dim=2)
    (d_want,) = torch.autograd.grad(want, qkv, up)
    assert torch.equal(got, want) and torch.equal(d_got, d_want)
    assert torch.count_nonzero(d_got[:, :, hq + hkv:]) == 0  # the value heads are not touched


def test_rope_names_bad_shapes():
    from sam_fast.ops.llama import rope

    with pytest.raises(ValueError, match=r"rope: .*got x \(1, 2, 3, 5\), cos \(1, 2, 5\)"):
        rope(torch.zeros(1, 2, 3, 5), torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match=r"cos \(1, 2, 4\), sin \(1, 2, 6\)"):
        rope(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 6))
