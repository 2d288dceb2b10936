"""Models, batches and step functions shared by the end-to-end benchmarks."""

from __future__ import annotations

import torch

from sam_fast import SAM, SAMConfig
from sam_fast.bench_plan import padding_fraction, realistic_batch, realistic_shapes, scaled_config
from sam_fast.reference.released_schedule import released_schedule_encode_images

SIZES = ("tiny", "mid", "scaled")


def config(size: str, **kw) -> SAMConfig:
    if size == "tiny":
        return SAMConfig.tiny(**kw)
    if size == "mid":  # a few % of the real model, same structure (P = 17 tokens, 12 Q-former layers)
        from transformers import InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig

        vision = InstructBlipVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                          num_attention_heads=4, image_size=56, patch_size=14, initializer_range=0.02)
        qformer = InstructBlipQFormerConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=12,
                                            num_attention_heads=4, intermediate_size=1024, encoder_hidden_size=256,
                                            max_position_embeddings=128)
        text = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=8, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, tie_word_embeddings=False, initializer_range=0.2)
        return SAMConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=32, image_token_index=3, **kw)
    if size == "scaled":  # the 7B model's widths / 8, real depths and token counts (P = 257, 32 LLM layers)
        return scaled_config(**kw)
    raise ValueError(f"unknown size {size!r}; one of {SIZES}")


def build(size: str, seed: int = 0, **kw) -> SAM:
    torch.manual_seed(seed)
    model = SAM(config(size, **kw))
    with torch.no_grad():
        for m in (model.adaptive_adjustment, model.guidance_in, model.guidance_out):
            m.weight.normal_(0, 0.02)
    return model


def batch(model: SAM, counts, text_len: int = 16, seed: int = 0) -> dict:
    """A training batch: pixels, Q-former ids, LLM ids with placeholders, labels on the text."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    s, Q, tok = cfg.vision_config.image_size, cfg.num_query_tokens, cfg.image_token_index
    T, B = sum(counts), len(counts)
    rows = []
    for n in counts:
        text = torch.randint(5, cfg.text_config.vocab_size, (text_len,), generator=g)
        rows.append(torch.cat([torch.full((n * Q,), tok), text]))
    width = max(len(r) for r in rows)
    ids = torch.zeros(B, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
        labels[b, len(r) - text_len : len(r)] = r[-text_len:]
    return dict(pixel_values=torch.randn(T, 3, s, s, generator=g), image_counts=list(counts),
                qformer_input_ids=torch.randint(5, cfg.qformer_config.vocab_size, (B, 12), generator=g),
                input_ids=ids, attention_mask=mask, labels=labels)


def realistic(model: SAM, seed: int = 0) -> dict:
    """The seeded realistic batch (B=8, 2-5 images, instructions 20-128 and answers 8-200 LLM
    tokens, right-padded): `sam_fast.bench_plan.realistic_batch` for this model's config."""
    return realistic_batch(model.config, realistic_shapes(seed), seed=seed)


def realistic_padding(seed: int = 0, query_tokens: int = 32) -> float:
    """Fraction of the realistic batch's LLM positions that are padding."""
    return padding_fraction(realistic_shapes(seed), query_tokens)


def optimizer(model: SAM):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def features(model: SAM, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return model.vision_model(pixel_values=pixel_values).last_hidden_state


def step_sam_fast(model, opt, inputs):
    loss = model(**inputs).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def step_cached(model, opt, inputs, cached):
    kw = {k: v for k, v in inputs.items() if k != "pixel_values"}
    return step_sam_fast(model, opt, dict(kw, image_features=cached))


def _released_features(model, pixel_values, counts):
    """The released code encodes images index by index (image j of every sample together)."""
    starts = [sum(counts[:b]) for b in range(len(counts))]
    out = [None] * sum(counts)
    for j in range(max(counts)):
        rows = [starts[b] + j for b, n in enumerate(counts) if n > j]
        with torch.no_grad():
            E = model.vision_model(pixel_values=pixel_values[rows]).last_hidden_state
        for r, e in zip(rows, E):
            out[r] = e
    return torch.stack(out)


def step_released(model, opt, inputs):
    """Released schedule: per-image ViT, 2N full Q-former passes per sample, no cache."""
    counts = inputs["image_counts"]
    E = _released_features(model, inputs["pixel_values"], counts)
    visual = released_schedule_encode_images(model, E, counts, inputs["qformer_input_ids"],
                                             inputs.get("qformer_attention_mask"))
    ids = inputs["input_ids"]
    placeholder = model._placeholders(ids, counts)
    embeds = model.get_input_embeddings()(ids.masked_fill(placeholder, 0))  # the id may lie outside the vocabulary
    embeds = embeds.masked_scatter(placeholder.unsqueeze(-1), visual.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
    loss = model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                labels=inputs["labels"]).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def realistic_prompts(model: SAM, batch_size: int = 4, seed: int = 0) -> dict:
    """Generation inputs for the first `batch_size` samples of the realistic mix: their images'
    cached features, Q-former ids, and LLM prompts (32 placeholders per image, then the
    instruction), left-padded as `SAM.generate` takes them."""
    full = realistic(model, seed)
    counts = full["image_counts"][:batch_size]
    answer_start = (full["labels"][:batch_size] != -100).int().argmax(1).tolist()  # rows: prompt, answer, pad
    prompts = [full["input_ids"][b, :n] for b, n in enumerate(answer_start)]
    width = max(len(p) for p in prompts)
    ids = torch.full((batch_size, width), model.config.text_config.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    return dict(image_features=features(model, full["pixel_values"][: sum(counts)]), image_counts=counts,
                qformer_input_ids=full["qformer_input_ids"][:batch_size],
                qformer_attention_mask=full["qformer_attention_mask"][:batch_size], input_ids=ids, attention_mask=mask)
