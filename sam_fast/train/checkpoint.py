"""Training checkpoints: SAM's trainable tensors + the state needed to resume, in formats that cannot
carry code (safetensors and JSON; nothing is unpickled). The layout under ``OUTPUT/checkpoints`` is
described in `sam_fast.models.checkpoint_files`.

A checkpoint is written into a hidden temporary directory (files fsynced), then renamed into place;
`latest` is replaced atomically after that. An interrupted write therefore leaves at most a stale
``.tmp-*`` directory (ignored and cleaned) and the previous checkpoint loadable. Only the newest
``keep_last`` checkpoints are kept. Tensors that are not finite are never written.

Loading checks every checksum first: a truncated or bit-flipped file raises `CheckpointError` naming
the file, and `load_latest` then falls back to the previous intact checkpoint. Checkpoints of older
sam_fast versions (a pickled ``trainer_state.pt``) are never unpickled: their trainable tensors still
load for evaluation, resuming from them is refused.

Reading the files (finding checkpoints, the manifest and its checksums, the trainable tensors) lives in
`sam_fast.models.checkpoint_files`, so that loading a model from a run directory does not import the
trainer; its names are importable from here as before. This module adds writing and the resume state.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from sam_fast.models import checkpoint_files as _files
from sam_fast.models.checkpoint_files import (  # the file format; these names stay importable from here
    LEGACY_STATE_FILE,
    STATE_FILE,
    STATE_FORMAT,
    STATE_TENSORS_FILE,
    STATE_VERSION,
    TRAINABLE_FILE,
    CheckpointError,
    LegacyCheckpointError,
    check_trainable,
    is_checkpoint_dir,
    is_legacy,
    latest_checkpoint,
    load_trainable,
    load_trainable_into,
    step_dirs,
)
from sam_fast.models.checkpoint_files import canonical_json as _canonical
from sam_fast.models.checkpoint_files import file_sha256 as _sha256
from sam_fast.models.checkpoint_files import load_tensors as _load_tensors
from sam_fast.models.checkpoint_files import notice as _notice
from sam_fast.models.checkpoint_files import read_manifest as _read_manifest
from sam_fast.models.checkpoint_files import verify_file as _verify

__all__ = [
    "CheckpointError", "LegacyCheckpointError", "LEGACY_STATE_FILE", "STATE_FILE", "STATE_FORMAT",
    "STATE_TENSORS_FILE", "STATE_VERSION", "TRAINABLE_FILE", "check_resume_state", "check_trainable", "clean_stale", "is_checkpoint_dir",
    "is_legacy",
    "latest_checkpoint", "load_checkpoint", "load_latest", "load_trainable", "load_trainable_into",
    "rng_state", "save_checkpoint", "set_rng_state", "step_dirs",
]


# -- RNG ----------------------------------------------------------------------------------------
def rng_state() -> dict:
    """The torch, Python, NumPy (and CUDA) generator states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- state <-> (JSON, tensors) ------------------------------------------------------------------
def _encode(obj, tensors: dict[str, torch.Tensor], where: str):
    """JSON-able form of `obj`; tensors and arrays go to `tensors` and are referenced by key."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot store a NumPy array of dtype {obj.dtype} (at {where}) in a checkpoint")
        key = f"t{len(tensors)}"
        arr = obj.astype(np.int64) if obj.dtype.kind == "u" else obj  # safetensors/torch: no wide unsigned
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr).copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} (at {where}) in a checkpoint: only numbers, strings, "
                    "lists, tuples, dicts, tensors and NumPy arrays")


def _decode(obj, tensors: dict[str, torch.Tensor], file: Path):
    if isinstance(obj, list):
        return [_decode(v, tensors, file) for v in obj]
    if not isinstance(obj, dict):
        return obj
    try:
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: refers to a tensor that {file.parent / STATE_TENSORS_FILE} lacks "
                              f"({e})") from None
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, file) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors, file) if not isinstance(k, list) else tuple(k): _decode(v, tensors, file)
                for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, file) for k, v in obj.items()}


# -- files ----------------------------------------------------------------------------------------
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


def clean_stale(ckpt_root: Path) -> None:
    """Remove temporary directories left by interrupted writes."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                shutil.rmtree(p, ignore_errors=True)


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"refusing to write a checkpoint: {what} tensor {k} holds NaN/inf values")


def _write_files(tmp: Path, step: int, tensors: dict, state_tensors: dict, encoded) -> None:
    """The three files of checkpoint `step` in `tmp`, each synced to disk."""
    save_file(tensors, str(tmp / TRAINABLE_FILE), metadata={"step": str(step), "format": "sam_fast.trainable"})
    save_file(state_tensors, str(tmp / STATE_TENSORS_FILE), metadata={"step": str(step), "format": STATE_FORMAT})
    files = {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size}
             for f in (TRAINABLE_FILE, STATE_TENSORS_FILE)}
    body = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "files": files, "state": encoded}
    (tmp / STATE_FILE).write_text(json.dumps({**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}))
    for f in (TRAINABLE_FILE, STATE_TENSORS_FILE, STATE_FILE):
        _fsync_file(tmp / f)
    _fsync_dir(tmp)


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, trainable: dict[str, torch.Tensor], state: dict,
                    keep_last: int | None = None) -> Path:
    """Write checkpoint `step` atomically; returns its directory.

    `state` may hold numbers, strings, lists, tuples, dicts (any keys), tensors and NumPy arrays.
    Raises ValueError, before writing anything, when a tensor is not finite; older checkpoints are
    pruned (down to `keep_last`) only after this one is complete."""
    ckpt_root = Path(ckpt_root)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()}
    state_tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, state_tensors, "state")
    _check_finite(tensors, "trainable")
    _check_finite(state_tensors, "trainer state")
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:  # a full disk (or a signal) mid-write leaves no half-written folder behind
        _write_files(tmp, step, tensors, state_tensors, encoded)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


# -- loading --------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable tensors, trainer state) of one checkpoint directory, every checksum verified.

    Raises `CheckpointError` naming the damaged or missing file, `LegacyCheckpointError` for a
    pickled state of an older version (never unpickled)."""
    path = Path(path)
    manifest = _read_manifest(path)
    for name in (TRAINABLE_FILE, STATE_TENSORS_FILE):
        _verify(path, name, manifest)
    trainable = _load_tensors(path / TRAINABLE_FILE, str(map_location))
    state_tensors = _load_tensors(path / STATE_TENSORS_FILE, str(map_location))
    return trainable, _decode(manifest["state"], state_tensors, path / STATE_FILE)


def _count(value, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and least <= value <= _files.MAX_STEP


def check_resume_state(state, file: Path) -> None:
    """`CheckpointError` naming `file` unless the trainer's resume state has the
    fields a resume reads, of their types and in range (the checksums only show that the files are the
    ones that were written, not that sam_fast wrote them)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{file}: {what} (damaged or not written by sam_fast)")

    if not isinstance(state, dict):
        raise bad("the resume state is not a mapping")
    if not _count(state.get("step"), 0):  # equal to the checkpoint's step: read_manifest checks that
        raise bad(f"step {str(state.get('step'))[:40]!r} is not an integer in [0, {_files.MAX_STEP}]")
    if not _count(state.get("world_size", 1), 1):
        raise bad(f"world_size {str(state.get('world_size'))[:40]!r} is not an integer >= 1")
    config, data = state.get("config"), state.get("data")
    if not isinstance(config, dict) or not all(_count(config.get(k, 1), 1) for k in ("batch_size", "grad_accum")):
        raise bad("config has no batch_size / grad_accum integers >= 1")
    if not isinstance(data, dict) or set(data) != {"epoch", "pos"} or not all(_count(v, 0) for v in data.values()):
        raise bad(f"data position {str(data)[:60]} is not {{'epoch': int >= 0, 'pos': int >= 0}}")
    optimizer = state.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list) \
            or not isinstance(optimizer.get("state"), dict):
        raise bad("the optimiser state has no param_groups / state")
    for key in ("scheduler", "scaler", "rng"):
        if not isinstance(state.get(key), dict):
            raise bad(f"{key} state is not a mapping")


def load_latest(ckpt_root: str | os.PathLike, loader: Callable = load_checkpoint,
                notice: Callable[[str], None] = _notice):
    """(path, *loader(path)) of the newest intact checkpoint under `ckpt_root`, or None when there is none
    (`sam_fast.models.checkpoint_files.load_latest`, reading the resume state by default).

    A damaged checkpoint is reported in one line (`notice`) and the previous one is tried; an older-format
    one raises `LegacyCheckpointError` (resume state refused) unless `loader` does not read that state."""
    return _files.load_latest(ckpt_root, loader, notice)
