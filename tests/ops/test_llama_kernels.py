"""Fused RMSNorm / SwiGLU (sam_fast.ops.llama, kernels/llama.py) and the LLaMA patch
(sam_fast.models.llama_kernels) against float64 oracles written here.

Error budget (flash-attention's rule): the fused result's error against the float64 oracle is at
most twice the error of the plain PyTorch formula (Hugging Face's) in the same dtype, plus a small
floor relative to the quantity's scale. Without a GPU the Triton kernels run under
TRITON_INTERPRET=1 (set by conftest.py) on small shapes, one program per launch. bf16 is not
tested under the interpreter (its bf16 arithmetic is broken); the AOT compile test covers it.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sam_fast.ops.llama as llama_ops
from sam_fast.models.llama_kernels import (
    apply_fused_llama_kernels,
    fused_llama_kernels_applied,
    fused_llama_kernels_plan,
    remove_fused_llama_kernels,
)
from sam_fast.ops import rms_norm, rms_norm_ref, swiglu, swiglu_ref
from sam_fast.ops.dispatch import dispatcher

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not CAN_TRITON, reason="no GPU and TRITON_INTERPRET is not 1")
FLOOR = {torch.float32: 2e-6, torch.float16: 2.0**-9}
DTYPES = [torch.float32, torch.float16]


# -- float64 oracles (the formulas, written out) -------------------------------------------------


def rms_oracle(x, w, eps):
    x = x.double()
    return w.double() * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def swiglu_oracle(a, b):
    a = a.double()
    return a / (1 + torch.exp(-a)) * b.double()


def _run(fn, inputs, needs, g):
    """(out, grads of the inputs that need one) of fn(*inputs) for upstream gradient g."""
    ins = [t.detach().clone().requires_grad_(n) for t, n in zip(inputs, needs)]
    out = fn(*ins)
    grads = torch.autograd.grad(out, [t for t in ins if t.requires_grad], g.to(out.dtype))
    return [out.detach(), *grads], ins


def _assert_budget(fast, plain, ref, names, dtype):
    for f, p, r, name in zip(fast, plain, ref, names):
        assert f.shape == r.shape, name
        assert torch.isfinite(f).all(), name
        err = (f.double() - r).abs().max().item()
        budget = 2 * (p.double() - r).abs().max().item() + FLOOR[dtype] * r.abs().max().item()
        assert err <= budget, f"{name}: error {err:.3g} > budget {budget:.3g}"


@pytest.fixture
def triton_forced(monkeypatch):
    """Force the Triton backend (the interpreter on CPU) and check it is really taken."""
    monkeypatch.setenv("SAM_FAST_BACKEND", "triton")
    sample = torch.zeros(2, 8, device=DEVICE)
    why = dispatcher("rms_norm").reasons(sample, torch.ones(8, device=DEVICE), 1e-6)["triton"]
    if why is not None:
        pytest.skip(f"triton backend cannot run here: {why}")
    calls = {"rms_fwd": 0, "rms_bwd": 0, "swiglu_fwd": 0, "swiglu_bwd": 0}
    for key, name in (("rms_fwd", "_rms_norm_forward"), ("rms_bwd", "_rms_norm_backward"),
                      ("swiglu_fwd", "_swiglu_forward"), ("swiglu_bwd", "_swiglu_backward")):
        orig = getattr(llama_ops, name)

        def spy(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(llama_ops, name, spy)
    return calls


def _rows(shape, dtype, seed):
    """Rows of very different scales (1e-3 .. 1e2), so rstd spans orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    scale = 10.0 ** torch.randint(-3, 3, (*shape[:-1], 1), generator=g).float()
    return (x * scale).to(dtype)


# -- the kernels vs the oracle -------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 48), (5, 40)], ids=["3d-D48", "2d-D40"])
def test_rms_norm_triton_matches_oracle(triton_forced, dtype, shape):
    D = shape[-1]
    x = _rows(shape, dtype, 0)
    w = (1 + 0.5 * torch.randn(D, generator=torch.Generator().manual_seed(1))).to(dtype)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x, w, g = x.to(DEVICE), w.to(DEVICE), g.to(DEVICE)
    eps = 1e-6
    ref, _ = _run(lambda a, b: rms_oracle(a, b, eps), (x.double(), w.double()), (True, False), g.double())
    plain, _ = _run(lambda a, b: rms_norm_ref(a, b, eps), (x, w), (True, False), g)
    fast, ins = _run(lambda a, b: rms_norm(a, b, eps), (x, w), (True, False), g)
    assert fast[0].dtype == dtype and fast[1].dtype == dtype
    assert ins[1].grad is None
    _assert_budget(fast, plain, ref, ("out", "dx"), dtype)
    assert triton_forced["rms_fwd"] == 1 and triton_forced["rms_bwd"] == 1


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_triton_weight_gradient(triton_forced, dtype):
    """A trainable weight gets its gradient (the per-program partial sums, reduced)."""
    shape = (3, 5, 24)
    x = _rows(shape, dtype, 3).to(DEVICE)
    w = (1 + 0.5 * torch.randn(24, generator=torch.Generator().manual_seed(4))).to(dtype).to(DEVICE)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref, _ = _run(lambda a, b: rms_oracle(a, b, 1e-5), (x.double(), w.double()), (True, True), g.double())
    plain, _ = _run(lambda a, b: rms_norm_ref(a, b, 1e-5), (x, w), (True, True), g)
    fast, _ = _run(lambda a, b: rms_norm(a, b, 1e-5), (x, w), (True, True), g)
    assert fast[2].dtype == dtype
    _assert_budget(fast, plain, ref, ("out", "dx", "dw"), dtype)


@needs_triton
def test_rms_norm_triton_fp32_weight_half_input(triton_forced):
    """An fp32 weight with fp16 activations: fp32 output, as Hugging Face's module gives."""
    x = _rows((4, 32), torch.float16, 6).to(DEVICE)
    w = torch.linspace(0.5, 1.5, 32).to(DEVICE)
    out = rms_norm(x, w, 1e-6)
    want = rms_norm_ref(x, w, 1e-6)
    assert out.dtype == want.dtype == torch.float32
    ref = rms_oracle(x, w, 1e-6)
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * (want.double() - ref).abs().max().item() + FLOOR[torch.float16] * ref.abs().max().item()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_triton_matches_oracle(triton_forced, dtype):
    shape = (3, 7, 40)
    gen = torch.Generator().manual_seed(7)
    a = (torch.randn(shape, generator=gen) * 4).to(dtype)  # silu's both tails and its curved middle
    b = torch.randn(shape, generator=gen).to(dtype)
    a.view(-1)[:4] = torch.tensor([-30.0, 30.0, 0.0, -1.2785], dtype=dtype)
    g = torch.randn(shape, generator=gen)
    a, b, g = a.to(DEVICE), b.to(DEVICE), g.to(DEVICE)
    ref, _ = _run(swiglu_oracle, (a.double(), b.double()), (True, True), g.double())
    plain, _ = _run(swiglu_ref, (a, b), (True, True), g)
    fast, _ = _run(swiglu, (a, b), (True, True), g)
    assert all(t.dtype == dtype for t in fast)
    _assert_budget(fast, plain, ref, ("out", "d_gate", "d_up"), dtype)
    assert triton_forced["swiglu_fwd"] == 1 and triton_forced["swiglu_bwd"] == 1


@needs_triton
def test_empty_inputs(triton_forced):
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    out = rms_norm(x, torch.ones(16, device=DEVICE), 1e-6)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)
    a = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    swiglu(a, a).sum().backward()
    assert a.grad.shape == (0, 5)


@needs_triton
def test_opcheck_triton_ops(triton_forced):
    x = _rows((3, 16), torch.float32, 8).to(DEVICE).requires_grad_()
    w = torch.linspace(0.5, 1.5, 16).to(DEVICE).requires_grad_()
    torch.library.opcheck(llama_ops._rms_fwd_op, (x, w, 1e-6))
    a = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(llama_ops._swiglu_fwd_op, (a, b))


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


ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR[torch.bfloat16] = 2.0**-6


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_rms_norm_torch_backend_matches_oracle(monkeypatch, dtype, weight_grad):
    monkeypatch.setenv("SAM_FAST_BACKEND", "torch")
    shape, eps = (3, 7, 40), 1e-6
    x = _rows(shape, dtype, 3)
    w = (1 + 0.5 * torch.randn(40, generator=torch.Generator().manual_seed(4))).to(dtype)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    needs = (True, weight_grad)
    ref, _ = _run(lambda a, b: rms_oracle(a, b, eps), (x.double(), w.double()), needs, g.double())
    plain, _ = _run(lambda a, b: rms_norm_ref(a, b, eps), (x, w), needs, g)
    fast, _ = _run(lambda a, b: rms_norm(a, b, eps), (x, w), needs, g)
    assert torch.equal(fast[0], plain[0])  # the same forward ops as the reference
    _assert_budget(fast, plain, ref, ("out", "dx", "dw")[: len(fast)], dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_swiglu_torch_backend_matches_oracle(monkeypatch, dtype):
    monkeypatch.setenv("SAM_FAST_BACKEND", "torch")
    gen = torch.Generator().manual_seed(6)
    a, b, g = (4 * torch.randn(2, 5, 33, generator=gen) for _ in range(3))
    a, b = a.to(dtype), b.to(dtype)
    ref, _ = _run(swiglu_oracle, (a.double(), b.double()), (True, True), g.double())
    plain, _ = _run(swiglu_ref, (a, b), (True, True), g)
    fast, _ = _run(swiglu, (a, b), (True, True), g)
    assert torch.equal(fast[0], plain[0])
    _assert_budget(fast, plain, ref, ("out", "d gate", "d up"), dtype)


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


# -- the patched LLaMA ---------------------------------------------------------------------------


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # non-trivial norm weights (HF initialises them to 1)
        for mod in model.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.weight.normal_(1.0, 0.3)
    return model.requires_grad_(False)  # frozen, as in SAM


def _logits_and_input_grad(model, embeds, g):
    e = embeds.detach().clone().requires_grad_()
    logits = model(inputs_embeds=e).logits
    (d,) = torch.autograd.grad(logits, e, g.to(logits.dtype))
    return [logits.detach(), d]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patched_llama_matches_unpatched(triton_forced, dtype):
    """Frozen tiny LLaMA: same logits and input-embedding gradients as Hugging Face's forwards."""
    model = tiny_llama().to(DEVICE)
    oracle = copy.deepcopy(model).double()
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(11)
    embeds = torch.randn(2, 9, 48, generator=gen).to(DEVICE)
    g = torch.randn(2, 9, 120, generator=gen).to(DEVICE)
    ref = _logits_and_input_grad(oracle, embeds.double(), g.double())
    plain = _logits_and_input_grad(model, embeds.to(dtype), g)

    report = apply_fused_llama_kernels(model, force=True)
    assert report["applied"] and report["patched"] == {"rms_norm": 5, "swiglu": 2}, report
    assert fused_llama_kernels_applied(model) == {"rms_norm": 5, "swiglu": 2}
    fast = _logits_and_input_grad(model, embeds.to(dtype), g)
    assert triton_forced["rms_fwd"] == 5 and triton_forced["rms_bwd"] == 5
    assert triton_forced["swiglu_fwd"] == 2 and triton_forced["swiglu_bwd"] == 2
    _assert_budget(fast, plain, ref, ("logits", "d inputs_embeds"), dtype)

    assert remove_fused_llama_kernels(model) == 7
    assert fused_llama_kernels_applied(model) == {"rms_norm": 0, "swiglu": 0}
    assert all("forward" not in m.__dict__ for m in model.modules())
    again = _logits_and_input_grad(model, embeds.to(dtype), g)
    for x, y in zip(again, plain):
        assert torch.equal(x, y)
    assert triton_forced["rms_fwd"] == 5  # the restored model no longer calls the kernels


def test_apply_is_idempotent_and_skips_non_silu(monkeypatch):
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    model = tiny_llama()
    first = apply_fused_llama_kernels(model, force=True)
    second = apply_fused_llama_kernels(model, force=True)
    assert first["patched"] == {"rms_norm": 5, "swiglu": 2}
    assert second["patched"] == {"rms_norm": 0, "swiglu": 0} and second["already"] == 7
    assert remove_fused_llama_kernels(model) == 7 and remove_fused_llama_kernels(model) == 0
    gelu = tiny_llama(hidden_act="gelu")
    report = apply_fused_llama_kernels(gelu, force=True)
    assert report["patched"] == {"rms_norm": 5, "swiglu": 0}
    assert len(report["skipped"]) == 2 and all("'gelu' is not SiLU" in s for s in report["skipped"])


def test_forced_on_cpu_reference_equals_hf(monkeypatch):
    """Forced on CPU without the Triton backend: the reference runs, bit-equal to HF's forwards."""
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    model = tiny_llama()
    e = torch.randn(2, 5, 48)
    before = model(inputs_embeds=e).logits
    apply_fused_llama_kernels(model, force=True)
    torch.testing.assert_close(model(inputs_embeds=e).logits, before, rtol=0, atol=1e-6)


def test_not_applied_where_not_fused(monkeypatch):
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    model = tiny_llama()  # on CPU: the Triton backend cannot run
    report = apply_fused_llama_kernels(model)
    assert not report["applied"] and not report["fused"]
    assert report["summary"].startswith("not applied") and "CUDA" in report["summary"]
    assert report["patched"] == {"rms_norm": 0, "swiglu": 0}
    assert fused_llama_kernels_applied(model) == {"rms_norm": 0, "swiglu": 0}
    assert "not fused" in report["rope"] and report["liger_kernel"]


def test_leaves_instance_wrapped_modules_alone(monkeypatch):
    """A module whose forward is already wrapped per instance (an offload hook) is skipped."""
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    model = tiny_llama()
    norm = model.model.norm
    hooked = norm.forward
    norm.forward = lambda h: hooked(h)
    report = apply_fused_llama_kernels(model, force=True)
    assert report["patched"]["rms_norm"] == 4
    assert any(s.startswith("model.norm:") for s in report["skipped"])
    remove_fused_llama_kernels(model)
    assert "forward" in norm.__dict__  # the wrapper stays


def test_skips_subclass_with_its_own_forward(monkeypatch):
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class OffsetNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1

    model = tiny_llama()
    model.model.norm = OffsetNorm(48)
    report = apply_fused_llama_kernels(model, force=True)
    assert report["patched"] == {"rms_norm": 4, "swiglu": 2}
    assert any(s.startswith("model.norm: OffsetNorm.forward is not") for s in report["skipped"])
    assert "forward" not in model.model.norm.__dict__


def test_bad_model():
    with pytest.raises(ValueError, match="has no LlamaRMSNorm or LlamaMLP"):
        apply_fused_llama_kernels(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        apply_fused_llama_kernels("model")


def test_plan_and_env_report(monkeypatch):
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    plan = fused_llama_kernels_plan("cpu", torch.float32)
    assert plan["rms_norm"] == plan["swiglu"] == "torch" and not plan["fused"]
    assert "Triton needs a CUDA device" in plan["reasons"]["rms_norm"]["triton"]
    from sam_fast.env import report

    text = report()
    assert "LLaMA RMSNorm/SwiGLU ops (applied in SAM's packed training step" in text
    assert "  cpu: RMSNorm and SwiGLU on the lean autograd backend 'torch' (Triton unusable" in text
    assert "liger_kernel:" in text
