"""`make demo` / `sam-fast demo`: the tiny SAM end to end on a CPU in well under 3 minutes.

No pretrained weights are available offline, so the demo builds the tiny configuration with random
frozen weights and trains only SAM's four trainable modules on a synthetic multi-image task that
needs cross-image reasoning: every image shows one of a few patterns, and the answer names the
pattern that the images of the sample have in common. Images are drawn as pixels and go through
the (frozen) vision model. It prints:

1. the model and its trainable-parameter count;
2. visual tokens for a batch mixing 1, 2, 3 and 5 images per sample;
3. a training curve (the loss falls) with the recipe's AdamW + warm-up/cosine schedule;
4. greedy and 5-beam generations against the expected answers;
5. the `sam-fast env` report.
"""

from __future__ import annotations

import math
import time

import torch

from sam_fast import SAM, SAMConfig

N_PATTERNS = 4
ANSWER_BASE = 40  # LLM token ids ANSWER_BASE + pattern name a pattern
EOS = 2
PEAK_LR = 3e-2


def _patterns(size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(N_PATTERNS, 3, size, size, generator=gen) * 1.5


def make_batch(model: SAM, patterns: torch.Tensor, batch: int, gen: torch.Generator, counts=None):
    """Samples of 2-4 images; all but one show the common pattern, the odd one another.
    Answer: the common pattern's token, then EOS."""
    cfg = model.config
    Q, tok = cfg.num_query_tokens, cfg.image_token_index
    if counts is None:
        counts = torch.randint(2, 5, (batch,), generator=gen).tolist()
    images, answers, rows = [], [], []
    for n in counts:
        common = int(torch.randint(N_PATTERNS, (1,), generator=gen))
        odd = (common + 1 + int(torch.randint(N_PATTERNS - 1, (1,), generator=gen))) % N_PATTERNS
        kinds = [common] * n
        if n > 2:
            kinds[int(torch.randint(n, (1,), generator=gen))] = odd
        for k in kinds:
            images.append(patterns[k] + 0.8 * torch.randn(patterns[k].shape, generator=gen))
        answers.append(common)
        prompt = [tok] * (n * Q) + [1, 10, 11, 12]  # placeholders, <s>, "which pattern is shared?"
        rows.append((prompt, [ANSWER_BASE + common, EOS]))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for b, (p, a) in enumerate(rows):  # right padding for training
        seq = p + a
        ids[b, : len(seq)] = torch.tensor(seq)
        labels[b, len(p) : len(seq)] = torch.tensor(a)
        mask[b, : len(seq)] = 1
    qids = torch.tensor([[5, 6, 7, 8]] * len(rows))
    return dict(pixel_values=torch.stack(images), image_counts=counts, qformer_input_ids=qids,
                input_ids=ids, attention_mask=mask, labels=labels), answers, rows


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up then cosine decay to 0 (SPEC §4)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def main(steps: int = 200, batch: int = 8, seed: int = 0) -> dict:
    """Run the demo; returns the figures it printed (for tests)."""
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SAM(SAMConfig.tiny(context_mode="leave_one_out"))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print("== sam_fast demo: tiny SAM (random frozen backbone), CPU ==")
    print(f"parameters: {n_all:,} total, {n_train:,} trainable "
          f"({', '.join(k for k in model.trainable_state_dict())})")

    size = model.config.vision_config.image_size
    patterns = _patterns(size, gen)

    # 2. Visual tokens for a ragged batch.
    demo_batch, _, _ = make_batch(model, patterns, 4, gen, counts=[1, 2, 3, 5])
    with torch.no_grad():
        tokens = model.encode_images(pixel_values=demo_batch["pixel_values"], image_counts=[1, 2, 3, 5],
                                     qformer_input_ids=demo_batch["qformer_input_ids"])
    print(f"\nvisual tokens for image counts [1, 2, 3, 5]: {tuple(tokens.shape)} "
          f"(T=11 images x {model.config.num_query_tokens} queries x LLM width {tokens.shape[-1]})")

    # 3. Train the four trainable modules.
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=PEAK_LR, betas=(0.9, 0.999))
    model.train()
    losses = []
    print(f"\ntraining {steps} steps, batch {batch} samples of 2-4 images (AdamW, warm-up 15 steps + cosine)")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 15, PEAK_LR)
        inputs, _, _ = make_batch(model, patterns, batch, gen)
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            window = losses[-25:]
            print(f"  step {step:4d}  loss {sum(window) / len(window):.3f}  lr {opt.param_groups[0]['lr']:.2e}")

    # 4. Generate on fresh samples.
    model.eval()
    eval_inputs, answers, rows = make_batch(model, patterns, 16, gen)
    prompt_len = [len(p) for p, _ in rows]
    width = max(prompt_len)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, _) in enumerate(rows):  # left padding for generation
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    gen_inputs = dict(pixel_values=eval_inputs["pixel_values"], image_counts=eval_inputs["image_counts"],
                      qformer_input_ids=eval_inputs["qformer_input_ids"], input_ids=ids, attention_mask=mask)
    greedy = model.generate(**gen_inputs, num_beams=1, max_new_tokens=2, repetition_penalty=1.0)
    beams = model.generate(**gen_inputs, max_new_tokens=2)
    acc = sum(int(g[0]) == ANSWER_BASE + a for g, a in zip(greedy, answers)) / len(answers)
    acc_beam = sum(int(g[0]) == ANSWER_BASE + a for g, a in zip(beams, answers)) / len(answers)
    print("\ngeneration on 16 new samples (answer token = 40 + shared pattern):")
    for b in range(4):
        print(f"  sample {b}: {eval_inputs['image_counts'][b]} images  expected {[ANSWER_BASE + answers[b], EOS]}"
              f"  greedy {greedy[b].tolist()}  5-beam {beams[b].tolist()}")
    print(f"  accuracy: greedy {acc:.0%}, 5 beams {acc_beam:.0%} (chance {1 / N_PATTERNS:.0%})")

    # 5. Environment.
    from sam_fast import env

    print()
    print(env.report())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"\nloss {first:.3f} -> {last:.3f}; demo took {time.time() - t0:.1f} s")
    return {"loss_first": first, "loss_last": last, "accuracy": acc, "accuracy_beam": acc_beam,
            "visual_tokens_shape": tuple(tokens.shape)}


if __name__ == "__main__":
    main()
