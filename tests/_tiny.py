"""Tiny random HF InstructBLIP models for loading tests (no network, no weights)."""

from __future__ import annotations

import torch
from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
)

VISION_HIDDEN = 32


def tiny_instructblip_config(qformer_layers: int = 4, tie_word_embeddings: bool = False) -> InstructBlipConfig:
    """Vision 32 wide, 2 layers, 28 px / patch 14 (P = 5); Q-former 32 wide, 4 heads, cross-attention
    every 2nd layer; LLaMA 2 layers; 4 query tokens; image_token_index inside the vocabulary."""
    vision = InstructBlipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        qkv_bias=True,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=qformer_layers,
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=2,
        encoder_hidden_size=VISION_HIDDEN,
        max_position_embeddings=64,
    )
    text = LlamaConfig(
        vocab_size=120,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tie_word_embeddings,
    )
    return InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=119,
    )


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every floating parameter with random values (so a wrong key map cannot pass by luck),
    except the key third of EVA's qkv bias, which LAVIS cannot express (always zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                p[d : 2 * d] = 0
    return model


def tiny_instructblip(seed: int = 0, **config_kwargs) -> InstructBlipForConditionalGeneration:
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(tiny_instructblip_config(**config_kwargs))
    return randomize_(model, seed).eval()
