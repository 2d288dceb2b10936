"""The released code's schedule for SAM's image encoding (GitHub McCartney01/SAM, LAVIS-based),
kept as the baseline that `encode_images` is benchmarked against.

For each image index j, the W-stream (merged map I-hat of image j) and the Q-stream (E_j) go
through all Q-former layers, batched over the samples that have an image j, each layer an HF
`InstructBlipQFormerLayer` called as it is (so every cross-attention layer projects its K/V from
the features again, I-hat included): 2N full passes per sample. Within a pass, layer n runs the
W-stream then the Q-stream, so that h_i (Q-stream input to layer l) exists when the W-stream needs
it and c_i (W-stream output of layer k) exists when the Q-stream needs it.

Same parameters and same results as `sam_fast.reference.reference_encode_images`; apart from the
patch scores (`AdaptiveAdjustment.scores`) it shares no code with the fast path (no
`sam_fast.ops`, no batched streams).
"""

from __future__ import annotations

import torch


def _merged_maps(E: torch.Tensor, j: int, adaptive_adjustment, context_mode: str, guidance: str) -> torch.Tensor:
    """I-hat of image j for one sample's features E [N, P, D] (eq. 1), as the released code."""
    keep = [m for m in range(E.shape[0]) if context_mode == "shared" or m != j]
    ctx = E[keep]
    if guidance == "mean":
        scores = torch.zeros(ctx.shape[:2], dtype=torch.float32, device=E.device)
    else:
        scores = adaptive_adjustment.scores(ctx)  # [M, P]
    alpha = torch.softmax(scores, dim=0).unsqueeze(-1)
    return (alpha * ctx.float()).sum(0).to(E.dtype)


def released_schedule_encode_images(model, image_features, image_counts, qformer_input_ids,
                                    qformer_attention_mask=None) -> torch.Tensor:
    """Visual tokens [T, Q, llm_hidden] (same order as the input), computed with 2N full
    Q-former passes per sample (see module docstring)."""
    cfg = model.config
    Q = cfg.num_query_tokens
    l, k = cfg.interaction_layers
    layers = model.qformer.encoder.layer
    counts = [int(c) for c in image_counts]
    starts = [sum(counts[:b]) for b in range(len(counts))]
    if qformer_attention_mask is None:
        qformer_attention_mask = torch.ones_like(qformer_input_ids)
    dtype = model.query_tokens.dtype
    out = [None] * sum(counts)
    for j in range(max(counts)):
        batch = [b for b, n in enumerate(counts) if n > j]
        # the released code builds the multi-image layout for every sample: a one-image sample
        # is guided by its own image (softmax over one); leave_one_out keeps the paper's "none"
        guided = [b for b in batch if (counts[b] > 1 or cfg.context_mode == "shared") and cfg.guidance != "none"]
        idx = torch.tensor(batch, device=image_features.device)
        ids, mask = qformer_input_ids[idx], qformer_attention_mask[idx]
        mask = torch.cat([mask.new_ones(len(batch), Q), mask], 1)
        m4 = ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).to(dtype)
        E_j = image_features[[starts[b] + j for b in batch]]

        def embed(ids=ids):
            return model.qformer.embeddings(input_ids=ids, query_embeds=model.query_tokens.expand(ids.shape[0], -1, -1))

        x = embed()
        if guided:
            g = [batch.index(b) for b in guided]
            I_hat = torch.stack([
                _merged_maps(image_features[starts[b]:starts[b] + counts[b]], j, model.adaptive_adjustment,
                             cfg.context_mode, cfg.guidance)
                for b in guided
            ])
            w, wm4 = embed(ids[g]), m4[g]
        for n, layer in enumerate(layers, start=1):
            if guided and n <= k:
                if n == l:
                    w = w + model.guidance_in(x[g])  # h_i
                w = layer(w, wm4, I_hat, query_length=Q)
                if n == k:
                    x = x.index_add(0, torch.tensor(g, device=x.device), model.guidance_out(w))  # c_i
            x = layer(x, m4, E_j, query_length=Q)
        tokens = model.language_projection(x[:, :Q])
        for r, b in enumerate(batch):
            out[starts[b] + j] = tokens[r]
    return torch.stack(out)
