"""Generation over a dataset and evaluation (`sam-fast eval`).

`predict` runs `SAM.generate` (the paper's settings unless overridden) over an `AnnotationDataset`
with the eval transform; `evaluate` writes ``OUT/pred.json`` (records ``sample_id``,
``pred_response``, ``gt_response``, the SAM scorer's input format), ``OUT/metrics.json``
(ROUGE_L, CIDEr, Bleu_4 x100 via `caption_metrics`, plus sample counts, and `run_metadata`: the
model, the generation settings, the sam_fast version and commit; and ``throughput``: answer tokens
generated per second and the mean time per decoding step, image encoding and prefill included) and
``OUT/eval_score.json`` (per-sample scores, as the scorer writes them).

Data parallel (`evaluate(..., dist=DistInfo)`, ``torchrun ... -m sam_fast.cli eval``): rank r
generates for samples r, r + world, r + 2 world, ... of the dataset; rank 0 gathers the predictions
(``all_gather_object``), puts them back in the dataset's order and writes the same three files as
a single process (the predictions are the same: each sample is generated alone or in a batch with
others, and a batch's padding is masked). Every rank holds the whole model: beam search runs a
data-dependent number of LLM steps, so an FSDP-sharded LLM, whose all-gathers every rank must
join equally often, would deadlock; a sharded model is refused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

from sam_fast.data import AnnotationDataset, Collator, EvalTransform, model_inputs
from sam_fast.eval.metrics import caption_metrics
from sam_fast.distributed import DistInfo, barrier, broadcast_object, gather_objects, is_sharded, shard_indices


@torch.no_grad()
def predict(model, dataset, prompt_builder, batch_size: int = 8, device=None, progress: bool = False,
            **generate_kwargs) -> list[dict]:
    """[{"sample_id", "pred_response", "gt_response"}] in dataset order (skipped samples left out)."""
    return [p for _, p in _predict_indexed(model, dataset, range(len(dataset)), prompt_builder, batch_size, device,
                                           progress, **generate_kwargs)]


def _answer_tokens(ids: torch.Tensor, eos) -> int:
    """Tokens of the answers in `ids` [B, W] (each row up to and including its first ``</s>``; the
    padding after it is not generated work that counts, nor are the other beams)."""
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos or ids.numel() == 0:
        return int(ids.numel())
    ended = torch.isin(ids, torch.tensor(eos, device=ids.device))
    first = torch.where(ended.any(1), ended.int().argmax(1) + 1, torch.full_like(ids[:, 0], ids.shape[1]))
    return int(first.sum())


def _throughput(stats: dict) -> dict:
    """metrics.json's ``throughput`` from summed `stats` (new_tokens, decode_steps, seconds)."""
    sec, steps = stats["seconds"], stats["decode_steps"]
    return {"new_tokens": stats["new_tokens"], "generate_seconds": round(sec, 3),
            "new_tokens_per_s": round(stats["new_tokens"] / sec, 2) if sec > 0 else None,
            "decode_step_ms": round(1000 * sec / steps, 3) if steps else None}


def _predict_indexed(model, dataset, indices, prompt_builder, batch_size: int = 8, device=None,
                     progress: bool = False, stats: dict | None = None, **generate_kwargs) -> list[tuple[int, dict]]:
    """(dataset index, prediction record) for the samples `indices`, in that order. `stats`, when
    given, is filled with the answer tokens generated, the decoding steps run (the answers' widths)
    and the seconds spent in `generate`; the progress bar shows the answer tokens per second."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device or next(model.parameters()).device
    collate = Collator(prompt_builder, train=False)
    model.eval()
    indices = list(indices)
    starts = range(0, len(indices), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    preds, stats = [], stats if stats is not None else {}
    stats.update(new_tokens=0, decode_steps=0, seconds=0.0)
    eos = getattr(model.generation_config, "eos_token_id", None)
    for s in starts:
        chunk = indices[s : s + batch_size]
        items = [dataset[i] for i in chunk]
        batch = collate(items)
        if batch is None:
            continue
        kept = [i for i, it in zip(chunk, items, strict=True) if it is not None]
        inputs = model_inputs(batch, device, generation=True)
        start = time.perf_counter()
        ids = model.generate(**inputs, **generate_kwargs)
        rows = ids.tolist()  # waits for the device: the time below is the generation's
        stats["seconds"] += time.perf_counter() - start
        stats["new_tokens"] += _answer_tokens(ids, eos)
        stats["decode_steps"] += ids.shape[1]
        if progress and stats["seconds"] > 0:
            starts.set_postfix_str(f"{stats['new_tokens'] / stats['seconds']:.1f} new tok/s")
        for i, sid, row, gt in zip(kept, batch["ids"], rows, batch["outputs"], strict=True):
            preds.append((i, {"sample_id": sid, "pred_response": prompt_builder.decode(row), "gt_response": gt}))
    return preds


MAX_DECODE_ROWS = 200
"""Rows (samples x beams) a decoding step is given at most: at the 7B size a step reads the weights
once for all its rows, so up to about this many it stays bound by memory bandwidth, not compute."""
PROMPT_TOKENS = 300  # a SAM prompt: 32 visual tokens per image (up to ~5) plus the instruction


def eval_batch_size(config, num_beams: int, max_new_tokens: int, device, dtype_bytes: int = 2,
                    free_bytes: int | None = None) -> tuple[int, str]:
    """(samples per `generate` call, why) for evaluation on `device`. On a GPU: as many rows as
    70% of the free memory holds KV cache for (prompt ~`PROMPT_TOKENS` plus `max_new_tokens`
    positions per row), at most `MAX_DECODE_ROWS`, divided by the beams; elsewhere 8."""
    device = torch.device(device)
    if device.type != "cuda":
        return 8, f"device is {device.type}: 8 samples per call"
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    text = config.text_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * heads * (text.hidden_size // text.num_attention_heads) * dtype_bytes
    rows = min(MAX_DECODE_ROWS, int(0.7 * free_bytes) // (per_token * (PROMPT_TOKENS + max_new_tokens)))
    batch = max(1, rows // max(1, num_beams))
    return batch, (f"{batch} samples x {num_beams} beams: KV cache for {rows} rows fits 70% of "
                   f"{free_bytes / 2**30:.1f} GiB free (at most {MAX_DECODE_ROWS} rows, where decoding stays "
                   "memory-bound)")


class Shared(NamedTuple):
    """What `predict_shared` returns on the main process (elsewhere: preds None)."""

    preds: list[dict] | None  # every rank's predictions, in dataset order
    skipped: int  # samples undecodable at generation, over all ranks
    per_rank: list[int]  # predictions each rank made
    throughput: dict | None = None  # `_throughput`: every rank's tokens, the slowest rank's time and steps


def predict_shared(model, dataset, prompt_builder, batch_size: int, info: DistInfo, progress: bool = False,
                   **generate_kwargs) -> Shared:
    """`predict` with the samples split over the ranks of `info` (rank r: samples r, r + world, ...), the
    predictions gathered on the main process in dataset order. A collective: every rank calls it."""
    before = len(getattr(dataset, "skipped", ()))
    stats: dict = {}
    mine = _predict_indexed(model, dataset, shard_indices(len(dataset), info), prompt_builder, batch_size,
                            progress=progress and info.is_main, stats=stats, **generate_kwargs)
    shares = gather_objects((mine, len(getattr(dataset, "skipped", ())) - before, stats), info)
    if not info.is_main:
        return Shared(None, 0, [])
    preds = [p for _, p in sorted((ip for share, _, _ in shares for ip in share), key=lambda ip: ip[0])]
    slowest = max((st for _, _, st in shares), key=lambda st: st["seconds"])  # the ranks run side by side
    total = {**slowest, "new_tokens": sum(st["new_tokens"] for _, _, st in shares)}
    return Shared(preds, sum(n for _, n, _ in shares), [len(share) for share, _, _ in shares], _throughput(total))


@torch.no_grad()
def answer(model, prompt_builder, images, prompt: str, **generate_kwargs) -> str:
    """Generate the answer to `prompt` about `images` (paths or PIL images, in order) with the eval
    transform and the default generation settings (overridable by `generate_kwargs`). Files and PIL
    images are read upright (EXIF orientation) with 16-bit / float pixels scaled (`sam_fast.data.images`).

    Raises:
        DataError: an image cannot be read, or the prompt holds ``<image>`` or is over-long.
    """
    from PIL import Image, ImageOps

    from sam_fast.data import DataError
    from sam_fast.data.dataset import text_problem
    from sam_fast.data.images import open_image, to_rgb

    problem = text_problem("instruction", prompt)
    if problem:
        raise DataError(f"the prompt: {problem}")
    tf = EvalTransform(model.config.vision_config.image_size)
    pix = []
    for im in images:
        try:
            pix.append(tf(to_rgb(ImageOps.exif_transpose(im)) if isinstance(im, Image.Image) else open_image(im)))
        except Exception as e:  # PIL raises many types for unreadable files
            raise DataError(f"image {im if not isinstance(im, Image.Image) else '(PIL image)'} cannot be read "
                            f"({type(e).__name__}: {e})") from e
    item = {"id": 0, "pixel_values": torch.stack(pix), "instruction": prompt, "output": None}
    batch = Collator(prompt_builder, train=False)([item])
    device = next(model.parameters()).device
    ids = model.generate(**model_inputs(batch, device, generation=True), **generate_kwargs)
    return prompt_builder.decode(ids[0].tolist())


def _source_commit() -> str | None:
    """The git commit of the sam_fast source tree this runs from, or None (an installed wheel, no git)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "") if out else None


def _json_value(v):
    return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)


def generation_settings(model, generate_kwargs: dict) -> dict:
    """The generation settings an evaluation used: the model's `generation_config` (its defaults: the
    paper's) with `generate_kwargs` over it, as `SAM.generate` combines them."""
    settings = {}
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        for k in ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "length_penalty",
                  "do_sample", "temperature", "top_p", "top_k"):
            v = getattr(gc, k, None)
            if v is not None:
                settings[k] = _json_value(v)
    for k, v in generate_kwargs.items():
        if k == "generation_config" and v is not None:
            settings.update({key: _json_value(val) for key, val in v.to_diff_dict().items()})
        else:
            settings[k] = _json_value(v)
    return settings


def run_metadata(model, generate_kwargs: dict, model_name: str | None = None) -> dict:
    """What metrics.json records next to the scores: the model, the generation settings, the sam_fast
    version and the git commit of its source (None outside a git checkout; ``-dirty`` with local changes)."""
    import sam_fast

    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {"model": None if name is None else str(name), "generation": generation_settings(model, generate_kwargs),
            "sam_fast_version": sam_fast.__version__, "git_commit": _source_commit()}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def evaluate(model, data_dir, prompt_builder, output_dir, batch_size: int = 8, skip_bad: bool = False,
             progress: bool = False, limit: int | None = None, features=None, dist: DistInfo | None = None,
             allow_outside_paths: bool = False, model_name: str | None = None, **generate_kwargs) -> dict:
    """Generate for every sample of `data_dir`, score, write pred.json / metrics.json; returns the metrics.
    `features`: a feature-cache directory to read instead of the images (checked against the model).
    `dist`: under torchrun, this process's `DistInfo` (`init_from_env`): the samples are split over
    the ranks, rank 0 writes the files (module docstring), every rank returns the metrics, plus
    ``samples_per_rank`` (predictions each rank made; not written to metrics.json).
    `generate_kwargs` go to `SAM.generate`; ``generation_mode`` defaults to ``"lavis"``, the released
    code's decoder, so scores compare with the paper's. `limit`: only the first `limit` (>= 1) samples. `allow_outside_paths`: read image paths that leave
    `data_dir` (refused by default, `sam_fast.data.paths`). metrics.json also records `run_metadata`: the
    model (`model_name`, default the model's ``name_or_path``), the generation settings, the sam_fast
    version and git commit; the returned dict holds the scores and counts only.

    Raises:
        ValueError: `batch_size` or `limit` below 1.
    """
    generate_kwargs.setdefault("generation_mode", "lavis")  # the released code's answers (SAM.generate)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be >= 1 (the number of samples to evaluate), got {limit}")
    info = dist or DistInfo(device=next(model.parameters()).device)
    if info.enabled and is_sharded(model):
        raise ValueError("data-parallel evaluation needs a whole model on every rank, not an FSDP-sharded one: "
                         "beam search runs a different number of LLM steps on each rank, so FSDP's all-gathers "
                         "would deadlock")
    if features is not None:
        from sam_fast.data.feature_cache import CachedFeatureDataset

        ds = CachedFeatureDataset(data_dir, features, model, skip_bad=skip_bad, allow_outside_paths=allow_outside_paths)
    else:
        ds = AnnotationDataset(data_dir, EvalTransform(model.config.vision_config.image_size), skip_bad=skip_bad,
                               allow_outside_paths=allow_outside_paths)
    if limit is not None:
        ds.records = ds.records[:limit]
    out = Path(output_dir)
    skipped_at_load = len(ds.skipped)  # the same on every rank; samples undecodable at generation come on top
    shared = predict_shared(model, ds, prompt_builder, batch_size, info, progress, **generate_kwargs)
    m = None
    if info.is_main:
        preds = shared.preds
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "pred.json", preds)
        m = caption_metrics([p["pred_response"] for p in preds], [p["gt_response"] for p in preds], per_sample=True)
        per = m.pop("per_sample")
        _write_json(out / "eval_score.json", [{"id": p["sample_id"], **s} for p, s in zip(preds, per, strict=True)])
        m.update(num_samples=len(preds), skipped=skipped_at_load + shared.skipped)
        _write_json(out / "metrics.json", {**m, "throughput": shared.throughput,
                                           **run_metadata(model, generate_kwargs, model_name)})
        if info.enabled:
            m = {**m, "samples_per_rank": shared.per_rank}
    m = broadcast_object(m, info)
    barrier(info)
    return m
