"""Writes the answers of the released SAM code's decoder, for `tests/models/test_generation.py`.

The released code (LAVIS) calls transformers 4.33's `generate(inputs_embeds=..., attention_mask=...,
max_length=..., num_beams=..., repetition_penalty=..., length_penalty=..., min_length=1)` and then
maps token 0 to 2. This script runs exactly that call on tiny LLaMA models whose weights and
prompts are drawn here from fixed seeds (plain torch, no transformers initialisation), so the
test can rebuild them under any transformers version and compare `lavis_generate` with the ids
recorded here.

Run it once in an environment with transformers==4.33.2 (and the same torch as the tests):

    python -m venv /tmp/v433 && /tmp/v433/bin/pip install torch==2.13.0 transformers==4.33.2 "tokenizers<0.14"
    /tmp/v433/bin/python tests/golden/lavis_generate_oracle.py > tests/golden/lavis_generate_433.json

Under another transformers version it prints what that version's own `generate` gives for the same
calls (used to measure how far the HF mode is from the released code).
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, HIDDEN = 64, 32
CASES = [  # (name, seed, eos boost, prompt lengths, num_beams, max_length, repetition_penalty, length_penalty)
    ("beams5-long", 0, 0.0, [7, 4, 2], 5, 256, 1.5, 1.0),
    ("beams5-a", 1, 2.0, [7, 4, 2, 6], 5, 40, 1.5, 1.0),
    ("beams5-b", 2, 1.0, [7, 4, 2, 6], 5, 40, 1.5, 1.0),
    ("beams5-c", 3, 2.0, [7, 4, 2, 6], 5, 40, 1.5, 1.0),
    ("beams3-lp2", 1, 2.0, [6, 2, 4], 3, 30, 1.5, 2.0),
    ("beams5-nopenalty", 2, 1.0, [4, 7], 5, 30, 1.0, 1.0),
    ("greedy", 0, 1.0, [7, 4, 2], 1, 60, 1.5, 1.0),
    ("greedy-long", 3, 0.0, [7, 2], 1, 256, 1.5, 1.0),
    ("beams5-max", 4, -3.0, [5, 3], 5, 256, 1.5, 1.0),  # </s> never chosen: runs to max_length
    ("greedy-max", 5, -3.0, [4], 1, 256, 1.5, 1.0),
]


def tiny_llama(seed: int, eos_boost: float) -> LlamaForCausalLM:
    """A 2-layer LLaMA (vocab 64, hidden 32) in float32 (4.33 builds its float64 masks with an overflow), every parameter drawn from `seed` by name
    order; the </s> (2) row of the output layer gets `eos_boost` x its norm along the mean hidden
    direction so that beams finish at varied lengths (a negative boost: never finish)."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        head = model.lm_head.weight
        if eos_boost >= 0:
            head[2] += eos_boost * head.mean(0) / head.mean(0).norm()
        else:  # ids 0 and 2 get logit 0 while the others spread wide: </s> never ranks in the top ten
            head *= -eos_boost
            head[[0, 2]] = 0.0
    return model


def prompts(seed: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt embeddings [B, S, 32] (float32) and their attention mask [B, S]."""
    g = torch.Generator().manual_seed(1000 + seed)
    S = max(lengths)
    embeds = torch.randn(len(lengths), S, HIDDEN, generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, S - n:] = 1
        embeds[b, : S - n] = 0.0
    return embeds, mask


def main() -> None:
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
    for name, seed, boost, lengths, beams, max_length, penalty, lp in CASES:
        model = tiny_llama(seed, boost)
        embeds, mask = prompts(seed, lengths)
        with torch.no_grad():
            ids = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=beams,
                                 max_length=max_length, min_length=1, repetition_penalty=penalty,
                                 length_penalty=lp, num_return_sequences=1)
        if transformers.__version__.startswith("4.33"):
            ids = ids[:, 1:]  # 4.33 returns the BOS it seeded the sequence with
        ids[ids == 0] = 2
        out["cases"][name] = ids.tolist()
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
