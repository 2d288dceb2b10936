"""Generation over a dataset and evaluation (`sam-fast eval`).

`predict` runs `SAM.generate` (SPEC §4 defaults unless overridden) over an `AnnotationDataset`
with the eval transform; `evaluate` writes ``OUT/pred.json`` (records ``sample_id``,
``pred_response``, ``gt_response``, the SAM scorer's input format), ``OUT/metrics.json``
(ROUGE_L, CIDEr, Bleu_4 x100 via `caption_metrics`, plus sample counts) and
``OUT/eval_score.json`` (per-sample scores, as the scorer writes them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sam_fast.data import AnnotationDataset, Collator, EvalTransform, model_inputs
from sam_fast.eval.metrics import caption_metrics


@torch.no_grad()
def predict(model, dataset, prompt_builder, batch_size: int = 8, device=None, progress: bool = False,
            **generate_kwargs) -> list[dict]:
    """[{"sample_id", "pred_response", "gt_response"}] in dataset order (skipped samples left out)."""
    device = device or next(model.parameters()).device
    collate = Collator(prompt_builder, train=False)
    model.eval()
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    preds = []
    for s in starts:
        batch = collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        if batch is None:
            continue
        ids = model.generate(**model_inputs(batch, device, generation=True), **generate_kwargs)
        for sid, row, gt in zip(batch["ids"], ids.tolist(), batch["outputs"], strict=True):
            preds.append({"sample_id": sid, "pred_response": prompt_builder.decode(row), "gt_response": gt})
    return preds


@torch.no_grad()
def answer(model, prompt_builder, images, prompt: str, **generate_kwargs) -> str:
    """Generate the answer to `prompt` about `images` (paths or PIL images, in order) with the eval
    transform and SPEC §4 generation defaults (overridable by `generate_kwargs`)."""
    from PIL import Image

    tf = EvalTransform(model.config.vision_config.image_size)
    pix = []
    for im in images:
        if isinstance(im, Image.Image):
            pix.append(tf(im.convert("RGB")))
        else:
            with Image.open(im) as f:
                pix.append(tf(f.convert("RGB")))
    item = {"id": 0, "pixel_values": torch.stack(pix), "instruction": prompt, "output": None}
    batch = Collator(prompt_builder, train=False)([item])
    device = next(model.parameters()).device
    ids = model.generate(**model_inputs(batch, device, generation=True), **generate_kwargs)
    return prompt_builder.decode(ids[0].tolist())


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def evaluate(model, data_dir, prompt_builder, output_dir, batch_size: int = 8, skip_bad: bool = False,
             progress: bool = False, limit: int | None = None, features=None, **generate_kwargs) -> dict:
    """Generate for every sample of `data_dir`, score, write pred.json / metrics.json; returns the metrics.
    `features`: a feature-cache directory to read instead of the images (checked against the model)."""
    if features is not None:
        from sam_fast.data.feature_cache import CachedFeatureDataset

        ds = CachedFeatureDataset(data_dir, features, model, skip_bad=skip_bad)
    else:
        ds = AnnotationDataset(data_dir, EvalTransform(model.config.vision_config.image_size), skip_bad=skip_bad)
    if limit is not None:
        ds.records = ds.records[:limit]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = predict(model, ds, prompt_builder, batch_size, progress=progress, **generate_kwargs)
    _write_json(out / "pred.json", preds)
    m = caption_metrics([p["pred_response"] for p in preds], [p["gt_response"] for p in preds], per_sample=True)
    per = m.pop("per_sample")
    _write_json(out / "eval_score.json", [{"id": p["sample_id"], **s} for p, s in zip(preds, per, strict=True)])
    m.update(num_samples=len(preds), skipped=len(ds.skipped))
    _write_json(out / "metrics.json", m)
    return m
