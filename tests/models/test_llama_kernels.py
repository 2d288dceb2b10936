"""The LLaMA patch (sam_fast.models.llama_kernels): a tiny frozen Hugging Face LLaMA whose RMSNorm
and MLP modules call the fused ops gives Hugging Face's logits and input-embedding gradients within
the error budget, the patch is reversible and idempotent, skips what it must not touch, and says
where it is not applied. The ops themselves are tested in tests/ops/test_llama.py.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _budget import Budget, assert_within_budget, spy_calls
from transformers import LlamaConfig, LlamaForCausalLM

import sam_fast.ops.llama as llama_ops
from sam_fast.models.llama_kernels import (
    apply_fused_llama_kernels,
    fused_llama_kernels_applied,
    fused_llama_kernels_plan,
    remove_fused_llama_kernels,
)
from sam_fast.ops.dispatch import dispatcher

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not CAN_TRITON, reason="no GPU and TRITON_INTERPRET is not 1")
# dtype -> error budget of the patched model's logits and input gradients against the float64
# model: at most 2 x the unpatched model's error in the same dtype + floor x max|float64 result|
BUDGET = {torch.float32: Budget(factor=2, floor=2e-6), torch.float16: Budget(factor=2, floor=2.0**-9)}
DTYPES = list(BUDGET)


@pytest.fixture
def triton_forced(monkeypatch):
    """Force the Triton backend (the interpreter on CPU), check it is really taken, and count the
    kernel launches of each launcher."""
    monkeypatch.setenv("SAM_FAST_BACKEND", "triton")
    sample = torch.zeros(2, 8, device=DEVICE)
    why = dispatcher("rms_norm").reasons(sample, torch.ones(8, device=DEVICE), 1e-6)["triton"]
    if why is not None:
        pytest.skip(f"triton backend cannot run here: {why}")
    return spy_calls(monkeypatch, llama_ops, {"rms_fwd": "_rms_norm_forward", "rms_bwd": "_rms_norm_backward",
                                              "swiglu_fwd": "_swiglu_forward", "swiglu_bwd": "_swiglu_backward"})


def tiny_llama(seed=0, **overrides):
    """A frozen 2-layer LLaMA (48 wide, GQA 4/2 heads) with non-trivial RMSNorm weights."""
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
    """[logits, d inputs_embeds] of `model` for upstream gradient `g`."""
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
    assert_within_budget(fast, plain, ref, ("logits", "d inputs_embeds"), BUDGET[dtype])

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
