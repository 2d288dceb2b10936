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
    assert report["applied"] and report["patched"] == {"rms_norm": 5, "swiglu": 2, "attention": 2}, report
    assert fused_llama_kernels_applied(model) == {"rms_norm": 5, "swiglu": 2, "attention": 2}
    fast = _logits_and_input_grad(model, embeds.to(dtype), g)
    assert triton_forced["rms_fwd"] == 5 and triton_forced["rms_bwd"] == 5
    assert triton_forced["swiglu_fwd"] == 2 and triton_forced["swiglu_bwd"] == 2
    assert_within_budget(fast, plain, ref, ("logits", "d inputs_embeds"), BUDGET[dtype])

    assert remove_fused_llama_kernels(model) == 9
    assert fused_llama_kernels_applied(model) == {"rms_norm": 0, "swiglu": 0, "attention": 0}
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
    assert first["patched"] == {"rms_norm": 5, "swiglu": 2, "attention": 2}
    assert first["fused_projections"] == {"qkv_proj": 2, "gate_up_proj": 2}
    assert second["patched"] == {"rms_norm": 0, "swiglu": 0, "attention": 0} and second["already"] == 9
    assert second["fused_projections"] == {"qkv_proj": 0, "gate_up_proj": 0}
    assert remove_fused_llama_kernels(model) == 9 and remove_fused_llama_kernels(model) == 0
    gelu = tiny_llama(hidden_act="gelu")
    report = apply_fused_llama_kernels(gelu, force=True)
    assert report["patched"] == {"rms_norm": 5, "swiglu": 0, "attention": 2}
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
    assert report["patched"] == {"rms_norm": 0, "swiglu": 0, "attention": 0}
    assert fused_llama_kernels_applied(model) == {"rms_norm": 0, "swiglu": 0, "attention": 0}
    assert "q_proj" in model.model.layers[0].self_attn._modules  # nothing fused either
    assert "not fused into a kernel" in report["rope"] and report["liger_kernel"]


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
    assert report["patched"] == {"rms_norm": 4, "swiglu": 2, "attention": 2}
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


# -- fused projections: Q/K/V and gate|up as one GEMM each -----------------------------------------


def _rel_close(got, want, rel=1e-5):
    """Elementwise within rel x max|want| (fp32 tolerance, relative to the tensor's scale)."""
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


@pytest.mark.parametrize("kv_heads, bias", [(2, False), (4, False), (1, True)], ids=["gqa", "mha", "mqa-bias"])
def test_fused_projections_match_unfused(monkeypatch, kv_heads, bias):
    """fp32 tiny LLaMA (GQA 4/2, plain 4/4, MQA 4/1 with biases): one QKV GEMM, one gate|up GEMM
    and the attention's own RoPE give Hugging Face's logits and input gradients within rel 1e-5."""
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    model = tiny_llama(num_key_value_heads=kv_heads, attention_bias=bias, mlp_bias=bias)
    gen = torch.Generator().manual_seed(3)
    embeds, g = torch.randn(2, 9, 48, generator=gen), torch.randn(2, 9, 120, generator=gen)
    want = _logits_and_input_grad(model, embeds, g)
    report = apply_fused_llama_kernels(model, force=True)
    assert report["fused_projections"] == {"qkv_proj": 2, "gate_up_proj": 2}, report["skipped"]
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert list(attn._modules) == ["qkv_proj", "o_proj"] and list(mlp._modules) == ["gate_up_proj", "down_proj", "act_fn"]
    assert attn.qkv_proj.weight.shape == ((4 + 2 * kv_heads) * 12, 48) and (attn.qkv_proj.bias is not None) == bias
    assert mlp.gate_up_proj.weight.shape == (2 * 96, 48)
    got = _logits_and_input_grad(model, embeds, g)
    for x, y in zip(got, want):
        _rel_close(x, y)


def test_fused_weights_are_kept_once():
    """The fused Linear holds the only copy of the weights: the unregistered originals are emptied,
    and the model's parameter bytes do not change."""
    model = tiny_llama()
    before = sum(p.numel() for p in model.parameters())
    apply_fused_llama_kernels(model, force=True)
    assert sum(p.numel() for p in model.parameters()) == before
    originals = model.model.layers[0].self_attn.__dict__["_sam_fast_unfused"]["parts"]["qkv_proj"][1]
    assert all(lin.weight.numel() == 0 for lin in originals)


def test_state_dict_keeps_hugging_face_keys_and_values(tmp_path):
    """state_dict() of the fused model: the same keys in the same order and the same values as
    Hugging Face's; save_pretrained writes them, and Hugging Face's from_pretrained reads them back
    into an unfused model that gives the same logits."""
    model = tiny_llama()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    apply_fused_llama_kernels(model, force=True)
    got = model.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(saved) == sorted(want)
    assert all(torch.equal(saved[k], want[k]) for k in saved)
    back = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    e = torch.randn(1, 6, 48)
    torch.testing.assert_close(back(inputs_embeds=e).logits, model(inputs_embeds=e).logits, rtol=1e-5, atol=1e-6)


def test_hugging_face_state_dict_loads_into_fused_model(tmp_path):
    """load_state_dict of another LLaMA's (unfused, Hugging Face keys) weights into the fused model:
    the fused weights are their concatenation (same logits as that model), strict loading reports
    nothing missing or unexpected; a torch.save file of the fused state dict round-trips too."""
    model, other = tiny_llama(seed=0), tiny_llama(seed=1)
    apply_fused_llama_kernels(model, force=True)
    result = model.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    attn = other.model.layers[1].self_attn
    want = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.weight, want)
    e = torch.randn(1, 6, 48)
    _rel_close(model(inputs_embeds=e).logits, other(inputs_embeds=e).logits)
    torch.save(model.state_dict(), tmp_path / "fused.pt")
    fresh = tiny_llama(seed=2)
    fresh.load_state_dict(torch.load(tmp_path / "fused.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), other.state_dict().values()))


def test_wrong_shaped_part_is_named_on_load():
    model = tiny_llama()
    apply_fused_llama_kernels(model, force=True)
    state = model.state_dict()
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 48)
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.qkv_proj\.weight: cannot fuse "
                                           r"q_proj/k_proj/v_proj of shapes \[\(48, 48\), \(7, 48\), \(24, 48\)\]"):
        model.load_state_dict(state)


def test_remove_restores_the_original_modules_exactly():
    """remove_fused_llama_kernels: the same module and Parameter objects in Hugging Face's order,
    with the fused weights' current values, no hook left behind, Hugging Face's outputs bit for
    bit; a second apply fuses again."""
    model = tiny_llama()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    children = {m: dict(m._modules) for m in (attn, mlp)}
    params = {n: p for n, p in model.named_parameters()}
    e = torch.randn(2, 5, 48)
    want = model(inputs_embeds=e).logits
    apply_fused_llama_kernels(model, force=True)
    assert remove_fused_llama_kernels(model) == 9
    for m, kids in children.items():
        assert list(m._modules.items()) == list(kids.items())
        assert not m._state_dict_hooks and not m._load_state_dict_pre_hooks and "_sam_fast_unfused" not in m.__dict__
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert torch.equal(model(inputs_embeds=e).logits, want)
    assert apply_fused_llama_kernels(model, force=True)["fused_projections"] == {"qkv_proj": 2, "gate_up_proj": 2}


def test_hooked_projections_are_not_fused(monkeypatch):
    """A projection with a forward hook (LoRA, an offload wrapper) is left alone: that attention
    keeps Hugging Face's forward, that MLP runs the fused SwiGLU over its own two GEMMs."""
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    model = tiny_llama()
    layer = model.model.layers[1]
    layer.self_attn.k_proj.register_forward_hook(lambda *a: None)
    layer.mlp.up_proj.register_forward_pre_hook(lambda *a: None)
    report = apply_fused_llama_kernels(model, force=True)
    assert report["patched"] == {"rms_norm": 5, "swiglu": 2, "attention": 1}
    assert report["fused_projections"] == {"qkv_proj": 1, "gate_up_proj": 1}
    assert "model.layers.1.self_attn: projections not fused: k_proj has forward hooks or an instance-level " \
           "forward" in report["skipped"]
    assert "forward" not in layer.self_attn.__dict__ and "q_proj" in layer.self_attn._modules
    assert "gate_proj" in layer.mlp._modules and "forward" in layer.mlp.__dict__


@pytest.mark.parametrize("left_padding", [False, True])
def test_generation_ids_unchanged_by_the_fused_attention(monkeypatch, left_padding):
    """Greedy generation with the KV cache (and a left-padded batch's attention mask) through the
    fused forwards gives the ids of Hugging Face's forwards."""
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    model = tiny_llama()
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if left_padding:
        mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kw)
    apply_fused_llama_kernels(model, force=True)
    assert torch.equal(model.generate(ids, **kw), want)
