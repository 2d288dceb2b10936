"""SAM against HF InstructBLIP (zero guidance) and against the reference model (random guidance)."""

import pytest
import torch
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam
from sam_fast import SAM, SAMConfig
from sam_fast.models import TRAINABLE_MODULES
from sam_fast.reference import reference_encode_images

COUNTS = [1, 2, 3, 5]


def hf_twin(model: SAM) -> InstructBlipForConditionalGeneration:
    """An HF InstructBLIP with the same backbone weights as `model`."""
    d = model.config.to_dict()
    for key in ("context_mode", "guidance", "interaction_layers", "model_type", "transformers_version"):
        d.pop(key, None)
    hf = InstructBlipForConditionalGeneration(InstructBlipConfig(**d)).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert missing == []
    assert sorted(unexpected) == sorted(
        f"{m}.{p}" for m in ("adaptive_adjustment", "guidance_in", "guidance_out") for p in ("weight", "bias")
    )
    return hf


def pixels(model, n, seed=0):
    s = model.config.vision_config.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def prompt_ids(model, counts, text_len=5, seed=0):
    """LLM ids: Q placeholders per image, then random text (no placeholder ids in it)."""
    g = torch.Generator().manual_seed(seed)
    Q, tok = model.config.num_query_tokens, model.config.image_token_index
    rows = []
    for n in counts:
        text = torch.randint(4, model.config.text_config.vocab_size, (text_len,), generator=g)
        text[text == tok] = tok + 1
        rows.append(torch.cat([torch.full((n * Q,), tok), text]))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):  # left padding, as for generation
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids, mask


def test_zero_guidance_equals_hf_per_image(tiny):
    hf = hf_twin(tiny)
    px = pixels(tiny, sum(COUNTS))
    _, ids, mask = ragged_batch(tiny, COUNTS, pad_sample=2)
    with torch.no_grad():
        ours = tiny.encode_images(pixel_values=px, image_counts=COUNTS, qformer_input_ids=ids, qformer_attention_mask=mask)
        sample_of = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS))
        theirs = hf.get_image_features(px, qformer_input_ids=ids[sample_of], qformer_attention_mask=mask[sample_of]).pooler_output
    assert ours.shape == (sum(COUNTS), tiny.config.num_query_tokens, tiny.config.text_config.hidden_size)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_single_image_samples_give_hf_logits_even_with_guidance():
    model = randomize_guidance(tiny_sam(seed=3))  # guidance cannot act on one-image samples
    hf = hf_twin(model)
    counts = [1, 1]
    px = pixels(model, 2, seed=1)
    _, qids, qmask = ragged_batch(model, counts, seed=1)
    ids, mask = prompt_ids(model, counts)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ours = model(pixel_values=px, image_counts=counts, qformer_input_ids=qids, qformer_attention_mask=qmask,
                     input_ids=ids, attention_mask=mask, labels=labels, packing=False)  # the padded call: logits
        theirs = hf(pixel_values=px, qformer_input_ids=qids, qformer_attention_mask=qmask,
                    input_ids=ids, attention_mask=mask, labels=labels)
    assert (ours.logits - theirs.logits).abs().max().item() <= 1e-5
    assert abs(ours.loss.item() - theirs.loss.item()) <= 1e-5


@pytest.mark.parametrize("context_mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("guidance", ["adaptive", "mean", "none"])
@pytest.mark.parametrize("layers", [(4, 4), (1, 3), (2, 2)])
def test_encode_images_equals_reference(context_mode, guidance, layers):
    model = randomize_guidance(tiny_sam(context_mode=context_mode, guidance=guidance, interaction_layers=layers))
    feats, ids, mask = ragged_batch(model, COUNTS, pad_sample=1)
    ours = model.encode_images(image_features=feats, image_counts=torch.tensor(COUNTS), qformer_input_ids=ids,
                               qformer_attention_mask=mask)
    ref = reference_encode_images(model, feats, COUNTS, ids, mask)
    assert (ours - ref).abs().max().item() <= 1e-5
    with torch.no_grad():  # inference: compiled backends are eligible (e.g. the CPU re-weighting kernel)
        inference = model.encode_images(image_features=feats, image_counts=COUNTS, qformer_input_ids=ids,
                                         qformer_attention_mask=mask)
    assert (inference - ref).abs().max().item() <= 1e-5

    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.randn_like(ours)
    got = torch.autograd.grad(ours, params, g, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True, materialize_grads=True)
    for p, a, b in zip(params, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_guidance_changes_multi_image_tokens_only():
    plain = tiny_sam()
    guided = randomize_guidance(tiny_sam())
    feats, ids, mask = ragged_batch(plain, COUNTS)
    with torch.no_grad():
        a = plain.encode_images(image_features=feats, image_counts=COUNTS, qformer_input_ids=ids)
        b = guided.encode_images(image_features=feats, image_counts=COUNTS, qformer_input_ids=ids)
    assert torch.equal(a[0], b[0]) or (a[0] - b[0]).abs().max() < 1e-6  # the one-image sample
    assert (a[1:] - b[1:]).abs().amax(dim=(1, 2)).min() > 1e-3  # every guided image moved


def test_gradients_reach_exactly_the_four_trainable_modules():
    model = randomize_guidance(tiny_sam()).train()
    feats, ids, mask = ragged_batch(model, [2, 3])
    lids, lmask = prompt_ids(model, [2, 3])
    out = model(image_features=feats, image_counts=[2, 3], qformer_input_ids=ids, input_ids=lids,
                attention_mask=lmask, labels=lids.masked_fill(lmask == 0, -100))
    out.loss.backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(TRAINABLE_MODULES)
    for name in TRAINABLE_MODULES:
        assert all(p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.trainable_state_dict())


def test_full_size_parameter_counts_on_meta():
    with torch.device("meta"):
        model = SAM(SAMConfig.instructblip_vicuna7b())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable == 4_332_417
    assert 7.8e9 < total < 8.0e9
    assert sum(t.numel() for t in model.trainable_state_dict().values()) == 4_332_417


def test_untrained_guidance_is_zero():
    model = SAM(SAMConfig.tiny())
    for m in (model.guidance_in, model.guidance_out):
        assert m.weight.abs().max() == 0 and m.bias.abs().max() == 0


def test_generate_greedy_first_token_is_forward_argmax():
    model = randomize_guidance(tiny_sam(seed=5))
    counts = [3, 1]
    feats, qids, _ = ragged_batch(model, counts)
    ids, mask = prompt_ids(model, counts)
    kw = dict(image_features=feats, image_counts=counts, qformer_input_ids=qids, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        logits = model(**kw).logits
        gen = model.generate(**kw, num_beams=1, max_new_tokens=3, repetition_penalty=1.0, min_new_tokens=3)
        beams = model.generate(**kw, max_new_tokens=4)  # the paper's defaults: 5 beams, penalty 1.5
    assert gen.shape == (2, 3)
    assert torch.equal(gen[:, 0], logits[:, -1].argmax(-1))
    assert beams.shape[0] == 2 and beams.shape[1] <= 4


def _bad(model, **kw):
    feats, ids, _ = ragged_batch(model, [1, 2])
    args = dict(image_features=feats, image_counts=[1, 2], qformer_input_ids=ids)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: dict(image_features=None, pixel_values=torch.randn(3, 3, 20, 20)), r"pixel_values must be \[T, 3, 28, 28\]"),
        (lambda m: dict(image_features=torch.randn(3, 5, 40)), r"\[T, P=5, D=48\].*\(3, 5, 40\)"),
        (lambda m: dict(image_counts=[1, 1]), r"sum to 2 but there are T=3"),
        (lambda m: dict(image_counts=[3, 0]), r"sample\(s\) \[\(1, 0\)\]"),
        (lambda m: dict(qformer_input_ids=torch.ones(3, 4, dtype=torch.long)), r"\[B=2, L\]"),
        (lambda m: dict(pixel_values=torch.randn(3, 3, 28, 28)), "exactly one of"),
    ],
)
def test_bad_encode_inputs(tiny, change, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode_images(**_bad(tiny, **change(tiny)))


def test_placeholder_count_mismatch_names_the_sample(tiny):
    feats, qids, _ = ragged_batch(tiny, [1, 2])
    ids, mask = prompt_ids(tiny, [1, 1])  # sample 1 has 2 images but 1 image's placeholders
    with pytest.raises(ValueError, match=r"\(1, 8, 16\)"):
        tiny(image_features=feats, image_counts=[1, 2], qformer_input_ids=qids, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(interaction_layers=(3, 2)), "l=3, k=2"),
        (dict(interaction_layers=(1, 5)), r"<= 4 \(the number of Q-former layers\)"),
        (dict(interaction_layers=(0, 1)), "l=0"),
        (dict(context_mode="all"), "context_mode='all'"),
        (dict(guidance="linear"), "guidance='linear'"),
        (dict(image_token_index=0), r"image_token_index=0 equals text_config.pad_token_id"),
        (dict(image_token_index=2), r"image_token_index=2 equals text_config.eos_token_id"),
        (dict(image_token_index=-1), r"image_token_index = -1: expected an integer in \[0, "),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SAMConfig.tiny(**kw)


def test_config_round_trip(tmp_path):
    cfg = SAMConfig.tiny(context_mode="shared", guidance="mean", interaction_layers=(2, 3))
    cfg.save_pretrained(tmp_path)
    back = SAMConfig.from_pretrained(tmp_path)
    assert (back.context_mode, back.guidance, back.interaction_layers) == ("shared", "mean", (2, 3))
    assert back.qformer_config.num_hidden_layers == cfg.qformer_config.num_hidden_layers


def test_recompute_qformer_defaults_to_auto_and_round_trips(tmp_path):
    """"auto" is the default and stays "auto" through config.json; True / False (and an explicit
    budget) are kept; a config.json written before the setting had a value other than a bool still
    loads as the bool it held."""
    import json

    from sam_fast.config import ConfigError

    assert SAMConfig.tiny().recompute_qformer == "auto" and SAMConfig.tiny().recompute_budget_bytes is None
    for value, budget in (("auto", None), (True, None), (False, 3 << 30), ("auto", 0)):
        SAMConfig.tiny(recompute_qformer=value, recompute_budget_bytes=budget).save_pretrained(tmp_path)
        back = SAMConfig.from_pretrained(tmp_path)
        assert (back.recompute_qformer, back.recompute_budget_bytes) == (value, budget)
    path = tmp_path / "config.json"
    for old in (True, False):  # a file of before "auto": the key holds a JSON bool, no budget key
        d = json.loads(path.read_text())
        d.pop("recompute_budget_bytes", None)
        path.write_text(json.dumps(dict(d, recompute_qformer=old)))
        assert SAMConfig.from_pretrained(tmp_path).recompute_qformer is old
    with pytest.raises(ConfigError, match="recompute_qformer = 'sometimes': expected true, false or \"auto\""):
        SAMConfig.tiny(recompute_qformer="sometimes")
    with pytest.raises(ConfigError, match="recompute_budget_bytes = -1: expected null or an integer >= 0"):
        SAMConfig.tiny(recompute_budget_bytes=-1)


def test_recompute_qformer_auto_follows_the_activation_bytes_against_the_budget():
    """Vicuna-7B proportions, 30 images with 128-token instructions in bf16: by hand, 12 layers x 60
    rows (Q- and W-stream) x 160 tokens x (9 x 768 + 2 x 3072) elements, plus 4 x 32 x 768 per row in
    the 6 cross-attention layers, x 2 bytes = 3.08e9 bytes (2.87 GiB). Kept on an 80 GiB GPU (budget
    5 GiB) or a CPU (8 GiB), recomputed on a 40 GiB GPU (2.5 GiB) or under a 1 GiB budget; the tiny
    config is kept everywhere; True / False are honoured whatever the budget."""
    from sam_fast.config import choose_recompute_qformer, qformer_activation_bytes

    big = SAMConfig.instructblip_vicuna7b()
    want = 2 * (12 * 60 * 160 * (9 * 768 + 2 * 3072) + 6 * 60 * 4 * 32 * 768)
    assert qformer_activation_bytes(big, 30, 128, 2) == want == 3_078_881_280
    assert choose_recompute_qformer(big, 30, 128, 2, "cpu")[0] is False
    on80, why80 = choose_recompute_qformer(big, 30, 128, 2, "cuda", total_memory=80 << 30)
    on40, why40 = choose_recompute_qformer(big, 30, 128, 2, "cuda", total_memory=40 << 30)
    assert (on80, on40) == (False, True)
    assert "2.87 GiB" in why80 and "5.00 GiB" in why80 and "kept" in why80 and "80 GiB" in why80
    assert "over the budget of 2.50 GiB" in why40 and "recomputed" in why40
    small = SAMConfig.instructblip_vicuna7b(recompute_budget_bytes=1 << 30)
    assert choose_recompute_qformer(small, 30, 128, 2, "cpu") == (True, choose_recompute_qformer(
        small, 30, 128, 2, "cuda", total_memory=80 << 30)[1])  # the explicit budget, whatever the device
    tiny = SAMConfig.tiny()
    assert not choose_recompute_qformer(tiny, 12, 32, 4, "cpu")[0]
    assert not choose_recompute_qformer(tiny, 12, 32, 4, "cuda", total_memory=8 << 30)[0]
    for forced in (True, False):
        for cfg in (SAMConfig.tiny(recompute_qformer=forced),
                    SAMConfig.instructblip_vicuna7b(recompute_qformer=forced, recompute_budget_bytes=0)):
            want = (forced, f"recompute_qformer={forced} in the config")
            assert choose_recompute_qformer(cfg, 30, 128, 2, "cpu") == want
    assert qformer_activation_bytes(SAMConfig.tiny(guidance="none"), 12, 32, 4) == 0  # no gradient through it
