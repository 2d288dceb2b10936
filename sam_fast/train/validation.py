"""Validation during training (``TrainConfig.eval_every``): generate on a held-out set and score it.

Every ``eval_every`` optimiser steps and at the last one the trainer checkpoints the step (so that
every score belongs to a checkpoint), then generates for the first ``eval_limit`` samples of
``eval_data`` as `sam-fast eval` does (the eval transform, ``generation_mode="lavis"`` with the
model's generation defaults, the paper's beams; ``eval_max_new_tokens`` when set) and scores the
answers with the same `caption_metrics` (ROUGE_L, CIDEr, Bleu_4, x100). Each evaluation becomes an
entry ``{"step", "metrics", "samples", "seconds"}`` of ``OUTPUT/eval_history.json`` (``samples``: the
predictions, as in pred.json), a ``{"step", "eval", "eval_s"}`` record in log.jsonl and, with
``report_to``, ``eval/ROUGE_L``... scalars.

Under torchrun the samples are split over the ranks as `sam-fast eval` splits them
(`sam_fast.eval.runner.predict_shared`) and the main process scores and writes; every rank holds the
whole model (`TrainConfig.validate` refuses evaluations with FSDP, whose all-gathers beam search would
deadlock).

A resumed run keeps the history and appends to it; a step already evaluated is not evaluated again.
An entry past the step the run resumes from (its checkpoint lost) is dropped, as that step's log
records are, and made again when the run gets there. The model's train/eval modes and the global
RNGs are restored after each evaluation, so a run with evaluations trains as one without.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from sam_fast.data import AnnotationDataset, EvalTransform
from sam_fast.distributed import DistInfo, broadcast_object
from sam_fast.eval.metrics import caption_metrics
from sam_fast.eval.runner import predict_shared

HISTORY_FILE = "eval_history.json"
SCORES = ("ROUGE_L", "CIDEr", "Bleu_4")


class HistoryError(ValueError):
    """eval_history.json cannot be read as the list of evaluations a run wrote."""


def open_eval_dataset(data_dir, model, limit: int | None = None, allow_outside_paths: bool = False):
    """The held-out samples (eval transform, every image decoded once now): a `DataError` naming the file
    comes before the first step, not at the first evaluation. `limit`: only the first `limit` samples."""
    ds = AnnotationDataset(data_dir, EvalTransform(model.config.vision_config.image_size),
                           allow_outside_paths=allow_outside_paths)
    if limit is not None:
        ds.records = ds.records[:limit]
    return ds


def read_history(path: Path) -> list[dict]:
    """The entries of `path` (empty when it does not exist); `HistoryError` (one line naming it) when it is
    not a JSON list of entries with an integer step."""
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HistoryError(f"{path}: unreadable ({type(e).__name__}); move it aside to start a new history") from None
    if not isinstance(history, list) or not all(
            isinstance(e, dict) and isinstance(e.get("step"), int) and not isinstance(e["step"], bool)
            for e in history):
        raise HistoryError(f"{path}: not a list of evaluations {{step, metrics, samples}}; move it aside to start "
                           "a new history")
    return history


def _write_history(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(history, indent=1))
    os.replace(tmp, path)  # whole or not at all: a kill never leaves half a history


class Validation:
    """The evaluations of one training run: which steps are due, running one, the history file."""

    def __init__(self, dataset, prompt_builder, config, out: Path, dist: DistInfo):
        self.dataset, self.prompt_builder, self.config, self.dist = dataset, prompt_builder, config, dist
        self.path = Path(out) / HISTORY_FILE
        self.history: list[dict] = []  # the main process's
        self.done: set[int] = set()  # steps evaluated (every rank)

    def due(self, step: int) -> bool:
        """Whether `step` is evaluated: every ``eval_every`` steps and the last, once."""
        cfg = self.config
        return step > 0 and (step % cfg.eval_every == 0 or step == cfg.max_steps) and step not in self.done

    def start(self, step: int) -> None:
        """Read the history of a resumed run (main process), dropping entries past `step` (said in one
        line); every rank learns which steps are evaluated."""
        steps = None
        if self.dist.is_main:
            history = read_history(self.path)
            self.history = [e for e in history if e["step"] <= step]
            if len(self.history) < len(history):
                print(f"sam_fast: {self.path}: dropped {len(history) - len(self.history)} evaluation(s) after step "
                      f"{step}, the step the run resumes from (made again when it gets there)", file=sys.stderr)
                _write_history(self.path, self.history)
            steps = [e["step"] for e in self.history]
        self.done = set(broadcast_object(steps, self.dist))

    def run(self, model, step: int, amp_dtype: torch.dtype | None, device: torch.device) -> dict | None:
        """Generate for the held-out samples and score them at `step`; the main process appends the entry to
        the history and returns it (other ranks: None). Leaves the model in eval mode."""
        t0 = time.perf_counter()
        kwargs = {"generation_mode": "lavis"}
        if self.config.eval_max_new_tokens is not None:
            kwargs["max_new_tokens"] = self.config.eval_max_new_tokens
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            shared = predict_shared(model, self.dataset, self.prompt_builder, self.config.batch_size, self.dist,
                                    **kwargs)
        self.done.add(step)
        if not self.dist.is_main:
            return None
        preds = shared.preds
        m = caption_metrics([p["pred_response"] for p in preds], [p["gt_response"] for p in preds])
        metrics = {**{k: m[k] for k in SCORES}, "num_samples": len(preds), "skipped": shared.skipped}
        entry = {"step": step, "metrics": metrics, "samples": preds, "seconds": time.perf_counter() - t0}
        self.history.append(entry)
        _write_history(self.path, self.history)
        return entry
