"""Helpers of tests/test_compile.py, shared with the fresh interpreter its Triton-less test starts
(a script run by path cannot import a test module): a ragged batch with labels for SAM's training
forward, and one training step returning the loss and the trainable gradients."""

from __future__ import annotations

import torch

from _sam_helpers import ragged_batch

COUNTS = [2, 1, 3]  # images per sample


def training_inputs(m, counts=COUNTS):
    """(encode_images kwargs, training-forward kwargs) of SAM `m` for a ragged batch of `counts`
    images per sample: placeholders first, one right-padded sample, the last 5 positions supervised."""
    feats, ids, mask = ragged_batch(m, counts, pad_sample=1)
    enc = dict(image_features=feats, image_counts=counts, qformer_input_ids=ids, qformer_attention_mask=mask)
    Q, B = m.config.num_query_tokens, len(counts)
    S = max(counts) * Q + 6
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 100, (B, S), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for b, n in enumerate(counts):
        input_ids[b, : n * Q] = m.config.image_token_index
    input_ids[1, S - 3:] = 0  # right padding in one sample
    attention_mask[1, S - 3:] = 0
    labels = input_ids.clone()
    labels[:, : S - 5] = -100
    labels[attention_mask == 0] = -100
    return enc, dict(enc, input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def grads(m):
    """Copies of the gradients of `m`'s trainable parameters, by name."""
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def train_step(fn, m, kw):
    """(loss, trainable gradients) of one backward of `fn(**kw).loss` (`fn`: `m` or a compiled `m`)."""
    m.zero_grad(set_to_none=True)
    loss = fn(**kw).loss
    loss.backward()
    return loss.detach(), grads(m)



MIX_TEXTS = ["describe {image#1}", "compare the images in detail, one by one", "what differs?",
             "which of them shows a dog, and why do you think so", "a", "count the objects in every image please"]
MIX_ANSWERS = ["a red circle on a blue background", "no", "the left one is bigger than the right one", "the third",
               "ok fine", "there are three cats and one dog sitting next to a very small red car"]


def realistic_batches(m, n: int, seed: int = 0, batch_size: int = 3, pack_buckets=(256, 128), images=(1, 5)):
    """`n` training batches of the realistic mix built by the `Collator` (so they carry a pack plan,
    bucketed by `pack_buckets`): `batch_size` samples of `images` = (fewest, most) images (cached
    features), instructions and answers of different lengths."""
    from sam_fast.data import Collator, PromptBuilder, tiny_tokenizers

    cfg, g = m.config.vision_config, torch.Generator().manual_seed(seed)
    P = (cfg.image_size // cfg.patch_size) ** 2 + 1
    collate = Collator(PromptBuilder.for_model(m.config, *tiny_tokenizers()), pack_buckets=pack_buckets)
    out = []
    for i in range(n):
        items = []
        for j in range(batch_size):
            spread = images[1] - images[0] + 1
            k, t, a = (int(torch.randint(hi, (1,), generator=g)) for hi in (spread, len(MIX_TEXTS), len(MIX_ANSWERS)))
            feats = torch.randn(k + images[0], P, cfg.hidden_size, generator=g)
            items.append({"id": f"{i}-{j}", "image_features": feats, "instruction": MIX_TEXTS[t],
                          "output": MIX_ANSWERS[a]})
        batch = collate(items)
        out.append({k: v for k, v in batch.items() if k not in ("ids", "outputs")})
    return out
