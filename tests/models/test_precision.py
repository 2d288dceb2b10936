"""`sam_fast.models.precision`: the frozen weights cast, the trainable ones kept float32, and the
autocast that runs such a model (and leaves a model of one dtype alone)."""

import contextlib

import pytest
import torch
from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam

from sam_fast.models.precision import autocast, cast_frozen


def _encode(model, feats, counts, ids, mask):
    return model.encode_images(image_features=feats, image_counts=counts, qformer_input_ids=ids,
                               qformer_attention_mask=mask)


def test_cast_frozen_keeps_the_parameter_objects_and_trainable_fp32():
    model = tiny_sam()
    before = dict(model.named_parameters())
    cast_frozen(model, "bf16")
    after = dict(model.named_parameters())
    assert all(after[n] is before[n] for n in before)  # an optimiser built before still holds them
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable and {after[n].dtype for n in trainable} == {torch.float32}
    assert {p.dtype for n, p in after.items() if n not in trainable} == {torch.bfloat16}
    cast_frozen(model, "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="'fp8' is not one of fp32, bf16, fp16"):
        cast_frozen(model, "fp8")


def test_half_frozen_model_runs_under_its_autocast_close_to_fp32():
    """A bf16-frozen model cannot run its fp32 trainable Linears on bf16 activations by itself; under
    `autocast(model)` it does, close to the fp32 model, with fp32 gradients on the trainable modules."""
    ref_model = randomize_guidance(tiny_sam())
    model = cast_frozen(randomize_guidance(tiny_sam()), "bf16")
    counts = [1, 3, 2]
    feats, ids, mask = ragged_batch(ref_model, counts, pad_sample=1)
    with pytest.raises(RuntimeError, match="dtype"):
        _encode(model, feats, counts, ids, mask)
    with autocast(model):
        out = _encode(model, feats, counts, ids, mask)
    out.float().sum().backward()
    with torch.no_grad():
        ref = _encode(ref_model, feats, counts, ids, mask)
    assert (out.float() - ref).abs().max().item() <= 5e-2
    assert model.guidance_in.weight.grad.dtype == torch.float32 and model.guidance_in.weight.grad.abs().sum() > 0


def test_autocast_does_nothing_for_a_model_of_one_dtype():
    assert isinstance(autocast(tiny_sam()), contextlib.nullcontext)
    assert isinstance(autocast(tiny_sam().to(torch.bfloat16)), contextlib.nullcontext)  # as before: no autocast
    ctx = autocast(cast_frozen(tiny_sam(), "fp16"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16
