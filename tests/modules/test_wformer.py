"""`WFormer` (the Q-former as Q-stream and W-stream) and the two injections."""

import torch
from _sam_helpers import randomize_guidance, tiny_sam

from sam_fast.modules import GuidanceIn, GuidanceOut, WStream, attention_bias


def _rows(model, T, P=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    P = P or (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
    E = torch.randn(T, P, cfg.vision_config.hidden_size, generator=g)
    ids = torch.randint(5, 50, (T, 4), generator=g)
    x = model.qformer.embeddings(input_ids=ids, query_embeds=model.query_tokens.expand(T, -1, -1))
    mask = torch.ones(T, cfg.num_query_tokens + 4, dtype=torch.long)
    return E, x, attention_bias(mask, x.dtype), mask


def test_wformer_owns_references_and_reads_l_k_from_the_config():
    model = tiny_sam(interaction_layers=(1, 2))
    wf = model.w_former
    assert wf.layers is model.qformer.encoder.layer
    assert wf.interaction_layers == (1, 2) and wf.query_length == model.config.num_query_tokens
    assert not wf.mixes_in_kernel(torch.float32, "cpu")  # CPU, nothing forced: the K/V are merged once


@torch.no_grad()
def test_q_stream_alone_equals_the_hf_layers():
    model = tiny_sam()
    E, x, bias, mask = _rows(model, 2)
    Q = model.config.num_query_tokens
    got = model.w_former(x, bias, model.w_former.project_kv(E))
    m4 = ((1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min)
    h = x
    for layer in model.qformer.encoder.layer:
        h = layer(h, m4, E, query_length=Q)
    torch.testing.assert_close(got, h[:, :Q], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_w_stream_reaches_only_its_target_rows():
    """Zero injections: guidance changes nothing (an untrained SAM is InstructBLIP); trained ones
    change the guided Q row only."""
    model = tiny_sam(interaction_layers=(1, 2))
    E, x, bias, _ = _rows(model, 3)
    kv = model.w_former.project_kv(E)
    plain = model.w_former(x, bias, kv)
    target = torch.tensor([1])
    ws = WStream(x[1:2].clone(), bias[1:2], model.w_former.project_kv(E[2:3]), target)
    torch.testing.assert_close(model.w_former(x, bias, kv, ws), plain, rtol=1e-5, atol=1e-5)
    randomize_guidance(model)
    guided = model.w_former(x, bias, kv, ws)
    torch.testing.assert_close(guided[[0, 2]], plain[[0, 2]], rtol=1e-5, atol=1e-5)
    assert (guided[1] - plain[1]).abs().max() > 1e-3


def test_injections_follow_the_formulas():
    torch.manual_seed(0)
    g_in, g_out = GuidanceIn(4, 4).double(), GuidanceOut(4, 4).double()
    w, h = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    W, b = g_in.weight.detach(), g_in.bias.detach()
    torch.testing.assert_close(g_in.inject(w, h), w + torch.einsum("rld,ed->rle", h, W) + b)
    x = torch.zeros(3, 3, 4, dtype=torch.float32)
    out = g_out.inject(x, torch.tensor([2, 0]), w)
    c = torch.einsum("rld,ed->rle", w, g_out.weight.detach()) + g_out.bias.detach()
    assert out.dtype == torch.float32 and out[1].abs().max() == 0
    torch.testing.assert_close(out[2], c[0].float())
    torch.testing.assert_close(out[0], c[1].float())


def test_the_op_decides_where_mixed_kv_are_formed(monkeypatch):
    """The model never names a backend: it asks the cross-attention op, which answers from its own
    dispatch (forced onto the kernel under the interpreter here, when Triton is importable)."""
    import importlib

    import pytest

    ca = importlib.import_module("sam_fast.ops.cross_attention")
    assert "materialised once per batch" in ca.mixed_kv_schedule(12, 64, torch.float32, "cpu")
    if ca._triton_import_error() is not None:
        pytest.skip("triton kernels not importable here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: True)
    model = tiny_sam()
    assert ca.mixes_in_kernel(12, 64, torch.float32, "cpu") and model.w_former.mixes_in_kernel(torch.float32, "cpu")
    assert "inside the fused attention kernel" in ca.mixed_kv_schedule(12, 64, torch.float32, "cpu")
    assert not ca.mixes_in_kernel(12, 64, torch.float32, "cpu", dropout_p=0.1)  # the kernel has no dropout
