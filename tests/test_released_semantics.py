"""The model keeps the released code's semantics where users meet them: one-image samples in shared
mode, a real-sized Vicuna tokenizer whose [PAD] is 32000, training mode, DDP, and inputs refused
with one clear error."""

from __future__ import annotations

import pytest
import torch

from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam
from sam_fast import SAMConfig
from sam_fast.data.tokenization import PromptBuilder, tiny_tokenizers
from sam_fast.reference import reference_encode_images, released_schedule_encode_images


def _encode(model, feats, counts, ids):
    with torch.no_grad():
        return model.encode_images(image_features=feats, image_counts=counts, qformer_input_ids=ids)


def test_shared_mode_one_image_sample_is_guided_by_its_own_image():
    """Released code: softmax over one image is the image, so a one-image sample's tokens equal
    those of a sample holding that image twice (an identity that needs no reference code)."""
    model = randomize_guidance(tiny_sam(context_mode="shared"))
    feats, ids, _ = ragged_batch(model, [1])
    once = _encode(model, feats, [1], ids)
    twice = _encode(model, feats.repeat(2, 1, 1), [2], ids)
    torch.testing.assert_close(once[0], twice[0], rtol=1e-5, atol=1e-5)
    plain = _encode(randomize_guidance(tiny_sam(context_mode="shared", guidance="none")), feats, [1], ids)
    assert (once - plain).abs().max() > 1e-2  # guided, not InstructBLIP's tokens


@pytest.mark.parametrize("mode", ["shared", "leave_one_out"])
def test_one_image_samples_match_both_references(mode):
    model = randomize_guidance(tiny_sam(context_mode=mode))
    counts = [1, 3, 1, 2]
    feats, ids, _ = ragged_batch(model, counts)
    ours = _encode(model, feats, counts, ids)
    with torch.no_grad():
        ref = reference_encode_images(model, feats, counts, ids)
        released = released_schedule_encode_images(model, feats, counts, ids)
        plain = _encode(randomize_guidance(tiny_sam(context_mode=mode, guidance="none")), feats, counts, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(released, ref, rtol=1e-5, atol=1e-5)
    moved = (ours[[0, 4]] - plain[[0, 4]]).abs().max()  # the two one-image samples
    assert (moved > 1e-2) if mode == "shared" else (moved < 1e-6)


# -- a real-sized Vicuna tokenizer ---------------------------------------------------------------
def vicuna_like_tokenizer():
    """32000 ids with LLaMA's <unk> <s> </s> at 0-2, plus the [PAD] = 32000 that the released code
    adds (its </s> is bos = eos), built offline."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = "what is common in these images the a red blue circle square story of and".split()
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    vocab.update({f"w{i}": i for i in range(len(vocab), 32000)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="</s>", bos_token="</s>", eos_token="</s>")
    fast.add_special_tokens({"pad_token": "[PAD]"})
    assert fast.pad_token_id == 32000 and len(fast) == 32001
    return fast


def _vicuna_sized_tiny(**overrides):
    """Tiny SAM whose LLM vocabulary is LAVIS' Vicuna one (32001) and whose image id is the
    full-size config's."""
    full = SAMConfig.instructblip_vicuna7b()
    text = SAMConfig.tiny().text_config.to_dict()
    text["vocab_size"] = full.text_config.vocab_size
    return tiny_sam(text_config=text, image_token_index=full.image_token_index, **overrides)


def test_full_size_image_id_is_never_a_real_token():
    full = SAMConfig.instructblip_vicuna7b()
    assert full.text_config.vocab_size == 32001
    assert full.image_token_index >= full.text_config.vocab_size  # not [PAD] (32000), not any token


def test_real_sized_tokenizer_padded_ragged_batch_trains_and_generates():
    model = randomize_guidance(_vicuna_sized_tiny())
    qtok, _ = tiny_tokenizers()
    pb = PromptBuilder.for_model(model.config, qtok, vicuna_like_tokenizer())
    counts = [1, 3]
    encoded = [pb.encode("what is common", 1, "a red circle"),
               pb.encode("what is common in these images the story", 3, "blue")]
    batch = pb.batch_text(encoded, train=True)
    assert (batch["input_ids"] == 32000).any()  # prompts of different lengths: [PAD] present
    feats, _, _ = ragged_batch(model, counts)
    out = model(image_features=feats, image_counts=counts, **batch)
    assert torch.isfinite(out.loss)
    gen = pb.batch_text([pb.encode("what is common", 1), pb.encode("the story of these images", 3)], train=False)
    with torch.no_grad():
        ids = model.generate(image_features=feats, image_counts=counts, num_beams=2, max_new_tokens=4, **gen)
    assert ids.shape[0] == 2


def test_image_id_equal_to_pad_is_refused():
    qtok, _ = tiny_tokenizers()
    with pytest.raises(ValueError, match="image_token_index=32000 equals the LLM tokenizer's pad id"):
        PromptBuilder(qtok, vicuna_like_tokenizer(), num_query_tokens=4, image_token_index=32000)
    text = SAMConfig.tiny().text_config.to_dict()
    text["pad_token_id"] = 5
    with pytest.raises(ValueError, match="image_token_index=5 equals text_config.pad_token_id"):
        SAMConfig.tiny(text_config=text, image_token_index=5)


def test_older_instructblip_config_without_image_id_gets_one_outside_the_vocabulary():
    d = SAMConfig.tiny().to_dict()
    d["image_token_index"] = None
    cfg = SAMConfig.from_instructblip_config(d)
    assert cfg.image_token_index == cfg.text_config.vocab_size


# -- training mode and DDP ------------------------------------------------------------------------
def test_train_mode_leaves_the_frozen_backbone_dropout_off():
    model = randomize_guidance(tiny_sam())
    assert model.config.qformer_config.hidden_dropout_prob > 0
    model.train()
    assert model.training and model.guidance_in.training and model.language_projection.training
    assert not (model.qformer.training or model.vision_model.training or model.language_model.training)
    feats, ids, _ = ragged_batch(model, [2, 1])
    a = model.encode_images(image_features=feats, image_counts=[2, 1], qformer_input_ids=ids)
    b = model.encode_images(image_features=feats, image_counts=[2, 1], qformer_input_ids=ids)
    assert torch.equal(a, b)


_DDP_ONE_IMAGE = r"""
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = randomize_guidance(tiny_sam())
model.train()
ddp = DistributedDataParallel(model)
counts = [1, 1]
feats, qids, _ = ragged_batch(model, counts)
Q, tok = model.config.num_query_tokens, model.config.image_token_index
ids = torch.cat([torch.full((2, Q), tok), torch.randint(4, 100, (2, 5))], 1)
labels = ids.masked_fill(ids == tok, -100)
for _ in range(3):  # DDP reports unused parameters at the next iteration
    out = ddp(image_features=feats, image_counts=counts, qformer_input_ids=qids, input_ids=ids, labels=labels)
    out.loss.backward()
assert model.guidance_in.weight.grad is not None and not model.guidance_in.weight.grad.any()
assert model.language_projection.weight.grad.abs().sum() > 0
dist.destroy_process_group()
print("ok")
"""


def test_standard_ddp_trains_on_one_image_batches(tmp_path):
    """DistributedDataParallel without find_unused_parameters: a batch of one-image samples
    (leave_one_out: no W-stream) still gives every trainable parameter a (zero) gradient. It runs
    in its own process under a timeout: in the test process a gloo process group once hung the
    suite at this test's call (gloo threads left by earlier objects), with nothing to cut it."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _DDP_ONE_IMAGE, str(tmp_path / "rdzv")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# -- inputs refused at the boundary ---------------------------------------------------------------
@pytest.mark.parametrize("counts, match", [
    ([2.9, 3.9], "image_counts must hold integers, got 2.9"),
    ("23", "image_counts must be a list of integers"),
    ([True, 1], "image_counts must hold integers, got True"),
    (torch.tensor([2.0, 1.0]), "1-D integer tensor"),
])
def test_image_counts_must_be_integers(tiny, counts, match):
    feats, ids, _ = ragged_batch(tiny, [2, 1])
    with pytest.raises(ValueError, match=match):
        tiny.encode_images(image_features=feats, image_counts=counts, qformer_input_ids=ids)


def test_too_long_prompt_and_label_free_batch_are_refused(tiny):
    feats, qids, _ = ragged_batch(tiny, [1])
    Q, tok = tiny.config.num_query_tokens, tiny.config.image_token_index
    limit = tiny.config.text_config.max_position_embeddings
    long_ids = torch.cat([torch.full((1, Q), tok), torch.randint(4, 100, (1, limit))], 1)
    with pytest.raises(ValueError, match=f"at most max_position_embeddings={limit}"):
        tiny(image_features=feats, image_counts=[1], qformer_input_ids=qids, input_ids=long_ids)
    ids = long_ids[:, : Q + 5]
    with pytest.raises(ValueError, match="labels has no predicted position"):
        tiny(image_features=feats, image_counts=[1], qformer_input_ids=qids, input_ids=ids,
             labels=torch.full_like(ids, -100))


# -- the packed, logit-free training step -----------------------------------------------------------
@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_packed_loss_equals_the_padded_llm_call(mode):
    """SAM.forward with labels: packed LLM + fused loss (default) against the padded HF call:
    same loss and gradients of every trainable tensor (fp32, rel 1e-5)."""
    from sam_fast.bench_plan import realistic_batch, realistic_shapes

    model = randomize_guidance(tiny_sam(context_mode=mode))
    model.train()
    shapes = realistic_shapes(seed=3)[:4]
    batch = realistic_batch(model.config, shapes, seed=3)
    batch.pop("pixel_values")
    for key in ("qformer_input_ids", "qformer_attention_mask"):  # the tiny Q-former has 64 positions
        batch[key] = batch[key][:, :32]
    feats, _, _ = ragged_batch(model, batch["image_counts"])
    results = []
    for packing in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(image_features=feats, packing=packing, **batch)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                        out.logits))
    (packed, g_packed, no_logits), (padded, g_padded, logits) = results
    assert no_logits is None and logits is not None
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=0)
    for name in g_padded:  # the floor: 1e-5 of the module's largest gradient (the Adaptive Adjustment's bias
        module = name.split(".")[0]  # gradient is 0 in exact arithmetic: softmax ignores a common shift)
        scale = max(float(g.abs().max()) for n, g in g_padded.items() if n.startswith(module + "."))
        torch.testing.assert_close(g_packed[name], g_padded[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
