"""Reading checkpoint tensors from disk: HF-style directories (``model.safetensors``, shards,
``pytorch_model.bin``) and single ``.pth`` / ``.bin`` files through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sam_fast.config import read_config_file
from sam_fast.models.loading.common import _format_keys, _prepare, _target_dtype

# ----------------------------------------------------------------------------------------------
# Reading HF checkpoint directories
# ----------------------------------------------------------------------------------------------
_SAFE_SINGLE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_BIN_SINGLE = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"


def read_state_dict(directory, *, dtype=None, device=None) -> dict[str, torch.Tensor]:
    """Read all tensors of an HF-style checkpoint directory, one tensor at a time.

    Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json`` (shards),
    ``pytorch_model.bin``, ``pytorch_model.bin.index.json``. Floating tensors are cast to
    ``dtype`` and moved to ``device`` as they are read, so the peak memory is the result plus one
    tensor. ``.bin`` files are read with ``torch_load_weights_only``. Raises FileNotFoundError
    naming the directory and the file names looked for.
    """
    d = Path(directory)
    files: list[Path]
    if (d / _SAFE_SINGLE).is_file():
        files = [d / _SAFE_SINGLE]
    elif (d / _SAFE_INDEX).is_file():
        files = _index_files(d / _SAFE_INDEX)
    elif (d / _BIN_SINGLE).is_file():
        files = [d / _BIN_SINGLE]
    elif (d / _BIN_INDEX).is_file():
        files = _index_files(d / _BIN_INDEX)
    else:
        raise FileNotFoundError(
            f"no weights in {str(d)!r}: looked for {_SAFE_SINGLE}, {_SAFE_INDEX}, {_BIN_SINGLE}, {_BIN_INDEX}"
        )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            open_device = "cpu" if device is None else str(torch.device(device))
            with safe_open(str(f), framework="pt", device=open_device) as sf:
                for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    out[k] = _prepare(sf.get_tensor(k), _target_dtype(dtype, k), None, False)
        else:
            sd = _torch_load_state_dict(f)
            for k in list(sd.keys()):
                out[k] = _prepare(sd.pop(k), _target_dtype(dtype, k), device, False)
    return out


def _index_files(index_path: Path) -> list[Path]:
    with open(index_path) as fh:
        index = json.load(fh)
    names = sorted(set(index["weight_map"].values()))
    files = [index_path.parent / n for n in names]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"shard {str(f)!r} listed in {str(index_path)!r} does not exist")
    return files


def _read_config_json(directory) -> dict:
    """The JSON object of a directory's config.json (`ConfigError` naming the file when it is not one)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found (not an HF model directory)")
    return read_config_file(path)


# ----------------------------------------------------------------------------------------------
# Single checkpoint files (.pth / .bin / .safetensors)
# ----------------------------------------------------------------------------------------------
_UNSAFE_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER_REASON_RE = re.compile(r"WeightsUnpickler error:\s*(.+)")


def _unsafe_globals(path: Path, exc: BaseException) -> list[str]:
    """The classes / functions a checkpoint pickles that ``weights_only=True`` refuses."""
    names: list[str] = []
    getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if getter is not None:
        with contextlib.suppress(Exception):  # zip-format files only
            names = list(getter(str(path)))
    if not names:
        names = _UNSAFE_GLOBAL_RE.findall(str(exc))
    return sorted(set(names))


def torch_load_weights_only(path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with one clear error per failure.

    Zip-format files are memory-mapped. Nothing here ever unpickles arbitrary objects.
    Raises FileNotFoundError if ``path`` is not a file; ValueError naming the file when it pickles
    more than tensors and plain containers (a custom class, an omegaconf config, ...: the message
    names those classes and says how to re-save the weights of a file you trust), or when it is
    not a PyTorch checkpoint at all (random bytes, a text file, a truncated download).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} is not a file")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except Exception as exc:
        unsafe = _unsafe_globals(p, exc) if isinstance(exc, pickle.UnpicklingError) else []
        if unsafe:
            raise ValueError(
                f"{p}: torch.load(weights_only=True) refuses this file: besides tensors it pickles "
                f"{', '.join(unsafe)}, and sam_fast never unpickles arbitrary objects (they can run code). "
                f"If you trust where the file came from, re-save only its tensors (e.g. its 'model' state "
                f"dict, with torch.save) with the tools that wrote it, and load that copy"
            ) from None
        m = _UNPICKLER_REASON_RE.search(str(exc))
        lines = str(exc).strip().splitlines()
        reason = m.group(1).strip() if m else (lines[0] if lines else "")
        reason = f"{type(exc).__name__}: {reason}"[:200] if reason else type(exc).__name__
        raise ValueError(f"{p}: not a PyTorch checkpoint that torch.load(weights_only=True) can read ({reason})") from None


def _torch_load_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` / ``.bin`` file: the file itself, or its ``model`` entry (LAVIS
    runner checkpoints also hold ``optimizer``, ``config``, ``scaler``, ``epoch``), or a
    ``.safetensors`` file. ValueError naming the file when it holds anything else."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} is not a file")
        try:
            return load_file(str(p))
        except Exception as exc:
            raise ValueError(f"{p}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    obj = torch_load_weights_only(p)
    where = str(p)
    if isinstance(obj, Mapping) and "model" in obj:
        obj, where = obj["model"], f"{p} (its 'model' entry)"
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(
            f"{where}: not a state dict: entries {_format_keys([str(k) for k in bad], 8)} are not named tensors "
            f"(a runner checkpoint keeps its weights under 'model')"
        )
    if not obj:
        raise ValueError(f"{where}: holds no tensors")
    return dict(obj)
