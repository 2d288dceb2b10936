"""Padding-free (packed) LLM step: same loss and input gradients as HF's padded causal-LM step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from sam_fast.models import packing
from sam_fast.models.packing import (
    ATTENTION_NAME,
    pack,
    packed_hidden_states,
    packed_lm_loss,
    packing_backend,
    unpack,
    use_attention,
)

H, V = 32, 50


def tiny_llama(kv_heads: int = 4, seed: int = 0, **cfg) -> LlamaForCausalLM:
    """2-layer fp32 LLaMA with large random weights (std 0.3) so attention and positions matter."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, initializer_range=0.3, **cfg,
    )
    return LlamaForCausalLM(config).eval()


def ragged(lengths, S=None, side="right", seed=0, label_first=True):
    """Random embeds [B, S, H], mask and labels (-100 at padding): even rows have their first 40%
    of tokens unsupervised (a prompt), odd rows are labelled from their first token on (a label
    that no position of the sample predicts, which must not become the previous sample's target).
    label_first=False keeps every row's first token unlabelled: HF's padded loss predicts a
    left-padded row's first label from the pad before it, which the packed step rightly does not."""
    g = torch.Generator().manual_seed(seed)
    B, S = len(lengths), S or max(lengths)
    embeds = torch.randn(B, S, H, generator=g)
    mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100)
    for b, n in enumerate(lengths):
        lo = 0 if side == "right" else S - n
        mask[b, lo : lo + n] = 1
        start = lo + (max(1, int(0.4 * n)) if b % 2 == 0 else int(not label_first))
        labels[b, start : lo + n] = torch.randint(0, V, (lo + n - start,), generator=g)
    return embeds, mask, labels


def padded_step(model, embeds, mask, labels, left=False):
    """HF's padded loss and its gradient w.r.t. the embeddings (positions cumsum(mask) - 1)."""
    e = embeds.clone().requires_grad_(True)
    kw = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if left else {}
    loss = model(inputs_embeds=e, attention_mask=mask, labels=labels, **kw).loss
    (grad,) = torch.autograd.grad(loss, e)
    return loss.detach(), grad


def packed_step(model, embeds, mask, labels, **kw):
    e = embeds.clone().requires_grad_(True)
    loss = packed_lm_loss(model, e, mask, labels, **kw)
    (grad,) = torch.autograd.grad(loss, e)
    return loss.detach(), grad


def assert_same_step(model, embeds, mask, labels, left=False, **kw):
    """Loss within rel 1e-5; gradient within rel 1e-5 as a whole (norm) and elementwise with an
    absolute floor of 1e-5 x its largest entry. With these std-0.3 weights gradients reach ~2 and
    the fp32 padded path itself is ~3e-6 away from float64, so a fixed 1e-6 floor would test
    rounding; `test_packed_hidden_states_equal_padded_float64` checks the LLM body at 1e-10."""
    ref_loss, ref_grad = padded_step(model, embeds, mask, labels, left=left)
    loss, grad = packed_step(model, embeds, mask, labels, **kw)
    rel = 1e-5
    torch.testing.assert_close(loss, ref_loss, rtol=rel, atol=0)
    valid = mask.bool()
    g, r = grad[valid], ref_grad[valid]
    assert (g - r).norm() <= rel * r.norm()
    torch.testing.assert_close(g, r, rtol=rel, atol=rel * float(r.abs().max()))
    assert torch.count_nonzero(grad[~valid]) == 0
    assert ref_grad[valid].abs().max() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_step_equals_padded_right_padding(kv_heads):
    model = tiny_llama(kv_heads)
    assert_same_step(model, *ragged([11, 6, 3, 9]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_hidden_states_equal_padded_float64(side):
    """In float64 (HF's loss upcasts logits to float32 only, so this compares the LLM body) the
    packed hidden states and their input gradients equal the padded rows' to 1e-10."""
    model = tiny_llama(kv_heads=2).double()
    embeds, mask, _ = ragged([11, 6, 3, 9], S=13, side=side)
    embeds = embeds.double()
    probe = torch.randn(*mask.shape, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    valid = mask.bool()

    e = embeds.clone().requires_grad_(True)
    ref = model.model(inputs_embeds=e, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    ref_hidden = ref.last_hidden_state
    (ref_grad,) = torch.autograd.grad((ref_hidden * probe)[valid].sum(), e)

    e = embeds.clone().requires_grad_(True)
    p = pack(e, mask)
    hidden = unpack(packed_hidden_states(model, p), p)
    (grad,) = torch.autograd.grad((hidden * probe)[valid].sum(), e)
    torch.testing.assert_close(hidden[valid], ref_hidden[valid].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad[valid], ref_grad[valid], rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(grad[~valid]) == 0


def test_packed_step_equals_padded_left_padding():
    model = tiny_llama()
    embeds, mask, labels = ragged([11, 6, 3, 9], S=13, side="left", label_first=False)
    assert_same_step(model, embeds, mask, labels, left=True)


@pytest.mark.parametrize("S", [7, 10])
def test_packed_step_one_sample(S):
    model = tiny_llama()
    assert_same_step(model, *ragged([7], S=S))


def test_pack_layout_positions_and_per_sample_shift():
    embeds = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    p = pack(embeds, mask, labels)
    assert p.inputs_embeds[0, :, 0].tolist() == [0, 1, 2, 6, 7]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 3, 5]
    assert p.max_seqlen == 3 and p.seqlens == (3, 2)
    assert p.labels.tolist() == [[-100, 5, 6, 7, 8]]
    # sample 2's first label (7) is not a target of sample 1's last token
    assert p.shift_labels.tolist() == [[5, 6, -100, 8, -100]]
    back = unpack(p.inputs_embeds, p, fill=-1.0)
    assert back[..., 0].tolist() == [[0, 1, 2, -1], [-1, -1, 6, 7]]


def test_positions_restart_per_sample_and_matter():
    """longrope switches its frequencies when a position passes original_max_position_embeddings
    (12): every sample here fits, the packed row (26 tokens) does not, so positions counted over
    the packed row would change the loss."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [5.0] * 4,
            "original_max_position_embeddings": 12, "factor": 4.0}
    model = tiny_llama(rope_parameters=rope)
    embeds, mask, labels = ragged([10, 9, 7])
    seen = []
    handle = model.model.rotary_emb.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs.get("position_ids", args[-1]).clone()), with_kwargs=True
    )
    try:
        assert_same_step(model, embeds, mask, labels)
    finally:
        handle.remove()
    expected = torch.cat([torch.arange(n) for n in (10, 9, 7)])[None]
    assert any(torch.equal(s, expected) for s in seen)

    real_pack = packing.pack

    def pack_without_restart(*args, **kw):
        p = real_pack(*args, **kw)
        p.position_ids = torch.arange(p.num_tokens)[None]
        return p

    ref_loss, _ = padded_step(model, embeds, mask, labels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "pack", pack_without_restart)
        wrong = packed_lm_loss(model, embeds, mask, labels)
    assert abs(wrong.item() - ref_loss.item()) > 1e-3 * abs(ref_loss.item())


def test_no_full_attention_matrix(monkeypatch):
    """Attention runs per sample: no SDPA call (hence no score matrix or mask) spans two samples."""
    model = tiny_llama()
    lengths = [11, 6, 3, 9]
    embeds, mask, labels = ragged(lengths)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kw):
        calls.append((q.shape[-2], k.shape[-2], attn_mask))
        return real(q, k, v, attn_mask, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    packed_step(model, embeds, mask, labels)
    assert len(calls) == model.config.num_hidden_layers * len(lengths)
    assert all(q <= max(lengths) and k <= max(lengths) and m is None for q, k, m in calls)
    assert sorted({q for q, _, _ in calls}) == sorted(set(lengths))


def test_attention_implementation_restored():
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    embeds, mask, labels = ragged([5, 3])
    packed_lm_loss(model, embeds, mask, labels)
    assert model.config._attn_implementation == "eager"
    assert model.model.layers[0].self_attn.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="boom"):
        with use_attention(model):
            assert model.config._attn_implementation == ATTENTION_NAME
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"


def test_varlen_attention_refuses_unpacked_calls():
    """Left switched on by mistake (e.g. generation inside the block), it fails loudly instead of
    attending across the whole row."""
    model = tiny_llama()
    with use_attention(model), pytest.raises(RuntimeError, match="packed"):
        model(inputs_embeds=torch.randn(1, 4, H))


def test_loss_fn_hook_gets_supervised_positions_only():
    model = tiny_llama()
    embeds, mask, labels = ragged([11, 6, 3])
    n_targets = int((labels[:, 1:] != -100).sum())
    got = {}

    def loss_fn(hidden, weight, targets):
        got.update(hidden=hidden.shape, weight=weight, targets=targets.clone())
        return F.cross_entropy(hidden @ weight.T, targets, reduction="sum")

    assert_same_step(model, embeds, mask, labels, loss_fn=loss_fn)
    assert got["hidden"] == (n_targets, H)
    assert got["weight"] is model.lm_head.weight
    assert bool((got["targets"] >= 0).all())


def test_hidden_states_match_padded_rows():
    model = tiny_llama()
    embeds, mask, _ = ragged([8, 5, 2])
    with torch.no_grad():
        ref = model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        p = pack(embeds, mask)
        hidden = unpack(packed_hidden_states(model, p), p)
    valid = mask.bool()
    torch.testing.assert_close(hidden[valid], ref[valid], rtol=1e-5, atol=1e-5)


def _causal_per_sample(q, k, v, bounds, scale):
    """Reference varlen attention: q [N, Hq, d], k/v [N, Hkv, d], `bounds` the host boundaries."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * (scale or q.shape[-1] ** -0.5)
        causal_mask = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal_mask, float("-inf")).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v[s:e])
    return out


def test_flash_varlen_path_wiring(monkeypatch):
    """With flash-attn chosen, its varlen kernel gets [N, heads, d] q/k/v, int32 cu_seqlens and
    causal=True (a fake kernel written here stands in for flash-attn on CPU)."""
    model = tiny_llama(kv_heads=2)
    embeds, mask, labels = ragged([9, 4, 7])
    seen = []

    def fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                    softmax_scale, causal):
        assert q.dim() == 3 and causal and cu_seqlens_q.dtype == torch.int32
        seen.append((tuple(q.shape), cu_seqlens_q.tolist(), max_seqlen_q))
        return _causal_per_sample(q, k, v, cu_seqlens_q.tolist(), softmax_scale)

    monkeypatch.setattr(packing, "packing_backend", lambda *a, **k: ("flash_attn_varlen", "test"))
    monkeypatch.setattr(packing, "_flash_attn", lambda: (fake_varlen, "fake"))
    assert_same_step(model, embeds, mask, labels)
    assert seen and seen[0] == ((20, 4, H // 4), [0, 9, 13, 20], 9)


def _fake_torch_varlen(seen):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn that checks each call against the
    real function's signature and records (q shape, cu_seq_q, max_q, window_size, enable_gqa)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    real = inspect.signature(varlen_attn)

    def fake(*args, **kwargs):
        bound = real.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        q, k, cu = a["query"], a["key"], a["cu_seq_q"]
        assert q.dim() == 3 and cu.dtype == torch.int32 and a["cu_seq_k"] is cu
        seen.append((tuple(q.shape), cu.tolist(), a["max_q"], a["max_k"], a["window_size"], a["enable_gqa"]))
        return _causal_per_sample(q, k, a["value"], cu.tolist(), a["scale"])

    return fake


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_torch_varlen_attn_path_one_call_per_layer(monkeypatch, kv_heads):
    """With torch's varlen_attn chosen (CUDA, half precision), every layer makes one call over the
    packed row [N, heads, d] (no per-sample split), causal through window_size=(-1, 0), GQA
    through enable_gqa, the host-side longest sample as max_q; same loss and gradients as the
    padded step."""
    model = tiny_llama(kv_heads=kv_heads)
    embeds, mask, labels = ragged([9, 4, 7])
    seen = []
    monkeypatch.setattr(packing, "packing_backend", lambda *a, **k: ("varlen_attn", "test"))
    monkeypatch.setattr(packing, "_torch_varlen", lambda: (_fake_torch_varlen(seen), None))
    assert_same_step(model, embeds, mask, labels)
    want = ((20, 4, H // 4), [0, 9, 13, 20], 9, 9, (-1, 0), kv_heads != 4)
    assert seen == [want] * model.config.num_hidden_layers


def test_static_step_with_torch_varlen_bounds_the_longest_sample_by_n(monkeypatch):
    """The compiled step's function with varlen_attn: one call per layer with max_q = N (no host
    value of the plan enters the graph), the same summed loss as the masked fallback."""
    from sam_fast.data.pack_plan import PackPlan

    model = tiny_llama(kv_heads=2)
    embeds, mask, labels = ragged([9, 4, 7])
    ids = torch.randint(0, V, mask.shape, generator=torch.Generator().manual_seed(1))
    plan = PackPlan.from_tensors(ids, mask, labels, [0, 0, 0], image_token_index=V + 1, num_query_tokens=32)
    packed_embeds = embeds.reshape(-1, H).index_select(0, plan.index)
    args = (model, packed_embeds, plan.position_ids, plan.cu_seqlens, plan.target_rows, plan.targets)
    seen = []
    monkeypatch.setattr(packing, "_torch_varlen", lambda: (_fake_torch_varlen(seen), None))
    with use_attention(model):
        masked = packing.static_planned_loss_sum(*args, "sdpa_segments")
        assert not seen
        got = packing.static_planned_loss_sum(*args, "varlen_attn")
    assert seen == [((20, 4, H // 4), [0, 9, 13, 20], 20, 20, (-1, 0), True)] * 2
    torch.testing.assert_close(got, masked, rtol=1e-6, atol=0)


def test_masked_fallback_is_one_sdpa_call_per_layer(monkeypatch):
    """The CUDA fallback (no varlen kernel): one masked SDPA call per layer over the whole row,
    same loss and gradients as the padded step."""
    model = tiny_llama(kv_heads=2)
    embeds, mask, labels = ragged([9, 4, 7])
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append((q.shape[-2], kw.get("attn_mask") is not None))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(packing, "packing_backend", lambda *a, **k: ("sdpa_segment_mask", "test"))
    with monkeypatch.context() as spying:
        spying.setattr(packing.F, "scaled_dot_product_attention", spy)
        packed_step(model, embeds, mask, labels)
    assert calls == [(20, True)] * model.config.num_hidden_layers
    assert_same_step(model, embeds, mask, labels)


def test_packing_backend_reasons(monkeypatch):
    name, why = packing_backend("cpu", torch.float32)
    assert name == "sdpa_segments" and why.startswith("device is cpu: one causal SDPA per sample measured fastest")
    assert "masked SDPA" in why and "jagged" in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    name, why = packing_backend(torch.device("cuda"), torch.float32)
    assert name == "sdpa_segment_mask" and "float32" in why
    monkeypatch.setitem(packing._FLASH, "result", (None, "ModuleNotFoundError: No module named 'flash_attn'"))
    name, why = packing_backend(torch.device("cuda"), torch.bfloat16)
    assert name == "sdpa_segment_mask" and "CUDA is not available" in why
    assert "not installed" in why and "flash_attn" in why
    monkeypatch.setitem(packing._FLASH, "result", (lambda *a, **k: None, "2.8.3"))
    assert packing_backend(torch.device("cuda"), torch.bfloat16, head_dim=128) == (
        "flash_attn_varlen", "flash-attn 2.8.3 on CUDA, torch.bfloat16 (torch's varlen_attn: CUDA is not available)")
    assert packing_backend(torch.device("cuda"), torch.float16, head_dim=12)[0] == "sdpa_segment_mask"


def test_packing_backend_prefers_torch_varlen_on_a_capable_gpu(monkeypatch):
    """torch's varlen_attn wins over flash-attn where its flash kernel runs (compute capability 8.0+,
    half precision, head dim up to 256); an older GPU falls through to flash-attn / the mask."""
    monkeypatch.setitem(packing._FLASH, "result", (lambda *a, **k: None, "2.8.3"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert packing_backend("cuda", torch.bfloat16, 128) == (
        "varlen_attn", "torch.nn.attention.varlen.varlen_attn on CUDA, torch.bfloat16")
    assert packing_backend("cuda", torch.bfloat16, 264)[0] == "sdpa_segment_mask"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    name, why = packing_backend("cuda", torch.float16, 128)
    assert name == "flash_attn_varlen" and "compute capability 7.5" in why


@pytest.mark.parametrize(
    "mask_row, labels_row, match",
    [
        ([1, 0, 1, 1], [-100, -100, 4, 5], "attention_mask row 1 has a gap"),
        ([1, 1, 1, 0], [-100, 4, 5, 6], "labels row 1 has a label other than -100 at a padded position"),
        ([1, 2, 1, 0], [-100, 4, 5, -100], "attention_mask row 1 holds values other than 0 and 1"),
    ],
)
def test_bad_input_names_the_row(mask_row, labels_row, match):
    embeds = torch.randn(2, 4, H)
    mask = torch.tensor([[1, 1, 1, 1], mask_row])
    labels = torch.tensor([[-100, 1, 2, 3], labels_row])
    with pytest.raises(ValueError, match=match):
        pack(embeds, mask, labels)


def test_no_supervised_position_refused():
    model = tiny_llama()
    embeds, mask, _ = ragged([4, 3])
    labels = torch.full_like(mask, -100)
    labels[1, 0] = 7  # a first token is never a target
    with pytest.raises(ValueError, match="no supervised next-token position"):
        packed_lm_loss(model, embeds, mask, labels)


def test_sam_tiny_language_model():
    """The LLM that SAM builds (SAMConfig.tiny) runs packed with the padded step's loss and gradients,
    and keeps its attention implementation."""
    from _sam_helpers import tiny_sam

    sam = tiny_sam()
    lm = sam.language_model
    before = lm.config._attn_implementation
    g = torch.Generator().manual_seed(3)
    lengths = [13, 7, 10]
    B, S, width = len(lengths), max(lengths), lm.config.hidden_size
    embeds = torch.randn(B, S, width, generator=g)
    mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        labels[b, n // 2 : n] = torch.randint(0, lm.config.vocab_size, (n - n // 2,), generator=g)
    assert_same_step(lm, embeds, mask, labels)
    assert lm.config._attn_implementation == before
    assert sam.config.text_config._attn_implementation == before


def test_num_items_in_batch_divides_the_summed_loss():
    model = tiny_llama()
    embeds, mask, labels = ragged([8, 5])
    ref = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, num_items_in_batch=40).loss
    loss = packed_lm_loss(model, embeds, mask, labels, num_items_in_batch=40)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss * 40 / n, packed_lm_loss(model, embeds, mask, labels), rtol=1e-5, atol=0)


def test_unpack_one_token_batch():
    embeds = torch.randn(2, 3, 4)
    mask = torch.tensor([[0, 0, 0], [0, 1, 0]])
    p = pack(embeds, mask)
    back = unpack(p.inputs_embeds, p)
    assert back.shape == (2, 3, 4)
    torch.testing.assert_close(back[1, 1], embeds[1, 1])
    assert torch.count_nonzero(back[0]) == 0 and p.seqlens == (0, 1) and p.cu_seqlens.tolist() == [0, 0, 1]


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_packed_step_runs_the_lean_llama_ops_for_the_call_only(monkeypatch):
    """The packed step's RMSNorm/SwiGLU are the lean autograd ops (on CPU: the ``torch``
    backend, which keeps fewer tensors for the backward); the model gets HF's forwards back after
    the call, so the padded path and generation are untouched. Same loss and gradient as HF's
    padded step (`assert_same_step`)."""
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    model = tiny_llama(kv_heads=2)
    embeds, mask, labels = ragged([11, 6, 3, 9])
    e = embeds.clone().requires_grad_(True)
    names = _grad_fn_names(packed_lm_loss(model, e, mask, labels))
    assert {"_RMSNormFnBackward", "_SwiGLUFnBackward"} <= names, sorted(names)
    assert all("forward" not in m.__dict__ for m in model.modules())
    e = embeds.clone().requires_grad_(True)
    padded = model(inputs_embeds=e, attention_mask=mask, labels=labels).loss
    assert "_RMSNormFnBackward" not in _grad_fn_names(padded)
    assert_same_step(model, embeds, mask, labels)


def test_split_attention_gradient_has_no_whole_row_fills(monkeypatch):
    """The per-sample attention splits the packed row (one concatenation in the backward) instead
    of slicing it (a zero tensor of the whole row per slice and sample)."""
    model = tiny_llama(kv_heads=2)
    embeds, mask, labels = ragged([11, 6, 3, 9])
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append({type(t.grad_fn).__name__ for t in (q, k, v)})
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(packing.F, "scaled_dot_product_attention", spy)
    packed_lm_loss(model, embeds.clone().requires_grad_(True), mask, labels)
    assert len(seen) == 4 * model.config.num_hidden_layers
    assert all(names == {"SplitWithSizesBackward0"} for names in seen), seen



# -- the pack plan: the packed training step without host reads ----------------------------------

def test_host_read_counter_sees_every_kind():
    """`HostReads` counts each kind of read once (so the zero counts below can fail) and plain
    device work not at all."""
    from _host_reads import HostReads

    t = torch.arange(6.0)
    cases = {
        "item": lambda: t.sum().item(), "tolist": lambda: t.tolist(), "__bool__": lambda: bool(t.sum()),
        "__int__": lambda: int(t[1]), "__float__": lambda: float(t[1]), "__index__": lambda: [0, 1, 2][t.long()[1]],
        "nonzero": lambda: torch.nonzero(t), "masked_select": lambda: t.masked_select(t > 2),
        "unique": lambda: torch.unique(t), "cpu": lambda: t.cpu(), "__getitem__": lambda: t[t > 2],
    }
    for name, read in cases.items():
        with HostReads() as reads:
            read()
        assert dict(reads.counts) == {name: 1}, (name, dict(reads.counts))
    with HostReads() as reads:
        (t * 2).cumsum(0).index_select(0, torch.tensor([1, 3])).index_fill(0, torch.tensor([0]), 0)
    assert reads.total == 0, reads.report()


TEXTS = ["describe {image#1}", "compare {image#1}, {image#2} and {image#3} in detail, one by one",
         "what differs?", "which of the four shows a dog, and why do you think so", "a"]
ANSWERS = ["a red circle on a blue background", "no", "the left one is bigger than the right one", "the third",
           "ok fine"]
COUNTS = [1, 3, 2, 4, 1]


def _training_batch(model, counts=COUNTS, picks=None, seed=0):
    """A ragged training batch (1 to 4 images, instructions and answers of many lengths) as the
    data pipeline builds it: `SAMProcessor` with answers (EvalTransform, PromptBuilder, Collator);
    sample i has ``counts[i]`` images and the text and answer ``picks[i]`` (default i)."""
    import numpy as np
    from PIL import Image

    from sam_fast import SAMProcessor
    from sam_fast.data import tiny_tokenizers

    rng = np.random.default_rng(seed)
    images = [[Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(n)] for n in counts]
    processor = SAMProcessor.for_model(model, *tiny_tokenizers())
    picks = range(len(counts)) if picks is None else picks
    return dict(processor(images=images, text=[TEXTS[i] for i in picks], answers=[ANSWERS[i] for i in picks]))


def _trainable_sam(**overrides):
    from _sam_helpers import randomize_guidance, tiny_sam

    return randomize_guidance(tiny_sam(**overrides)).train()


def _with_features(model, batch):
    with torch.no_grad():
        feats = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    return {**batch, "image_features": feats}


@pytest.fixture(scope="module")
def sam_step():
    """(trainable tiny SAM with random guidance, its training batch, cached features included)."""
    model = _trainable_sam()
    return model, _with_features(model, _training_batch(model))


def _inputs(batch, images="features", plan=True):
    drop = {"features": "pixel_values", "pixels": "image_features"}[images]
    return {k: v for k, v in batch.items() if k != drop and (plan or k != "pack_plan")}


def _step(model, inputs):
    """(loss, {name: gradient} of the trainable tensors) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_bitwise(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b), (loss_a, loss_b)
    assert sorted(grads_a) == sorted(grads_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("images", ["features", "pixels"])
def test_planned_training_step_reads_nothing_from_the_host(sam_step, images):
    """The batch's pack plan (built by the collator) leaves the packed step (forward + backward,
    the ViT included from pixels) without a single host read; a batch without it costs two (the
    image counts, and one copy of ids, mask and labels from which the plan is then built)."""
    from _host_reads import HostReads

    model, batch = sam_step
    with HostReads() as reads:
        model(**_inputs(batch, images)).loss.backward()
    assert reads.total == 0, reads.report()
    with HostReads() as reads:
        model(**_inputs(batch, images, plan=False)).loss.backward()
    assert dict(reads.counts) == {"tolist": 2}, reads.report()
    model.zero_grad(set_to_none=True)


def test_planned_step_with_fused_projections(sam_step):
    """The LLM with fused Q/K/V and gate|up projections (`apply_fused_llama_kernels`): the planned
    packed step reads nothing from the host and gives the unfused step's loss and trainable
    gradients (fp32, rel 1e-5); removing the fusion gives back the unfused step bit for bit."""
    from _host_reads import HostReads

    from sam_fast.models.llama_kernels import apply_fused_llama_kernels, remove_fused_llama_kernels

    model, batch = sam_step
    want = _step(model, _inputs(batch))
    report = apply_fused_llama_kernels(model.language_model, force=True)
    try:
        assert report["fused_projections"]["qkv_proj"] == model.config.text_config.num_hidden_layers
        with HostReads() as reads:
            model(**_inputs(batch)).loss.backward()
        assert reads.total == 0, reads.report()
        loss, grads = _step(model, _inputs(batch))
    finally:
        remove_fused_llama_kernels(model.language_model)
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=0)
    scale = max(float(g.abs().max()) for g in want[1].values())  # a gradient that is 0 (shift-invariant) gets noise
    for name, g in want[1].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * max(float(g.abs().max()), 1e-4 * scale),
                                   msg=name)
    _assert_bitwise(_step(model, _inputs(batch)), want)


def _left_padded(model, batch):
    """The batch with every LLM row moved to the right end (left padding), and its plan built for
    that layout from host lists (as a collator would)."""
    from sam_fast.data import PackPlan

    out, S, rows = dict(batch), batch["input_ids"].shape[1], []
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.full_like(batch[key], pad)
    for b, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        for key in ("input_ids", "attention_mask", "labels"):
            out[key][b, S - n:] = batch[key][b, :n]
        rows.append((S - n, batch["input_ids"][b, :n].tolist(), batch["labels"][b, :n].tolist()))
    out["pack_plan"] = PackPlan.build(rows, S, batch["pack_plan"].image_counts, model.config.image_token_index,
                                      model.config.num_query_tokens)
    return out


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("counts, picks", [(COUNTS, None), ([1, 1, 1], [0, 2, 4])])
def test_plan_or_none_right_or_left_padding_same_step_bit_for_bit(mode, counts, picks):
    """Loss and every trainable gradient are the same bits with the collator's plan, without a plan
    (built from the tensors), and for the same samples left-padded (with or without their plan):
    the packed step sees the same tokens in the same order."""
    model = _trainable_sam(context_mode=mode)
    batch = _with_features(model, _training_batch(model, counts, picks))
    assert batch["attention_mask"][:, 0].all() and not batch["attention_mask"].all()  # right-padded, ragged
    ref = _step(model, _inputs(batch))
    assert ref[1]["guidance_in.weight"].abs().max() > 0 or counts == [1, 1, 1]
    _assert_bitwise(_step(model, _inputs(batch, plan=False)), ref)
    left = _left_padded(model, batch)
    _assert_bitwise(_step(model, _inputs(left)), ref)
    _assert_bitwise(_step(model, _inputs(left, plan=False)), ref)


def test_planned_step_equals_the_padded_llm_call(sam_step):
    """The planned packed step against the padded HF call (``packing=False``, which takes the
    plan's image counts): same loss and gradients (fp32, rel 1e-5)."""
    model, batch = sam_step
    loss, grads = _step(model, _inputs(batch))
    ref_loss, ref_grads = _step(model, {**_inputs(batch), "packing": False})
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, ref in ref_grads.items():
        if name == "adaptive_adjustment.bias":  # exactly 0 (the softmax ignores it): both are rounding noise
            assert grads[name].abs().max() < 1e-6 and ref.abs().max() < 1e-6
            continue
        assert ref.abs().max() > 1e-4, name
        assert (grads[name] - ref).norm() <= 1e-5 * ref.norm(), name


def test_collator_plan_is_the_plan_of_its_tensors(sam_step):
    """The plan the collator builds from its token lists equals the one built from the padded
    tensors it returns."""
    from _host_reads import assert_same_plan

    from sam_fast.data import PackPlan

    model, batch = sam_step
    built = PackPlan.from_tensors(batch["input_ids"], batch["attention_mask"], batch["labels"], COUNTS,
                                  model.config.image_token_index, model.config.num_query_tokens)
    assert_same_plan(batch["pack_plan"], built)


def test_plan_layout_spelled_out():
    """Two samples in rows 5 wide (placeholder 9, Q = 2, one image each): sample 0 from column 0,
    sample 1 from column 1 (left-padded); a sample's first label is nobody's target."""
    from sam_fast.data import PackPlan

    plan = PackPlan.build([(0, [9, 9, 1, 4, 5], [-100, -100, -100, 4, 5]), (1, [9, 9, 7], [-100, -100, 7]),
                           (2, [9, 9, 8], [3, -100, -100])], 5, [1, 1, 1], 9, 2)
    assert plan.index.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 12, 13, 14]
    assert plan.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2]
    assert plan.cu_seqlens.tolist() == [0, 5, 8, 11] and plan.cu_seqlens.dtype == torch.int32
    assert plan.image_rows.tolist() == [0, 1, 5, 6, 8, 9]
    assert plan.target_rows.tolist() == [2, 3, 6] and plan.targets.tolist() == [4, 5, 7]
    assert plan.seqlens == (5, 3, 3) and plan.max_seqlen == 5 and plan.num_tokens == 11
    assert plan.num_labels == 4 and plan.batch_shape == (3, 5) and plan.image_counts == (1, 1, 1)


@pytest.mark.parametrize(
    "mask_row, labels_row, match",
    [
        ([1, 0, 1, 1], [-100, -100, 4, 5], "attention_mask row 1 has a gap"),
        ([1, 1, 1, 0], [-100, 4, 5, 6], "labels row 1 has a label other than -100 at a padded position"),
        ([1, 2, 1, 0], [-100, 4, 5, -100], "attention_mask row 1 holds values other than 0 and 1"),
        ([1.0, 0.5, 1.0, 0.0], [-100, 4, 5, -100], "attention_mask row 1 holds values other than 0 and 1"),
        ([1, 1, 1, 0], [-100, -7, 5, -100], r"labels row 1 holds -7 at position 1"),
        ([1, 1, 1, 0], [-100, 50, 5, -100], r"labels row 1 holds 50 at position 1: .* \(\[0, 50\)\)"),
    ],
)
def test_plan_from_bad_tensors_names_the_row(mask_row, labels_row, match):
    from sam_fast.data import PackPlan, PackPlanError

    mask = torch.tensor([[1, 1, 1, 1], mask_row])
    labels = torch.tensor([[-100, 1, 2, 3], labels_row])
    ids = torch.tensor([[9, 1, 2, 3], [9, 4, 5, 6]])
    with pytest.raises(PackPlanError, match=match) as err:
        PackPlan.from_tensors(ids, mask, labels, [1, 1], 9, 1, vocab_size=50)
    assert err.value.row == 1 and "\n" not in str(err.value)


def test_placeholder_mismatch_without_a_plan_names_the_sample(sam_step):
    model, batch = sam_step
    inputs = _inputs(batch, plan=False)
    inputs["image_counts"] = torch.tensor([1, 3, 3, 3, 1])
    with pytest.raises(ValueError, match=r"\(sample, found, expected\): \[\(2, 16, 24\), \(3, 32, 24\)\]"):
        model(**inputs)


def test_a_plan_for_another_batch_is_refused(sam_step):
    """A plan must describe its batch: another shape is refused on the host, other tokens,
    placeholders or labels by the device-side check (a RuntimeError on the CPU)."""
    model, batch = sam_step
    other = _training_batch(model, COUNTS[:3])
    with pytest.raises(ValueError, match=r"pack_plan was built for a batch of shape \(3, \d+\)"):
        model(**{**_inputs(batch), "pack_plan": other["pack_plan"]})
    with pytest.raises(ValueError, match=r"image_counts \[1, 3, 2, 4, 2\] differ from pack_plan's"):
        model(**{**_inputs(batch), "image_counts": [1, 3, 2, 4, 2]})
    labels = batch["labels"].clone()
    labels[0, 10] = 5  # a prompt token now supervised
    ids = batch["input_ids"].clone()
    ids[1, [0, 30]] = ids[1, [30, 0]]  # a placeholder moved into the text
    mask = batch["attention_mask"].clone()
    mask[4, 60] = 1  # a pad token now attended
    for change in ({"labels": labels}, {"input_ids": ids}, {"attention_mask": mask}):
        with pytest.raises(RuntimeError, match="pack_plan does not describe this batch"):
            model(**{**_inputs(batch), **change})


def test_plan_travels_with_the_batch(sam_step):
    """The plan survives every batch mover: `model_inputs` (moved like the tensors, non_blocking),
    pickling (DataLoader workers), a rebuild of mappings as HF Trainer / accelerate do, and a plain
    dict; generation inputs leave it out, and `generate` ignores it."""
    import pickle

    from _host_reads import assert_same_plan

    from sam_fast.data import PackPlan, model_inputs

    model, batch = sam_step
    plan = batch["pack_plan"]
    moved = model_inputs(batch, "cpu", non_blocking=True)["pack_plan"]
    assert isinstance(moved, PackPlan)
    assert_same_plan(moved, plan)
    assert_same_plan(pickle.loads(pickle.dumps(plan)), plan)
    assert_same_plan(type(plan)({k: v for k, v in plan.items()}), plan)
    ref = _step(model, _inputs(batch))
    _assert_bitwise(_step(model, {**_inputs(batch), "pack_plan": dict(plan)}), ref)
    gen = model_inputs(batch, generation=True)
    assert "pack_plan" not in gen and "labels" not in gen
    model.eval()
    try:
        prompt = {k: batch[k] for k in ("image_features", "image_counts", "qformer_input_ids", "qformer_attention_mask",
                                        "input_ids", "attention_mask")}
        want = model.generate(**prompt, max_new_tokens=2, num_beams=1)
        assert torch.equal(model.generate(**prompt, pack_plan=plan, max_new_tokens=2, num_beams=1), want)
    finally:
        model.train()


def test_bucketed_plan_layout_spelled_out():
    """Bucketed to multiples of 8 tokens and 4 targets: 8 tokens already fill a bucket, yet a
    filler segment is added (so cu_seqlens always has B + 2 entries): 8 more tokens (their own
    cu_seqlens entry, positions from 0), and one -100 target at the filler's first row."""
    from sam_fast.data import PackPlan

    plan = PackPlan.build([(0, [9, 9, 1, 4, 5], [-100, -100, -100, 4, 5]), (1, [9, 9, 7], [-100, -100, 7])],
                          5, [1, 1], 9, 2)
    b = plan.bucketed(tokens=8, targets=4)
    assert b.index.tolist() == [0, 1, 2, 3, 4, 6, 7, 8] + [0] * 8
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]
    assert b.cu_seqlens.tolist() == [0, 5, 8, 16] and b.cu_seqlens.dtype == torch.int32
    assert b.seqlens == (5, 3, 8) and b.filler_tokens == 8 and b.filler_targets == 1
    assert b.target_rows.tolist() == [2, 3, 6, 8] and b.targets.tolist() == [4, 5, 7, -100]
    assert b.num_tokens == 8 and b.packed_length == 16 and b.num_targets == 3
    assert b.image_rows.tolist() == [0, 1, 5, 6] and b.num_labels == 3 and b.batch_shape == (2, 5)
    assert b.bucketed(tokens=64) is b and plan.filler_tokens == 0 and plan.packed_length == 8
    with pytest.raises(ValueError, match="buckets must be >= 1"):
        plan.bucketed(tokens=0)


def test_bucketed_plan_same_step_and_no_host_read(sam_step):
    """The filler changes nothing: a bucketed plan's eager step has the loss and gradients of the
    plain plan's (rel 1e-6) and still reads nothing back from the host."""
    from _host_reads import HostReads

    model, batch = sam_step
    ref = _step(model, _inputs(batch))
    bucketed = {**_inputs(batch), "pack_plan": batch["pack_plan"].bucketed(tokens=64, targets=16)}
    assert bucketed["pack_plan"].filler_tokens > 0 and bucketed["pack_plan"].filler_targets > 0
    loss, grads = _step(model, bucketed)
    torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=0)
    for name, g in ref[1].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)
    with HostReads() as reads:
        model(**bucketed).loss.backward()
    assert reads.total == 0, reads.report()
    model.zero_grad(set_to_none=True)


def test_segment_mask_attention_equals_per_sample_attention():
    """The static-shape attention (one SDPA call, segment mask built on the device) gives the
    per-sample calls' output."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 2, 6, 9], dtype=torch.int32)
    seg = packing.segment_ids(cu, 9)
    assert seg.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    got = packing._sdpa_segment_mask(q, k, v, seg, None, 0.0)
    want = packing._sdpa_segments(q, k, v, (2, 4, 3), None, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
