"""Reference SAM image encoding: a loop over samples and images, merged maps materialised
image by image from eq. (1), HF `InstructBlipQFormerLayer`s called as they are (the semantics:
docs/model.md#the-parts-of-the-model).

It reads the parameters of a `sam_fast.SAM` and takes the patch scores from its Adaptive
Adjustment (`AdaptiveAdjustment.scores`, the one definition of ``s = Linear(E)``) but shares none
of the fast path's schedule (no `sam_fast.ops`, no plan, no batched streams), so comparing the
two tests the fast path.
"""

from __future__ import annotations

import torch


def reference_merged_map(E: torch.Tensor, i: int, adaptive_adjustment, context_mode: str, guidance: str):
    """I-hat for image i of one sample with features E [N, P, D] (eq. 1):
    ``sum_m softmax_m(Linear(E_m[j])) * E_m[j]`` over m != i (leave_one_out) or all m (shared),
    per patch j; ``guidance="mean"`` uses uniform weights."""
    members = [m for m in range(E.shape[0]) if context_mode == "shared" or m != i]
    ctx = E[members].float()  # [M, P, D]
    if guidance == "mean":
        scores = torch.zeros(ctx.shape[:2], dtype=ctx.dtype, device=ctx.device)
    else:
        scores = torch.stack([adaptive_adjustment.scores(ctx[m]) for m in range(len(members))])  # [M, P]
    alpha = torch.softmax(scores, dim=0)
    merged = sum(alpha[m].unsqueeze(-1) * ctx[m] for m in range(len(members)))
    return merged.to(E.dtype)


def _mask4d(mask: torch.Tensor, dtype) -> torch.Tensor:
    return ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).to(dtype)


def reference_encode_images(model, image_features, image_counts, qformer_input_ids, qformer_attention_mask=None):
    """Visual tokens [T, Q, llm_hidden], one image at a time (see module docstring)."""
    cfg = model.config
    Q = cfg.num_query_tokens
    l, k = cfg.interaction_layers
    layers = model.qformer.encoder.layer
    counts = [int(c) for c in image_counts]
    if qformer_attention_mask is None:
        qformer_attention_mask = torch.ones_like(qformer_input_ids)
    outs, start = [], 0
    for b, n in enumerate(counts):
        E = image_features[start : start + n]
        start += n
        ids = qformer_input_ids[b : b + 1]
        mask = torch.cat([qformer_attention_mask.new_ones(1, Q), qformer_attention_mask[b : b + 1]], 1)

        def embed():
            return model.qformer.embeddings(input_ids=ids, query_embeds=model.query_tokens)

        for i in range(n):
            x = embed()  # Q-stream (Part A)
            m4 = _mask4d(mask, x.dtype)
            # leave_one_out: a one-image sample has no contextual image; shared (released code):
            # every sample is guided, a one-image sample by its own image (softmax over one)
            guided = (n > 1 or cfg.context_mode == "shared") and cfg.guidance != "none"
            if guided:
                I_hat = reference_merged_map(E, i, model.adaptive_adjustment, cfg.context_mode, cfg.guidance)
                w = embed()  # W-stream (Part B), same frozen layers
            for layer_no, layer in enumerate(layers, start=1):
                if guided and layer_no == l:
                    h_i = x  # initial visual tokens: Q-stream input to layer l
                    w = w + model.guidance_in(h_i)
                if guided and layer_no <= k:
                    w = layer(w, m4, I_hat[None], query_length=Q)
                if guided and layer_no == k:
                    c_i = model.guidance_out(w)  # contextual semantics
                    x = x + c_i
                x = layer(x, m4, E[i : i + 1], query_length=Q)
            outs.append(model.language_projection(x[:, :Q]))
    return torch.cat(outs, 0)
