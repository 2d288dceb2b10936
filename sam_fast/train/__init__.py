"""Training: the paper's recipe, checkpoints and resume, data parallelism over torchrun.

The names below are imported on first use, so importing a submodule (``sam_fast.train.checkpoint``,
``sam_fast.train.outputs``) does not import the trainer. Loading a model or reading a checkpoint needs
nothing from here: `sam_fast.models.directory` and `sam_fast.models.checkpoint_files`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint", "latest_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "DistInfo": "distributed", "init_from_env": "distributed",
    "build_optimizer": "schedule", "build_scheduler": "schedule", "lr_factor": "schedule",
    "param_groups": "schedule",
    "NonFiniteLossError": "trainer", "RunDirectoryError": "trainer", "TrainConfig": "trainer",
    "Trainer": "trainer", "TrainingInterrupted": "trainer", "TrainResult": "trainer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
