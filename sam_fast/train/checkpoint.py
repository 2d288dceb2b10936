"""Training checkpoints: SAM's trainable tensors + the state needed to resume, in formats that cannot
carry code (safetensors and JSON; nothing is unpickled).

Layout under ``OUTPUT/checkpoints``::

    step-00000100/trainable.safetensors      the four trainable modules' tensors (keys as in state_dict())
    step-00000100/trainer_state.safetensors  the tensors of the resume state (optimiser moments, RNG states)
    step-00000100/trainer_state.json         the rest of it (step, data position, schedule, scaler, options),
                                             the sha256 and size of both safetensors files, and a sha256 of
                                             its own content
    latest                                   name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory (files fsynced), then renamed into place;
`latest` is replaced atomically after that. An interrupted write therefore leaves at most a stale
``.tmp-*`` directory (ignored and cleaned) and the previous checkpoint loadable. Only the newest
``keep_last`` checkpoints are kept. Tensors that are not finite are never written.

Loading checks every checksum first: a truncated or bit-flipped file raises `CheckpointError` naming
the file, and `load_latest` then falls back to the previous intact checkpoint. Checkpoints of older
sam_fast versions (a pickled ``trainer_state.pt``) are never unpickled: their trainable tensors still
load for evaluation, resuming from them is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
STATE_TENSORS_FILE = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"  # older versions: pickled; never loaded
STATE_FORMAT = "sam_fast.trainer_state"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, altered or of a refused format; the message names it."""


class LegacyCheckpointError(CheckpointError):
    """A checkpoint whose resume state is pickled (older sam_fast): refused, since unpickling runs code."""


def _notice(msg: str) -> None:
    print(f"sam_fast: {msg}", file=sys.stderr, flush=True)


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


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def is_legacy(path: Path) -> bool:
    """A checkpoint directory of an older sam_fast (pickled trainer_state.pt, no trainer_state.json)."""
    return (path / LEGACY_STATE_FILE).is_file() and not (path / STATE_FILE).is_file()


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds every file of a checkpoint (contents not checked), of this or an older format."""
    path = Path(path)
    if not (path / TRAINABLE_FILE).is_file():
        return False
    return ((path / STATE_FILE).is_file() and (path / STATE_TENSORS_FILE).is_file()) or is_legacy(path)


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (all files present; contents not checked), oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_checkpoint_dir(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (`latest` if it names one, else the highest step)."""
    cands = _candidates(Path(ckpt_root))
    return cands[0] if cands else None


def _candidates(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, the one `latest` names first, then newest to oldest."""
    dirs = [p for _, p in reversed(step_dirs(ckpt_root))]
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        named = [p for p in dirs if p.name == name]
        dirs = named + [p for p in dirs if p.name != name]
    return dirs


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
    save_file(tensors, str(tmp / TRAINABLE_FILE), metadata={"step": str(step), "format": "sam_fast.trainable"})
    save_file(state_tensors, str(tmp / STATE_TENSORS_FILE), metadata={"step": str(step), "format": STATE_FORMAT})
    files = {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size}
             for f in (TRAINABLE_FILE, STATE_TENSORS_FILE)}
    body = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "files": files, "state": encoded}
    (tmp / STATE_FILE).write_text(json.dumps({**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}))
    for f in (TRAINABLE_FILE, STATE_TENSORS_FILE, STATE_FILE):
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


# -- loading --------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict:
    """trainer_state.json of checkpoint `path`, its own checksum verified."""
    file = path / STATE_FILE
    if is_legacy(path):
        raise LegacyCheckpointError(
            f"{path / LEGACY_STATE_FILE}: resume state of an older sam_fast version, pickled, and not loaded "
            "because unpickling a file can run code; its trained weights (trainable.safetensors) still load for "
            "eval/generate, and `sam-fast train --model RUN_DIR --output NEW_DIR` starts a new run from them")
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{file}: not a sam_fast trainer state (format {fmt!r})")
    if data.get("version") != STATE_VERSION:
        raise CheckpointError(f"{file}: trainer state version {data.get('version')!r}; this sam_fast reads "
                              f"{STATE_VERSION}")
    body = {k: v for k, v in data.items() if k != "sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != data.get("sha256"):
        raise CheckpointError(f"{file}: checksum mismatch (the file was altered or damaged)")
    return data


def _verify(path: Path, name: str, manifest: dict) -> None:
    file = path / name
    want = manifest["files"].get(name)
    if want is None:
        raise CheckpointError(f"{path / STATE_FILE}: has no checksum for {name}")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    size = file.stat().st_size
    if size != want["bytes"]:
        raise CheckpointError(f"{file}: {size} bytes, {want['bytes']} expected (truncated or damaged)")
    if _sha256(file) != want["sha256"]:
        raise CheckpointError(f"{file}: sha256 mismatch (the file was altered or damaged)")


def _load_tensors(file: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device=device)
    except Exception as e:  # safetensors' errors do not name the file
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from None


def load_trainable(path: str | os.PathLike, map_location="cpu") -> tuple[dict[str, torch.Tensor], int]:
    """(trainable tensors, step) of one checkpoint directory, checksums verified. Reads no resume state,
    so checkpoints of older versions (pickled trainer_state.pt) load too, without that file."""
    path = Path(path)
    m = _STEP_DIR.match(path.name)
    if is_legacy(path):
        tensors = _load_tensors(path / TRAINABLE_FILE, str(map_location))
        if not m:
            raise CheckpointError(f"{path}: an older-format checkpoint must keep its step-NNNNNNNN directory name")
        return tensors, int(m.group(1))
    manifest = _read_manifest(path)
    _verify(path, TRAINABLE_FILE, manifest)
    return _load_tensors(path / TRAINABLE_FILE, str(map_location)), int(manifest["step"])


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


def load_latest(ckpt_root: str | os.PathLike, loader: Callable = load_checkpoint,
                notice: Callable[[str], None] = _notice):
    """(path, *loader(path)) of the newest intact checkpoint under `ckpt_root`, or None when there is none.

    A damaged checkpoint is reported in one line (`notice`) and the previous one is tried; an older-format
    one raises `LegacyCheckpointError` (resume state refused) unless `loader` does not read that state."""
    cands = _candidates(Path(ckpt_root))
    damaged = []
    for i, path in enumerate(cands):
        try:
            loaded = loader(path)
        except LegacyCheckpointError:
            raise
        except CheckpointError as e:
            damaged.append(str(e))
            later = f"falling back to {cands[i + 1].name}" if i + 1 < len(cands) else "no older checkpoint"
            notice(f"checkpoint {path.name} is damaged: {e}; {later}")
            continue
        return (path, *loaded)
    if damaged:
        raise CheckpointError(f"{ckpt_root}: no intact checkpoint ({len(damaged)} damaged: {'; '.join(damaged)})")
    return None


def load_trainable_into(model, trainable: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model; the key sets must match exactly."""
    own = model.trainable_state_dict()
    missing, extra = sorted(set(own) - set(trainable)), sorted(set(trainable) - set(own))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the model's trainable tensors: missing {missing}, "
                         f"unexpected {extra}")
    with torch.no_grad():
        for k, v in trainable.items():
            if own[k].shape != v.shape:
                raise ValueError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
            own[k].copy_(v)
