"""Training checkpoints: SAM's trainable tensors (safetensors) + the state needed to resume.

Layout under ``OUTPUT/checkpoints``::

    step-00000100/trainable.safetensors   the four trainable modules' tensors (keys as in state_dict())
    step-00000100/trainer_state.pt        optimizer, scheduler, grad scaler, RNG, data position, step
    latest                                name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory (files fsynced), then renamed into place;
`latest` is replaced atomically after that. An interrupted write therefore leaves at most a stale
``.tmp-*`` directory (ignored and cleaned) and the previous checkpoint loadable. Only the newest
``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / TRAINABLE_FILE).is_file() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (`latest` if it names one, else the highest step)."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        cand = ckpt_root / pointer.read_text().strip()
        if (cand / TRAINABLE_FILE).is_file() and (cand / STATE_FILE).is_file():
            return cand
    dirs = step_dirs(ckpt_root)
    return dirs[-1][1] if dirs else None


def clean_stale(ckpt_root: Path) -> None:
    """Remove temporary directories left by interrupted writes."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, trainable: dict[str, torch.Tensor], state: dict,
                    keep_last: int | None = None) -> Path:
    """Write checkpoint `step` atomically; returns its directory."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()}
    save_file(tensors, str(tmp / TRAINABLE_FILE), metadata={"step": str(step), "format": "sam_fast.trainable"})
    torch.save(state, tmp / STATE_FILE)
    for f in (TRAINABLE_FILE, STATE_FILE):
        _fsync_file(tmp / f)
    _fsync_dir(tmp)
    old = None
    if final.exists():  # re-saving a step (e.g. the last good step after a non-finite loss)
        old = ckpt_root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    ptr_tmp = ckpt_root / f".tmp-latest-{os.getpid()}"
    ptr_tmp.write_text(name)
    os.replace(ptr_tmp, ckpt_root / "latest")
    _fsync_dir(ckpt_root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None and keep_last > 0:
        for _, p in step_dirs(ckpt_root)[:-keep_last]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable tensors, trainer state) of one checkpoint directory."""
    path = Path(path)
    trainable = load_file(str(path / TRAINABLE_FILE), device=str(map_location))
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=False)
    return trainable, state


def load_trainable_into(model, trainable: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model; the key sets must match exactly."""
    own = model.trainable_state_dict()
    missing, extra = sorted(set(own) - set(trainable)), sorted(set(trainable) - set(own))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the model's trainable tensors: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for k, v in trainable.items():
            if own[k].shape != v.shape:
                raise ValueError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
            own[k].copy_(v)
