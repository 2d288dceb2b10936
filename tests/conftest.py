"""Shared fixtures: tiny random models only (no network, no weights)."""

from __future__ import annotations

import os

import torch

# Triton kernels run under the interpreter on CPU tensors when there is no GPU. The variable must
# be set before any module that defines kernels is imported, hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sam_fast import SAM, SAMConfig  # noqa: E402


def randomize_guidance(model: SAM, std: float = 0.3, seed: int = 0) -> SAM:
    """Give the three new modules non-zero weights so guidance changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in (model.adaptive_adjustment, model.guidance_in, model.guidance_out):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * std)
    return model


def tiny_sam(seed: int = 0, **overrides) -> SAM:
    torch.manual_seed(seed)
    model = SAM(SAMConfig.tiny(**overrides)).eval()
    with torch.no_grad():  # HF inits query tokens to zero; random ones exercise more
        model.query_tokens.normal_(0, 0.5)
    return model


def ragged_batch(model: SAM, counts, seed: int = 0, text_len: int = 7, pad_sample: int | None = None):
    """Random cached features, Q-former ids and mask for a ragged batch."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    P = (vc.image_size // vc.patch_size) ** 2 + 1
    T, B = sum(counts), len(counts)
    feats = torch.randn(T, P, vc.hidden_size, generator=g)
    ids = torch.randint(5, model.config.qformer_config.vocab_size, (B, text_len), generator=g)
    mask = torch.ones_like(ids)
    if pad_sample is not None:
        mask[pad_sample, text_len - 2 :] = 0
    return feats, ids, mask


@pytest.fixture
def tiny():
    return tiny_sam()
