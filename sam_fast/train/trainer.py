"""The training loop of the paper's recipe: AdamW + warm-up/cosine, AMP, accumulation, clipping, checkpoints, resume.

Batches: ``batch_size`` samples per micro-batch per process; one optimiser step takes
``grad_accum`` micro-batches on each of ``world_size`` processes (global batch =
batch_size x grad_accum x world_size samples, the paper's 20). Samples come from a per-epoch
permutation seeded by (seed, epoch); a step's global batch is the next slice of it (the epoch's
tail that does not fill a global batch is dropped), and micro-batch a of rank r is the
(a * world + r)-th piece of that slice. Augmentations are a function of (seed, epoch, index).
So the data position is two integers, and resumed or data-parallel runs see the same samples and
pixels as one uninterrupted process.

Loading: a `torch.utils.data.DataLoader` builds the micro-batches (reading, augmenting, tokenising,
collating) in ``num_workers`` processes, each ``prefetch_factor`` micro-batches ahead, into pinned
memory when training on CUDA; ``num_workers=0`` loads them in the training process when they are
needed. The loader walks the same (epoch, position) plan as the loop, and while an item is read
the global torch / random / numpy RNGs are seeded from (seed, epoch, index)
(`sam_fast.data.dataset.sample_seed`), so the batches, and the run, are the same for any number of
workers, and a resumed run's loader starts exactly where the checkpoint left off. Samples that fail to decode in a worker (``skip_bad``)
are reported back and counted once, as in the training process.

On a CPU the loop runs with ``cpu_threads`` intra-op threads (default 1, restored afterwards): the
small matrix products of a step gain nothing from more, and on a busy machine spinning threads
make steps many times slower. ``report_to`` adds TensorBoard (``OUTPUT/tensorboard``) and/or Weights &
Biases logging to ``log.jsonl``.

Loss: the LLM's token-mean cross-entropy over answer tokens, taken over the *global* batch (each
micro-batch contributes loss x its tokens / all tokens of the step), so gradient accumulation and
data parallelism give the same step as one big batch.

``fsdp=True`` (under torchrun) shards the frozen LLM over the processes with FSDP2 before training
(`sam_fast.train.distributed.shard_language_model`: memory per GPU, what stays replicated); the
trainable modules, the gradient all-reduce, the optimiser and the checkpoints are unchanged, and
the steps equal those without FSDP.

Frozen modules run in eval mode (no dropout), as LAVIS does for its frozen encoders; the four
trainable modules (Linear layers) have no dropout. Training is thus deterministic given the data,
and on a CPU a resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sam_fast.data import Collator, model_inputs
from sam_fast.data.dataset import DataError, sample_seed
from sam_fast.models import TRAINABLE_MODULES
from sam_fast.models.precision import DTYPES, cast_frozen
from sam_fast.train import checkpoint as ckpt
from sam_fast.distributed import (
    DistInfo,
    all_reduce_grads,
    all_reduce_sum,
    barrier,
    is_sharded,
    shard_language_model,
)
from sam_fast.train.outputs import RunDirectoryError, run_differences
from sam_fast.train.validation import HISTORY_FILE, SCORES, Validation, open_eval_dataset
from sam_fast.train.schedule import build_optimizer, build_scheduler, lr_factor


class NonFiniteLossError(RuntimeError):
    """The loss, a gradient or an updated tensor became NaN/inf; the message names the step, the samples
    and the last finite checkpoint. Non-finite values are never applied to the model nor checkpointed."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the step in progress was finished and checkpointed; ``signum``, ``step`` and
    ``checkpoint`` say which signal and where training stopped."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
                         "(continue with --resume)")


def _notice(msg: str) -> None:
    print(f"sam_fast: {msg}", file=sys.stderr, flush=True)


@dataclass
class TrainConfig:
    """Training options (defaults: the paper's recipe)."""

    output_dir: str = "output"
    max_steps: int = 1000
    batch_size: int = 20  # samples per micro-batch per process
    grad_accum: int = 1
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 240
    clip_grad_norm: float | None = 1.0
    amp: str = "none"  # "none" | "bf16" | "fp16" (fp16 uses a GradScaler)
    # the frozen weights' dtype, "fp32" | "bf16" | "fp16" (trainable modules stay float32; half precision
    # also runs the forward under autocast in it); None: the model's dtypes as given
    dtype: str | None = None
    save_every: int = 500
    keep_last: int = 3
    seed: int = 0
    log_every: int = 1
    num_workers: int = 0  # loader processes (0: load in the training process)
    prefetch_factor: int = 2  # micro-batches each loader process prepares ahead
    cpu_threads: int = 1  # intra-op threads while training on a CPU (0: leave torch's setting)
    report_to: tuple[str, ...] = ()  # besides log.jsonl: "tensorboard", "wandb"
    progress: bool = True
    fsdp: bool = False  # shard the frozen LLM over the torchrun processes (FSDP2); needs world_size > 1
    # validation (`sam_fast.train.validation`): every eval_every steps and at the last (0: never), generate on
    # the eval_data folder (its first eval_limit samples; all: None) and log ROUGE_L/CIDEr/Bleu_4
    eval_every: int = 0
    eval_data: str | None = None
    eval_limit: int | None = None
    eval_max_new_tokens: int | None = None  # None: the model's generation config (the paper's 255)

    def validate(self) -> None:
        """Raise ValueError (one line naming the option and its value) for any option out of range."""
        self._validate_precision()
        at_least = {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "save_every": 1, "keep_last": 1,
                    "log_every": 1, "warmup_steps": 0, "seed": 0, "num_workers": 0, "prefetch_factor": 1,
                    "cpu_threads": 0, "eval_every": 0, "eval_limit": 1, "eval_max_new_tokens": 1}
        for name, low in at_least.items():
            v = getattr(self, name)
            if v is None and name in ("eval_limit", "eval_max_new_tokens"):
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}={v!r} must be an integer")
            if v < low:
                raise ValueError(f"{name}={v} must be >= {low}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "clip_grad_norm"):
            v = getattr(self, name)
            if v is None and name == "clip_grad_norm":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name}={v!r} must be a number")
            if not math.isfinite(v):
                raise ValueError(f"{name}={v} must be finite")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.clip_grad_norm is not None and self.clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm={self.clip_grad_norm} must be >= 0 (0 disables clipping)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        b = self.betas
        if (not isinstance(b, (tuple, list)) or len(b) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in b)):
            raise ValueError(f"betas={b!r} must be two numbers in [0, 1)")
        for name in ("progress", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        r = self.report_to
        if isinstance(r, str) or not isinstance(r, (tuple, list)) or not all(isinstance(x, str) for x in r):
            raise ValueError(f"report_to={r!r} must be a list of 'tensorboard', 'wandb'")
        for name in r:
            if name not in REPORTERS:
                raise ValueError(f"report_to: {name!r} is not one of {', '.join(map(repr, REPORTERS))}")
            missing = _missing_reporter_package(name)
            if missing:
                raise ValueError(f"report_to {name!r} needs the {missing} package, which is not installed "
                                 f"(pip install {missing})")
        self._validate_eval()

    def _validate_precision(self) -> None:
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp={self.amp!r:.80} is not one of 'none', 'bf16', 'fp16'")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r:.80} is not one of {', '.join(map(repr, DTYPES))}")
        if self.dtype in ("bf16", "fp16") and self.amp not in ("none", self.dtype):
            raise ValueError(f"amp={self.amp!r} with dtype={self.dtype!r}: frozen weights in {self.dtype} compute "
                             f"in {self.dtype}; drop amp (or set it to {self.dtype!r})")

    def _validate_eval(self) -> None:
        if self.eval_data is not None and (not isinstance(self.eval_data, str) or not self.eval_data):
            raise ValueError(f"eval_data={self.eval_data!r:.80} must be a folder path")
        if self.eval_every and self.eval_data is None:
            raise ValueError(f"eval_every={self.eval_every} needs eval_data (--eval-data DIR): the held-out "
                             "annotations.json folder to generate on")
        if self.eval_data is not None and not self.eval_every:
            raise ValueError(f"eval_data={self.eval_data!r:.80} needs eval_every >= 1 (--eval-every N): how many "
                             "optimiser steps apart to evaluate")
        if self.eval_every and self.fsdp:
            raise ValueError("eval_every with fsdp: generation needs the whole LLM on every rank (beam search runs "
                             "a different number of LLM steps per rank, which FSDP's all-gathers cannot follow); "
                             "evaluate the checkpoints with `sam-fast eval` instead")

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward: a half-precision `dtype`'s, else `amp`'s (None: no autocast)."""
        name = self.dtype if self.dtype in ("bf16", "fp16") else self.amp
        return DTYPES.get(name) if name in ("bf16", "fp16") else None

    def to_dict(self) -> dict:
        """The options as JSON-ready values (run.json, checkpoints)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["report_to"] = list(self.report_to)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        for k in ("betas", "report_to"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name -> the package it needs


def _missing_reporter_package(name: str) -> str | None:
    import importlib.util

    pkg = REPORTERS[name]
    return None if importlib.util.find_spec(pkg) is not None else pkg


class _Reporters:
    """TensorBoard / Weights & Biases writers of the log records (main process only)."""

    SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "data_s", "tokens")

    def __init__(self, names, out: Path, first_step: int, config: dict):
        self.tb = self.wandb_run = None
        try:
            if "tensorboard" in names:
                from torch.utils.tensorboard import SummaryWriter

                # records after the checkpoint a resumed run starts from are written again: drop the old ones
                self.tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=first_step + 1)
            if "wandb" in names:
                import wandb

                self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sam_fast"), name=out.name,
                                            dir=str(out), config=config)
        except BaseException:
            self.close()
            raise

    def log(self, rec: dict) -> None:
        """Write one log.jsonl record's numbers at its step."""
        values = {k: rec[k] for k in self.SCALARS if rec.get(k) is not None}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, rec["step"])
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in values.items()}, step=rec["step"])

    def log_eval(self, step: int, metrics: dict) -> None:
        """Write an evaluation's scores at its step, as ``eval/ROUGE_L`` ...."""
        values = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        """Flush and close the writers."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


# -- the data loader --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded_global_rngs(seed: int, restore: bool):
    """Seed torch's, random's and (when loaded) numpy's global RNGs with `seed`; `restore` puts their previous
    states back afterwards (in the training process, whose RNG state is checkpointed)."""
    np = sys.modules.get("numpy")
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state() if np is not None else None) \
        if restore else None
    torch.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            if np is not None:
                np.random.set_state(saved[2])


def load_items(dataset, indices: list[int], epoch: int, seed: int, restore_rng: bool = True) -> list:
    """Items `indices` of `dataset` in `epoch`: ``set_epoch(epoch)`` (when the dataset has it), then each item
    read with the global RNGs seeded from (seed, epoch, index), so that its value does not depend on
    which process reads it or what it read before."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    items = []
    for i in indices:
        with _seeded_global_rngs(sample_seed(seed, epoch, i), restore_rng):
            items.append(dataset[i])
    return items


class _Loaded(NamedTuple):
    """A micro-batch made in a loader process, with what the training process must learn about it."""

    indices: tuple  # dataset indices asked for
    batch: dict | None  # the collated batch (None: no decodable sample)
    none: tuple  # indices whose item was None (undecodable under skip_bad)
    failures: tuple  # (index, sample id, reason) of decode failures first met by this process
    error: Exception | None  # a DataError raised while loading, re-raised by the training process


def _load_in_worker(dataset, collator: Collator, seed: int, epoch: int, indices: tuple) -> _Loaded:
    """One micro-batch, in a loader process (picklable: module-level, no trainer)."""
    report = getattr(dataset, "skipped", None)
    failures, items = [], []
    try:
        for i in indices:
            before = len(report.items) if report is not None else 0
            item = load_items(dataset, [i], epoch, seed, restore_rng=False)[0]
            if item is None and report is not None and len(report.items) > before:
                sid, reason = report.items[before]
                failures.append((i, sid, reason))
            items.append(item)
        batch = collator(items)
    except DataError as e:
        return _Loaded(tuple(indices), None, (), tuple(failures), e)
    none = tuple(i for i, it in zip(indices, items, strict=True) if it is None)
    return _Loaded(tuple(indices), batch, none, tuple(failures), None)


def _worker_init(worker_id: int) -> None:
    # SIGINT/SIGTERM go to the whole process group: the training process decides (it finishes the step,
    # checkpoints and stops, which shuts the loader down); a worker killed by them would fail that step.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _as_is(x):
    return x


class _MicroBatchKeys:
    """The loader's sampler: (epoch, indices) of every micro-batch of this rank, step after step, from a
    data position on: the plan `Trainer._step_indices` gives the loop."""

    def __init__(self, trainer: Trainer, start: DataPosition, steps: int):
        self.trainer, self.start, self.steps = trainer, start, steps

    def __iter__(self):
        data = DataPosition(**dataclasses.asdict(self.start))
        for _ in range(self.steps):
            micro, epoch, data = self.trainer._step_indices(data)
            for idx in micro:
                yield epoch, tuple(idx)


class _MicroBatchDataset(torch.utils.data.Dataset):
    """Maps an (epoch, indices) key of `_MicroBatchKeys` to the loaded micro-batch."""

    def __init__(self, fetch):
        self.fetch = fetch

    def __getitem__(self, key):
        epoch, indices = key
        return self.fetch(epoch, indices)


@dataclass
class DataPosition:
    epoch: int = 0
    pos: int = 0  # index into the epoch's permutation


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    checkpoint: Path | None = None
    seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)  # this call's evaluations {step, metrics, samples, seconds}


@dataclass
class _Saved:
    """The checkpoint this `Trainer.train` call wrote last, and its step."""

    path: Path | None = None
    step: int | None = None


@dataclass
class _StepLog:
    """Where a step's record goes (main process): log.jsonl every ``log_every`` steps and at the last,
    the reporters with it, and the progress bar every step."""

    log_every: int
    max_steps: int
    file: object = None
    bar: object = None
    reporters: _Reporters | None = None

    def write(self, rec: dict) -> None:
        """Record step ``rec["step"]``."""
        if self.file is not None and (rec["step"] % self.log_every == 0 or rec["step"] == self.max_steps):
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            if self.reporters is not None:
                self.reporters.log(rec)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", sps=f"{rec['samples_per_s']:.1f}")

    def write_eval(self, entry: dict) -> None:
        """Record an evaluation (`sam_fast.train.validation`): a log.jsonl line, the reporters, a line above
        the progress bar."""
        step, metrics = entry["step"], entry["metrics"]
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "eval": metrics, "eval_s": entry["seconds"]}) + "\n")
            self.file.flush()
        if self.reporters is not None:
            self.reporters.log_eval(step, metrics)
        if self.bar is not None:
            self.bar.write(f"eval at step {step}: " + "  ".join(f"{k} {metrics[k]:.2f}" for k in SCORES))


def check_batch_fits(config: TrainConfig, world_size: int, n_samples: int) -> None:
    """ValueError when one step's global batch needs more samples than the dataset holds."""
    global_batch = config.batch_size * config.grad_accum * world_size
    if global_batch > n_samples:
        raise ValueError(f"the global batch ({global_batch} samples) is larger than the dataset "
                         f"({n_samples} samples)")


class ResumeSettingsError(ValueError):
    """A checkpoint records other settings (seed, base, data, model) than the run that would resume it;
    ``path`` is the checkpoint, ``diffs`` the ``"name: old -> new"`` differences."""

    def __init__(self, path: Path, diffs: list[str]):
        self.path, self.diffs = path, diffs
        super().__init__(f"{path} was written with other settings ({'; '.join(diffs)}): resume with the run's "
                         "settings, or start a new run from its weights")


def check_resumable(path: Path, state: dict, config: TrainConfig, world_size: int,
                    run_info: dict | None = None) -> None:
    """Raise ValueError (one line) when the run saved in checkpoint `path` (resume state `state`) cannot be
    continued with `config` on `world_size` processes from `run_info`. Checked from what the checkpoint
    itself records, so that checkpoints copied without run.json are checked too: the global batch and the
    seed (the data position would mean other samples), the frozen weights' dtype, the base, data and model
    settings when both sides record them (`ResumeSettingsError`), and the step (past max_steps the schedule has ended)."""
    saved = state.get("config") or {}
    old_batch = state.get("world_size", 1) * saved.get("batch_size", 0) * saved.get("grad_accum", 1)
    new_batch = world_size * config.batch_size * config.grad_accum
    if old_batch != new_batch:
        raise ValueError(f"{path} was written with a global batch of {old_batch} samples; this run has {new_batch}: "
                         "the data position would not match (resume with the run's batch size, gradient "
                         "accumulation and number of processes)")
    recorded = {**((state.get("run") or {}) if run_info is not None else {}), "train": saved}
    diffs = run_differences(recorded, *((run_info or {}).get(k) or {} for k in ("base", "data", "model")),
                            config.seed, config.dtype)
    if diffs:
        raise ResumeSettingsError(path, diffs)
    step = int(state.get("step", 0))
    if step > config.max_steps:
        raise ValueError(f"{path}: the run is already at step {step}, past max_steps {config.max_steps}: raise "
                         f"max_steps (--max-steps) above {step} to train further")


def _resume_record(path: Path) -> tuple[dict]:
    """A checkpoint's resume state as far as `check_resumable` reads it (JSON fields), every checksum checked
    as `ckpt.load_checkpoint` does, without loading a tensor."""
    manifest = ckpt._read_manifest(path)
    for name in (ckpt.TRAINABLE_FILE, ckpt.STATE_TENSORS_FILE):
        ckpt._verify(path, name, manifest)
    state = manifest.get("state")
    state = state if isinstance(state, dict) else {}
    return ({k: state[k] for k in ("step", "world_size", "config", "run") if k in state},)


def resume_point(config: TrainConfig, world_size: int = 1, run_info: dict | None = None,
                 notice=lambda msg: None) -> tuple[Path, int] | None:
    """(checkpoint, step) that `Trainer.train(resume=True)` with these settings continues from, or None when
    ``config.output_dir`` has no checkpoint. Raises ValueError (`check_resumable`) or `ckpt.CheckpointError`
    as that call would, but reads no tensor and changes nothing: callers check before they write."""
    found = ckpt.load_latest(Path(config.output_dir) / "checkpoints", loader=_resume_record, notice=notice)
    if found is None:
        return None
    path, state = found
    check_resumable(path, state, config, world_size, run_info)
    return path, int(state.get("step", 0))


class Trainer:
    """Trains SAM's trainable modules on an `AnnotationDataset` (or any dataset of the same items).

    Args:
        model: a `sam_fast.SAM` (only its four trainable modules get gradients).
        dataset: items ``{"id", "pixel_values" | "image_features", "instruction", "output"}``; needs
            ``set_epoch`` to vary augmentations per epoch (optional).
        prompt_builder: `sam_fast.data.PromptBuilder` for the model.
        config: `TrainConfig`.
        dist: `DistInfo` (default: one process on the model's device).
        run_info: what the run trains from (``{"base", "data", "model"}`` as in run.json), stored in each
            checkpoint so that a resume can be checked against it even without run.json (optional).
        eval_dataset: the held-out samples of ``config.eval_every`` (default: ``config.eval_data`` opened
            with `open_eval_dataset`, its first ``eval_limit`` samples).
    """

    def __init__(self, model, dataset, prompt_builder, config: TrainConfig, dist: DistInfo | None = None,
                 run_info: dict | None = None, eval_dataset=None):
        config.validate()
        self.model, self.dataset, self.config = model, dataset, config
        self.run_info = run_info
        self.dist = dist or DistInfo(device=next(model.parameters()).device)
        self.device = self.dist.device
        if config.dtype is not None:  # before FSDP shards the LLM and the optimiser takes the parameters
            cast_frozen(model, config.dtype)
        self.fsdp: dict | None = None  # what this rank holds of the LLM, when sharded
        if config.fsdp:
            self.fsdp = shard_language_model(model, self.dist)
        elif self.dist.enabled and is_sharded(model):
            raise ValueError("the model is already sharded with FSDP; pass TrainConfig(fsdp=True) so that every "
                             "rank runs the LLM equally often (otherwise FSDP's all-gathers can deadlock)")
        self.collator = Collator(prompt_builder, train=True)
        self._dropped: set[int] = set()  # dataset indices whose item was None (undecodable under skip_bad)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.compute_dtype == torch.float16)
        self.global_batch = config.batch_size * config.grad_accum * self.dist.world_size
        check_batch_fits(config, self.dist.world_size, len(dataset))
        self.step = 0
        self.data = DataPosition()
        self._perm_cache: tuple[int, list[int]] | None = None  # (epoch, its permutation)
        self.out = Path(config.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.validation: Validation | None = None
        if config.eval_every:
            if eval_dataset is None:
                eval_dataset = open_eval_dataset(config.eval_data, model, config.eval_limit)
            self.validation = Validation(eval_dataset, prompt_builder, config, self.out, self.dist)

    # -- data ---------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> list[int]:
        cached = self._perm_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        g = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g).tolist()
        self._perm_cache = (epoch, perm)
        return perm

    def _step_indices(self, data: DataPosition) -> tuple[list[list[int]], int, DataPosition]:
        """This rank's micro-batches of the step taken at data position `data`, their epoch, and the position
        after the step (a pure function of `data`)."""
        if data.pos + self.global_batch > len(self.dataset):
            data = DataPosition(data.epoch + 1, 0)
        perm = self._permutation(data.epoch)
        chunk = perm[data.pos : data.pos + self.global_batch]
        bs, world, rank = self.config.batch_size, self.dist.world_size, self.dist.rank
        micro = [chunk[(a * world + rank) * bs : (a * world + rank + 1) * bs] for a in range(self.config.grad_accum)]
        return micro, data.epoch, DataPosition(data.epoch, data.pos + self.global_batch)

    def _next_indices(self) -> tuple[list[list[int]], int]:
        """This rank's micro-batches of the next step, and the epoch they come from."""
        micro, epoch, self.data = self._step_indices(self.data)
        return micro, epoch

    def _load(self, indices: list[int], epoch: int):
        """Collated micro-batch of dataset `indices` in `epoch`, read in this process."""
        items = load_items(self.dataset, indices, epoch, self.config.seed)
        self._dropped.update(i for i, it in zip(indices, items, strict=True) if it is None)
        return self.collator(items)

    def _loader(self, steps: int):
        """The DataLoader of the micro-batches of the next `steps` steps from the current data position."""
        cfg = self.config
        if cfg.num_workers:
            fetch = functools.partial(_load_in_worker, self.dataset, Collator(self.collator.pb, train=True), cfg.seed)
        else:
            def fetch(epoch, indices):  # noqa: E306 -- looked up per call: tests replace _load
                return self._load(list(indices), epoch)
        workers = {"num_workers": cfg.num_workers, "prefetch_factor": cfg.prefetch_factor,
                   "worker_init_fn": _worker_init} if cfg.num_workers else {}
        return torch.utils.data.DataLoader(
            _MicroBatchDataset(fetch), batch_size=None, sampler=_MicroBatchKeys(self, self.data, steps),
            collate_fn=_as_is, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG alone
            **workers)

    def _receive(self, got, indices: list[int]):
        """The batch of a loaded micro-batch; a loader process's record of undecodable samples is merged in."""
        if not isinstance(got, _Loaded):
            return got
        if list(got.indices) != list(indices):  # the loader's plan is the loop's: a bug if not
            raise RuntimeError(f"the data loader gave samples {list(got.indices)} where the step expects {indices}")
        if got.error is not None:
            raise got.error
        record = getattr(self.dataset, "record_failure", None)
        for i, sid, reason in got.failures:
            if record is not None:
                record(i, sid, reason)
        self._dropped.update(got.none)
        self.collator.dropped += len(got.none)
        return got.batch

    def skipped_count(self) -> int:
        """Distinct samples skipped so far: those in the dataset's skip report (``dataset.skipped``, each
        counted once) plus dataset indices that gave ``None`` without being reported there. A sample that
        fails to decode counts once however many epochs draw it."""
        report = getattr(self.dataset, "skipped", None)
        reported = frozenset(getattr(self.dataset, "failed_indices", ()))
        return (len(report) if report is not None else 0) + len(self._dropped - reported)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self, data: DataPosition, rng: dict) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "data": dataclasses.asdict(data),
            "config": self.config.to_dict(),
            "world_size": self.dist.world_size,
            "skipped": self.skipped_count(),
            **({"run": self.run_info} if self.run_info is not None else {}),
        }

    def save(self, data: DataPosition | None = None, rng: dict | None = None) -> Path | None:
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, self.model.trainable_state_dict(),
                                        self.state_dict(data or self.data, rng or ckpt.rng_state()),
                                        self.config.keep_last)
        barrier(self.dist)
        return path

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Restore the newest intact checkpoint under OUTPUT (or `path`); False when there is none.

        A damaged checkpoint (checksum, size) is reported in one line and the previous one is used;
        `ckpt.CheckpointError` names the file when none is intact or `path` is damaged. A checkpoint this
        run cannot continue (`check_resumable`) raises ValueError before anything is restored."""
        if path is not None:
            path = Path(path)
            trainable, state = self._load_fitting(path)
        else:
            found = ckpt.load_latest(self.ckpt_root, loader=self._load_fitting,
                                     notice=_notice if self.dist.is_main else lambda m: None)
            if found is None:
                return False
            path, trainable, state = found
        check_resumable(path, state, self.config, self.dist.world_size, self.run_info)
        ckpt.load_trainable_into(self.model, trainable, path / ckpt.TRAINABLE_FILE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._sync_lr_to_schedule(int(state["step"]), state["config"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.data = DataPosition(**state["data"])
        if self.dist.is_main:
            self._truncate_log(self.step)
        return True

    def _load_fitting(self, path: Path) -> tuple[dict, dict]:
        """`ckpt.load_checkpoint(path)`, with trainable tensors and optimiser groups that fit this model
        (else `ckpt.CheckpointError` naming the file: `load_latest` then tries the previous one), so
        that nothing is restored from a checkpoint that cannot be restored whole."""
        trainable, state = ckpt.load_checkpoint(path)
        ckpt.check_resume_state(state, path / ckpt.STATE_FILE)
        ckpt.check_trainable(self.model, trainable, path / ckpt.TRAINABLE_FILE)
        groups = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in state["optimizer"]["param_groups"]]
        if groups != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise ckpt.CheckpointError(f"{path / ckpt.STATE_FILE}: optimiser parameter groups {groups[:8]} do not "
                                       f"fit this model's {[len(g['params']) for g in self.optimizer.param_groups]}")
        self._check_restorable(state, path / ckpt.STATE_FILE)
        return trainable, state

    def _check_restorable(self, state: dict, file: Path) -> None:
        """`ckpt.CheckpointError` naming `file` unless the optimiser moments fit the parameters (same
        shapes, finite, a step >= 0) and the generator states are ones the generators take: what
        would otherwise fail deep in AdamW or `set_rng_state` after part of the state was restored."""
        def bad(what: str) -> ckpt.CheckpointError:
            return ckpt.CheckpointError(f"{file}: {what} (damaged or not written by sam_fast)")

        saved = state["optimizer"]
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        where = {i: p for i, p in zip(ids, params)}
        for key, moments in saved["state"].items():
            param = where.get(key, where.get(int(key)) if str(key).isdigit() else None)
            if param is None or not isinstance(moments, dict):
                raise bad(f"optimiser state for parameter {str(key)[:20]!r}, which no group holds")
            for name, t in moments.items():
                if not isinstance(t, torch.Tensor):
                    continue
                if name == "step":
                    if t.numel() != 1 or not bool(torch.isfinite(t).all()) or float(t) < 0:
                        raise bad(f"optimiser step of parameter {key} is not a count >= 0")
                elif t.shape != param.shape or not bool(torch.isfinite(t).all()):
                    raise bad(f"optimiser {name} of parameter {key} has shape {tuple(t.shape)} (the parameter "
                              f"{tuple(param.shape)}) or non-finite values")
        rng = state["rng"]
        torch_state = rng.get("torch")
        if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8 \
                or torch_state.shape != torch.get_rng_state().shape:
            raise bad("the torch generator state is not a uint8 tensor of the generator's size")
        try:
            random.Random().setstate(rng["python"])
            np.random.RandomState().set_state(rng["numpy"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"a generator state is not one Python/NumPy take ({type(e).__name__})") from None

    def _sync_lr_to_schedule(self, step: int, saved: dict) -> None:
        """The learning rate of the next step from *this* run's schedule. The optimiser state holds
        the rate the checkpointed run's schedule left behind; with a changed max_steps, warmup
        or lr (e.g. extending a finished run, whose cosine ended at 0) that rate would drive the
        first resumed step. Unchanged options give the same value, so resumes stay bit-exact."""
        cfg = self.config
        changed = {k: (saved.get(k), getattr(cfg, k)) for k in ("max_steps", "warmup_steps", "lr", "min_lr_ratio")
                   if k in saved and saved.get(k) != getattr(cfg, k)}
        if changed and self.dist.is_main:
            warnings.warn("resuming with a changed schedule (" + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in
                          changed.items()) + f"); the learning rate follows the new schedule from step {step + 1}",
                          stacklevel=3)
        if "lr" in changed:
            self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        lrs = [base * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
               for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

    def _truncate_log(self, step: int) -> None:
        """Drop log records after `step` (written by the interrupted run past its last checkpoint), and
        lines that do not parse (a record cut short by a full disk or a kill), saying so in one line."""
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        keep, bad = [], []
        for i, ln in enumerate(log.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            if not ln.strip():
                continue
            try:
                rec_step = json.loads(ln)["step"]
                if isinstance(rec_step, bool) or not isinstance(rec_step, int):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                bad.append(i)
                continue
            if rec_step <= step:
                keep.append(ln)
        if bad:
            _notice(f"{log}: dropped {len(bad)} partial or unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
                    f"{', ...' if len(bad) > 5 else ''}), e.g. a record cut short by a full disk")
        tmp = log.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, log)

    # -- the loop -----------------------------------------------------------------------------
    def _set_train_mode(self) -> None:
        self.model.eval()  # frozen backbone: no dropout
        for name in TRAINABLE_MODULES:
            getattr(self.model, name).train()

    def _micro_batches(self, batches: list, n_tok: list[int], epoch: int):
        """(batch, answer tokens, loss weight 1 or 0) for each forward/backward of this rank's step.

        Micro-batches without samples (all undecodable under skip_bad) or answer tokens are skipped.
        Under FSDP every rank must run the LLM equally often (its all-gathers are collectives), so a
        rank whose micro-batch a is empty while another rank's is not runs a stand-in batch (its
        first non-empty one, else the first usable sample of the dataset) with loss weight 0, which
        adds exact zeros to the gradients."""
        has = [b is not None and n > 0 for b, n in zip(batches, n_tok, strict=True)]
        if self.fsdp is None:
            return [(b, n, 1.0) for b, n, h in zip(batches, n_tok, has, strict=True) if h]
        anyone = torch.tensor(has, dtype=torch.int32)
        torch.distributed.all_reduce(anyone, op=torch.distributed.ReduceOp.MAX)
        runs, stand_in = [], None
        for b, n, h, a in zip(batches, n_tok, has, anyone.tolist(), strict=True):
            if h:
                runs.append((b, n, 1.0))
            elif a:
                if stand_in is None:
                    stand_in = self._stand_in(batches, n_tok, epoch)
                runs.append((*stand_in, 0.0))
        return runs

    def _stand_in(self, batches: list, n_tok: list[int], epoch: int) -> tuple[dict, int]:
        for b, n in zip(batches, n_tok, strict=True):
            if b is not None and n > 0:
                return b, n
        for i in range(len(self.dataset)):
            b = self._load([i], epoch)
            if b is not None and int((b["labels"][:, 1:] != -100).sum()) > 0:
                return b, 1
        raise RuntimeError(f"rank {self.dist.rank}: no usable sample in the dataset to keep FSDP's collectives "
                           "in step with the other ranks")

    # -- non-finite values ---------------------------------------------------------------------
    def _non_finite_grads(self) -> list[str]:
        grads = [(n, p.grad) for n, p in self.named_params if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):
            return []
        return [n for n, g in grads if not bool(torch.isfinite(g).all())]

    def _non_finite_state(self) -> list[str]:
        """Trainable parameters and optimiser moments that hold NaN/inf (empty: all finite)."""
        tensors = list(self.named_params)
        names = {id(p): n for n, p in self.named_params}
        for p, st in self.optimizer.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    tensors.append((f"{names.get(id(p), '?')} ({k})", v))
        if bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
            return []
        return [n for n, t in tensors if not bool(torch.isfinite(t).all())]

    def _stop_before_update(self, what: str, ids, data_before: DataPosition, rng_before: dict):
        """Drop this step's gradients, checkpoint the state before it and raise NonFiniteLossError."""
        self.optimizer.zero_grad(set_to_none=True)
        self.data = data_before
        path = self.save(data_before, rng_before)
        raise NonFiniteLossError(
            f"{what} at step {self.step + 1} (samples {ids} on rank {self.dist.rank}); stopped. The last good state "
            f"(after step {self.step}) is saved in {path or self.ckpt_root}. Try a lower --lr, bf16 instead of "
            "fp16, or check these samples.")

    # -- signals ---------------------------------------------------------------------------------
    def _install_signal_handlers(self, flag: dict):
        """SIGINT/SIGTERM set flag["signum"] (the loop then finishes the step, checkpoints and stops); a
        second one aborts at once (KeyboardInterrupt). Returns the previous handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if flag["signum"] is not None:
                raise KeyboardInterrupt
            flag["signum"] = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _stop_requested(self, flag: dict) -> int | None:
        signum = flag["signum"] or 0
        if self.dist.enabled:  # every rank stops after the same step
            t = torch.tensor([signum], dtype=torch.int64)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            signum = int(t.item())
        return signum or None

    # -- the loop ------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        """Train to ``max_steps`` (from the newest intact checkpoint when `resume`).

        Without `resume` the output directory must not hold checkpoints or log records of a run, with
        `resume` it must hold one (`RunDirectoryError`). SIGINT/SIGTERM finish the current step, checkpoint it and raise
        `TrainingInterrupted`; NaN/inf in the loss, a gradient or the updated state raise
        `NonFiniteLossError` without applying or checkpointing them."""
        self._open_run_dir(resume)
        result = TrainResult(step=self.step)
        t_start = time.perf_counter()
        saved = _Saved()
        with contextlib.ExitStack() as stack:  # closed in reverse: loader, threads, signals, log
            log = self._open_step_log(stack)
            flag = self._catch_signals(stack)
            self._limit_cpu_threads(stack)
            loaded = self._open_loader(stack, self.config.max_steps - self.step)
            self._evaluate_if_due(log, result)  # a resumed run whose last evaluation was cut short
            while self.step < self.config.max_steps:
                rec = self._train_step(loaded)
                result.losses.append(rec["loss"])
                log.write(rec)
                self._checkpoint_or_stop(flag, saved)
                if self._evaluate_if_due(log, result):
                    self._checkpoint_or_stop(flag, saved)  # a signal during the evaluation stops here
        result.step, result.checkpoint = self.step, saved.path or ckpt.latest_checkpoint(self.ckpt_root)
        result.skipped = self.skipped_count()
        result.seconds = time.perf_counter() - t_start
        return result

    def _open_run_dir(self, resume: bool) -> None:
        """Refuse a run already in OUTPUT unless resuming; create OUTPUT, drop interrupted writes,
        restore the newest checkpoint (`resume`) and put the model in training mode. Resuming a directory
        that holds no run at all is refused: it would silently start a new one."""
        if resume and not any((self.out / n).exists() for n in ("run.json", "log.jsonl", "checkpoints")):
            raise RunDirectoryError(f"{self.out} holds no checkpoint to resume from (no training run there): "
                                    "train without resume (drop --resume) to start a new run")
        if not resume and self.dist.is_main:
            log = self.out / "log.jsonl"
            if ckpt.step_dirs(self.ckpt_root) or (log.is_file() and log.stat().st_size > 0) \
                    or (self.out / HISTORY_FILE).exists():
                raise RunDirectoryError(f"{self.out} already holds a training run (checkpoints/, log.jsonl, "
                                        f"{HISTORY_FILE}): resume it, or remove them (sam-fast train --overwrite) "
                                        "to start over")
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale(self.ckpt_root)
        barrier(self.dist)
        if resume and not self.resume() and self.dist.is_main:  # a run stopped before its first checkpoint
            _notice(f"{self.out}: no checkpoint yet (the run stopped before its first one): starting from step 0")
            self._truncate_log(0)  # the records of the interrupted first steps go
        if self.validation is not None:
            self.validation.start(self.step)
        self._set_train_mode()

    def _open_step_log(self, stack: contextlib.ExitStack) -> _StepLog:
        """log.jsonl (appended), the progress bar and the reporters of the main process; closed by `stack`."""
        cfg = self.config
        log = _StepLog(cfg.log_every, cfg.max_steps)
        if not self.dist.is_main:
            return log
        log.file = stack.enter_context(open(self.out / "log.jsonl", "a"))  # noqa: SIM115
        if cfg.progress:
            from tqdm.auto import tqdm

            log.bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
            stack.callback(log.bar.close)
        if cfg.report_to:
            log.reporters = _Reporters(cfg.report_to, self.out, self.step, cfg.to_dict())
            stack.callback(log.reporters.close)
        return log

    def _catch_signals(self, stack: contextlib.ExitStack) -> dict:
        """Install the SIGINT/SIGTERM handlers (`_install_signal_handlers`) until `stack` closes."""
        flag = {"signum": None}
        previous = self._install_signal_handlers(flag)
        stack.callback(lambda: [signal.signal(sig, h) for sig, h in previous.items()])
        return flag

    def _limit_cpu_threads(self, stack: contextlib.ExitStack) -> None:
        """On a CPU, run with ``cpu_threads`` intra-op threads until `stack` closes."""
        threads, want = torch.get_num_threads(), self.config.cpu_threads
        if self.device.type == "cpu" and want > 0 and want != threads:
            torch.set_num_threads(want)
            stack.callback(torch.set_num_threads, threads)

    def _open_loader(self, stack: contextlib.ExitStack, steps: int):
        """An iterator over the micro-batches of the next `steps` steps; its processes stop when `stack` closes
        (now, not when the iterator is collected)."""
        loaded = iter(self._loader(steps))
        shutdown = getattr(loaded, "_shutdown_workers", None)
        if shutdown is not None:
            stack.callback(shutdown)
        return loaded

    def _train_step(self, loaded) -> dict:
        """One optimiser step on the next global batch; returns its log record."""
        t0 = time.perf_counter()
        data_before, rng_before = DataPosition(**dataclasses.asdict(self.data)), ckpt.rng_state()
        micro, epoch = self._next_indices()
        t_data = time.perf_counter()
        batches = [self._receive(next(loaded), idx) for idx in micro]
        t_data = time.perf_counter() - t_data
        n_tok = [0 if b is None else int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        total = all_reduce_sum(torch.tensor([float(sum(n_tok))], dtype=torch.float64), self.dist).item()
        if total == 0:
            raise RuntimeError(f"step {self.step + 1}: the global batch has no answer tokens")
        lr = self.optimizer.param_groups[0]["lr"]
        global_loss, ids = self._forward_backward(batches, n_tok, total, epoch)
        if not math.isfinite(global_loss):
            self._stop_before_update(f"non-finite loss ({global_loss})", ids, data_before, rng_before)
        grad_norm = self._update(ids, data_before, rng_before)
        self.step += 1
        dt = time.perf_counter() - t0
        return {"step": self.step, "loss": global_loss, "lr": lr, "grad_norm": grad_norm, "epoch": epoch,
                "samples": self.step * self.global_batch, "samples_per_s": self.global_batch / dt,
                "tokens": int(total), "data_s": t_data}

    def _forward_backward(self, batches: list, n_tok: list[int], total: float, epoch: int) -> tuple[float, list]:
        """Accumulate the gradients of this rank's micro-batches, each weighted by its share of the global
        batch's `total` answer tokens; returns (the global batch's loss, the ids of the samples used)."""
        amp_dtype = self.config.compute_dtype
        pin = self.device.type == "cuda"
        loss_sum = torch.zeros((), dtype=torch.float64)
        ids = []
        for b, n, weight in self._micro_batches(batches, n_tok, epoch):
            if weight:
                ids += b["ids"]
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = self.model(**model_inputs(b, self.device, non_blocking=pin))
            loss = out.loss.float() * (n / total) * weight
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach().double().cpu()
        return all_reduce_sum(loss_sum.reshape(1), self.dist).item(), ids

    def _update(self, ids: list, data_before: DataPosition, rng_before: dict) -> float | None:
        """All-reduce, check, clip and apply the gradients, advance the schedule; returns the gradient norm
        (when clipping). Non-finite gradients or updated state raise `NonFiniteLossError`."""
        cfg = self.config
        all_reduce_grads(self.params, self.dist)
        self.scaler.unscale_(self.optimizer)
        if not self.scaler.is_enabled():  # fp16: the scaler skips steps with inf gradients itself
            bad = self._non_finite_grads()
            if bad:
                self._stop_before_update(f"non-finite gradient ({', '.join(bad)})", ids, data_before, rng_before)
        grad_norm = None
        if cfg.clip_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():  # fp16: the scaler skips steps with inf grads; the schedule goes on
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        bad = self._non_finite_state()
        if bad:
            good = ckpt.latest_checkpoint(self.ckpt_root)
            raise NonFiniteLossError(
                f"non-finite values after the update of step {self.step + 1} ({', '.join(bad)}; samples "
                f"{ids} on rank {self.dist.rank}); stopped without saving this state. The last good "
                f"checkpoint is {good or 'none (no checkpoint yet)'}. Try a lower --lr.")
        return grad_norm

    def _evaluate_if_due(self, log: _StepLog, result: TrainResult) -> bool:
        """Evaluate the current step when it is due (`Validation`); the global RNGs and the modules' train/eval
        modes are restored afterwards, so the training goes on as without it. True when it evaluated."""
        v = self.validation
        if v is None or not v.due(self.step):
            return False
        rng = ckpt.rng_state()
        try:
            entry = v.run(self.model, self.step, self.config.compute_dtype, self.device)
        finally:
            ckpt.set_rng_state(rng)
            self._set_train_mode()
        if entry is not None:
            log.write_eval(entry)
            result.evals.append(entry)
        return True

    def _checkpoint_or_stop(self, flag: dict, saved: _Saved) -> None:
        """Checkpoint every ``save_every`` steps, at the end and before an evaluation (once per step); after a
        SIGINT/SIGTERM (on any rank), checkpoint this step and raise `TrainingInterrupted`."""
        cfg = self.config
        due = self.step % cfg.save_every == 0 or self.step == cfg.max_steps or \
            (self.validation is not None and self.validation.due(self.step))  # every score has its checkpoint
        if due and saved.step != self.step:
            saved.path, saved.step = self.save(), self.step
        signum = self._stop_requested(flag)
        if signum is not None and self.step < cfg.max_steps:
            if saved.step != self.step:
                saved.path, saved.step = self.save(), self.step
            raise TrainingInterrupted(signum, self.step, saved.path or self.ckpt_root)
