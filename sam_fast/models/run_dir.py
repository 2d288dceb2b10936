"""Opening a `sam-fast train` output directory (or a checkpoint inside one) as a model: its base
(``run.json``'s "base") with the newest intact checkpoint's trainable tensors, or the one named.

The model class is passed in (``cls``), so that both `sam_fast.models.directory.load_model_dir` and
`SAM.from_pretrained` use it without an import circle; nothing here imports `sam_fast.train`, and only
JSON and safetensors files are read (`sam_fast.models.checkpoint_files`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sam_fast.config import read_config_file
from sam_fast.models import checkpoint_files as ckpt

RUN_INFO = "run.json"


def run_location(path: str | os.PathLike) -> tuple[Path, Path | None] | None:
    """(run directory, checkpoint or None) when `path` is a training output or a checkpoint directory
    (a checkpoint's run directory is two levels up: ``RUN/checkpoints/step-N``), else None."""
    path = Path(path)
    if ckpt.is_checkpoint_dir(path):
        return path.parent.parent, path
    if (path / RUN_INFO).is_file():
        return path, None
    return None


def _from_base(cls, run_dir: Path, base: dict, **load_kwargs):
    if base["kind"] == "builtin":  # its random frozen weights were saved into the run
        return cls.from_pretrained(run_dir / "base", **load_kwargs)
    path = base["path"]
    if Path(path, "config.json").is_file() and read_config_file(Path(path, "config.json")).get(
            "model_type") == "sam_fast":
        return cls.from_pretrained(path, **load_kwargs)
    return cls.from_instructblip(path, **base.get("overrides", {}), **load_kwargs)


def load_run(cls, path: str | os.PathLike, checkpoint: str | os.PathLike | None = None, **load_kwargs):
    """(model in eval mode, description) of run directory `path` at `checkpoint` (exactly that one: a
    damaged file raises `CheckpointError` naming it), or at its newest intact checkpoint that fits the
    model (a damaged one is reported and skipped); the base alone when it has none yet."""
    path = Path(path)
    if not (path / RUN_INFO).is_file():
        raise FileNotFoundError(f"{checkpoint or path}: no {RUN_INFO} in {path}: a checkpoint outside its training "
                                "output, so its base model is unknown")
    run = json.loads((path / RUN_INFO).read_text())
    model = _from_base(cls, path, run["base"], **load_kwargs)
    what = f"{path} (base only: no checkpoint yet)"
    if checkpoint is not None:
        ck = Path(checkpoint)
        trainable, step = ckpt.trainable_loader(model)(ck)
    else:
        found = ckpt.load_latest(path / "checkpoints", loader=ckpt.trainable_loader(model))
        ck, trainable, step = found if found is not None else (None, None, None)
    if ck is not None:
        ckpt.load_trainable_into(model, trainable)
        what = f"{path} at step {step} ({ck.name})"
    return model.eval(), what
