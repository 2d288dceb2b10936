"""Training: the paper's recipe, checkpoints and resume, data parallelism over torchrun."""

from sam_fast.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from sam_fast.train.distributed import DistInfo, init_from_env
from sam_fast.train.schedule import build_optimizer, build_scheduler, lr_factor, param_groups
from sam_fast.train.trainer import (
    NonFiniteLossError,
    RunDirectoryError,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    TrainResult,
)

__all__ = [
    "CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "DistInfo", "init_from_env",
    "build_optimizer", "build_scheduler", "lr_factor", "param_groups", "NonFiniteLossError", "RunDirectoryError",
    "TrainConfig", "Trainer", "TrainingInterrupted", "TrainResult",
]
