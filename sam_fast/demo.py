"""`make demo` / `sam-fast demo`: the whole sam_fast pipeline on a CPU, in well under 3 minutes.

No pretrained weights are available offline, so the demo builds the tiny configuration with random
frozen weights (seeded) and trains only SAM's four trainable modules. Steps:

1. write a small multi-image group-captioning dataset (PIL-drawn pictures; each sample shows 1-4
   pictures of the same kind of object, the caption names it) in the annotations.json format;
2. show the visual tokens of a ragged batch (1, 2, 3 and 5 images per sample);
3. cache the frozen vision model's features of both sets (`sam-fast cache-features`);
4. train from the cache with the `sam-fast train` machinery (AdamW, warm-up + cosine, checkpoints,
   log.jsonl);
5. generate (5 beams) on a held-out set and score it like the SAM paper (ROUGE_L, CIDEr, Bleu_4),
   before and after training;
6. print the `sam-fast env` report.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

PEAK_LR = 1e-2
GEN = dict(num_beams=5, max_new_tokens=12)


def main(steps: int = 400, batch: int = 8, seed: int = 0, workdir: str | None = None) -> dict:
    """Run the demo; returns its figures (losses, metrics before/after, seconds).

    Runs with one intra-op thread: the tiny model's ops are far too small to gain from more, and
    on a busy machine spinning threads make a training step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(steps, batch, seed, workdir)
    finally:
        torch.set_num_threads(threads)


def _run(steps: int, batch: int, seed: int, workdir: str | None) -> dict:
    from sam_fast.data.synthetic import write_group_captions
    from sam_fast.eval import evaluate
    from sam_fast.models import directory

    t0 = time.time()
    root = Path(workdir or tempfile.mkdtemp(prefix="sam_fast_demo_"))
    train_dir = write_group_captions(root / "train", n_samples=96, size=64, seed=seed)
    test_dir = write_group_captions(root / "test", n_samples=16, size=64, seed=seed + 1000)
    model = directory.build_builtin("tiny", seed)
    tokenizers = directory.builtin_tokenizers("tiny")
    pb = directory.prompt_builder(model, tokenizers)
    _show_model_and_data(model, root, train_dir)
    tokens = _show_visual_tokens(model, pb, train_dir)
    _cache_features(model, (train_dir, test_dir))
    before = evaluate(model, test_dir, pb, root / "eval_before", batch_size=16, features=test_dir / "features",
                      **GEN)
    res, t_train = _train(model, tokenizers, pb, train_dir, root, steps, batch, seed)
    after = evaluate(model, test_dir, pb, root / "eval_after", batch_size=16, features=test_dir / "features", **GEN)
    _show_generation(root, before, after)

    from sam_fast import env

    print()
    print(env.report())
    n = max(1, min(10, steps // 4))
    first, last = sum(res.losses[:n]) / n, sum(res.losses[-n:]) / n
    seconds = time.time() - t0
    print(f"\nloss {first:.3f} -> {last:.3f}; ROUGE_L {before['ROUGE_L']:.1f} -> {after['ROUGE_L']:.1f}; "
          f"demo took {seconds:.1f} s (outputs in {root})")
    return {"loss_first": first, "loss_last": last, "metrics_before": before, "metrics_after": after,
            "seconds": seconds, "train_seconds": t_train, "visual_tokens_shape": tuple(tokens.shape),
            "workdir": str(root)}


def _show_model_and_data(model, root: Path, train_dir: Path) -> None:
    from sam_fast.models import TRAINABLE_MODULES

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print("== sam_fast demo: tiny SAM (random frozen backbone), CPU ==")
    print(f"parameters: {n_all:,} total, {n_train:,} trainable ({', '.join(TRAINABLE_MODULES)})")
    recs = json.loads((train_dir / "annotations.json").read_text())
    print(f"dataset: {root} (train {len(recs)} samples, test 16); e.g. {recs[0]['img_list']} -> "
          f"{recs[0]['instruction']!r} -> {recs[0]['output']!r}")


def _show_visual_tokens(model, pb, train_dir: Path) -> torch.Tensor:
    """Visual tokens of a ragged batch (1, 2, 3 and 5 images)."""
    from sam_fast.data import AnnotationDataset, Collator, EvalTransform

    size = model.config.vision_config.image_size
    ds_eval = AnnotationDataset(train_dir, EvalTransform(size))
    items = [ds_eval[i] for i in range(4)]
    for it, n in zip(items, (1, 2, 3, 5), strict=True):
        it["pixel_values"] = it["pixel_values"][:1].repeat(n, 1, 1, 1)
        marks = " ".join(f"{{image#{j + 1}}}" for j in range(n))  # the instruction names the images it has
        it["instruction"] = f"{marks} what is common in these images?"
    b = Collator(pb, train=False)(items)
    with torch.no_grad():
        tokens = model.encode_images(pixel_values=b["pixel_values"], image_counts=b["image_counts"],
                                     qformer_input_ids=b["qformer_input_ids"],
                                     qformer_attention_mask=b["qformer_attention_mask"])
    print(f"\nvisual tokens for image counts [1, 2, 3, 5]: {tuple(tokens.shape)} "
          f"(T=11 images x {model.config.num_query_tokens} queries x LLM width {tokens.shape[-1]})")
    return tokens


def _cache_features(model, dirs) -> None:
    """The vision features of every image of `dirs`, in DIR/features (train/eval then skip the ViT)."""
    from sam_fast.data.feature_cache import build_feature_cache

    t_cache = time.time()
    n_cached = 0
    for d in dirs:
        n_cached += len(build_feature_cache(model, d, d / "features", dtype=torch.float32)["images"])
    print(f"cached the vision features of {n_cached} images in {time.time() - t_cache:.1f} s "
          f"(train/eval then skip the frozen ViT)")


def _train(model, tokenizers, pb, train_dir: Path, root: Path, steps: int, batch: int, seed: int):
    """Train on the cached features into ROOT/run, printing the loss curve; (TrainResult, seconds)."""
    from sam_fast.data.feature_cache import CachedFeatureDataset
    from sam_fast.train import TrainConfig, Trainer, outputs

    cfg = TrainConfig(output_dir=str(root / "run"), max_steps=steps, batch_size=batch, lr=PEAK_LR,
                      warmup_steps=max(1, steps // 10), save_every=max(1, steps // 2), seed=seed, progress=False)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's one-shard bar
    outputs.prepare_run_dir(cfg.output_dir, model, tokenizers, {"kind": "builtin", "name": "tiny", "seed": seed,
                                                               "overrides": {}}, cfg.to_dict())
    ds = CachedFeatureDataset(train_dir, train_dir / "features", model, seed=seed)
    print(f"\ntraining {steps} steps, batch {batch} samples of 1-4 images (AdamW lr {PEAK_LR:g}, "
          f"warm-up {cfg.warmup_steps} + cosine) -> {cfg.output_dir}")
    t_train = time.time()
    res = Trainer(model, ds, pb, cfg).train()
    t_train = time.time() - t_train
    every = max(1, steps // 8)
    for s in list(range(0, steps, every)) + ([steps - 1] if (steps - 1) % every else []):
        window = res.losses[max(0, s - every + 1) : s + 1]
        print(f"  step {s + 1:4d}  loss {sum(window) / len(window):.3f}")
    print(f"  {steps} steps in {t_train:.1f} s ({steps * batch / t_train:.1f} samples/s); checkpoint {res.checkpoint}")
    return res, t_train


def _show_generation(root: Path, before: dict, after: dict) -> None:
    preds = json.loads((root / "eval_after" / "pred.json").read_text())
    print(f"\ngeneration on the 16 held-out samples ({GEN['num_beams']} beams):")
    for p in preds[:4]:
        print(f"  sample {p['sample_id']:2d}: expected {p['gt_response']!r:32} got {p['pred_response']!r}")
    print(f"\n{'':14}{'ROUGE_L':>9}{'CIDEr':>9}{'Bleu_4':>9}")
    for name, m in (("before", before), ("after", after)):
        print(f"  {name:12}{m['ROUGE_L']:9.2f}{m['CIDEr']:9.2f}{m['Bleu_4']:9.2f}")


if __name__ == "__main__":
    main()
