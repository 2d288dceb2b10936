"""HF-style directories and in-memory models: HF InstructBLIP (``model_type == "instructblip"``),
SAM directories written by ``save_pretrained``, and trainable deltas (SAM's trained modules over
such a base); `from_instructblip`, `save_trainable_delta`, `load_trainable_delta`. A delta names
its base directory, and a delta is itself a base, hence both live here."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from sam_fast.config import check_config_dict
from sam_fast.models.loading.common import (
    TRAINABLE_MODULES,
    _build_model,
    _config_class,
    _dtype_plan,
    _format_keys,
    _to_sam_config,
)
from sam_fast.models.loading.files import _read_config_json, read_state_dict

DELTA_WEIGHTS_NAME = "sam_delta.safetensors"
DELTA_INFO_NAME = "sam_delta.json"
DELTA_FORMAT = "sam_fast.trainable_delta"


# ----------------------------------------------------------------------------------------------
# Sources: directories and in-memory models
# ----------------------------------------------------------------------------------------------
def _load_config_from_dir(cls, directory):
    """The config of a directory: HF InstructBLIP (model_type instructblip) or SAM."""
    raw = _read_config_json(directory)
    check_config_dict(raw, str(Path(directory) / "config.json"))  # before a config (or a model) is built from it
    config_cls = _config_class(cls)
    if raw.get("model_type") == getattr(config_cls, "model_type", None):
        return config_cls.from_pretrained(str(directory))
    from transformers import InstructBlipConfig

    if raw.get("model_type") not in (None, "instructblip"):
        warnings.warn(
            f"{directory}: model_type {raw.get('model_type')!r} is neither 'instructblip' nor "
            f"{config_cls.model_type!r}; reading it as an InstructBLIP config",
            stacklevel=3,
        )
    return InstructBlipConfig.from_pretrained(str(directory))


def _source_config_and_state_dict(cls, source, *, dtype=None, device=None):
    """(config, state_dict, description) for a directory, delta directory or in-memory model."""
    if isinstance(source, nn.Module):
        if not hasattr(source, "config"):
            raise TypeError(f"{type(source).__name__} has no .config; pass an InstructBLIP or SAM model")
        return source.config, source.state_dict(), f"<in-memory {type(source).__name__}>"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a directory or a model, got {type(source).__name__}")
    d = Path(source)
    if not d.is_dir():
        raise FileNotFoundError(f"{str(d)!r} is not a directory")
    if is_trainable_delta_dir(d):
        model = load_trainable_delta(cls, d, dtype=dtype, device=device)
        return model.config, model.state_dict(), str(d)
    config = _load_config_from_dir(cls, d)
    return config, read_state_dict(d, dtype=dtype, device=device), str(d)


def from_instructblip(
    cls,
    path_or_model,
    *,
    dtype: torch.dtype | None = None,
    device=None,
    copy: bool = False,
    strict: bool = True,
    return_report: bool = False,
    **config_overrides,
):
    """Build ``cls`` (SAM) from an HF InstructBLIP (or SAM) directory or in-memory model.

    See the module docstring. The three new modules are initialised (guidance zero) when absent
    (the usual case); a SAM source keeps its own.
    """
    dtype = _dtype_plan(cls, dtype)
    base_config, state_dict, desc = _source_config_and_state_dict(cls, path_or_model, dtype=dtype, device=device)
    config = _to_sam_config(cls, base_config, config_overrides)
    model, report = _build_model(
        cls, config, state_dict, dtype=dtype, device=device, copy=copy, strict=strict, source=desc
    )
    return (model, report) if return_report else model


# ----------------------------------------------------------------------------------------------
# Trainable deltas
# ----------------------------------------------------------------------------------------------
def is_trainable_delta_dir(directory) -> bool:
    """True if ``directory`` holds a trainable delta (``sam_delta.json``)."""
    return isinstance(directory, (str, os.PathLike)) and (Path(directory) / DELTA_INFO_NAME).is_file()


def _trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    fn = getattr(model, "trainable_state_dict", None)
    if fn is not None:
        return dict(fn())
    return {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in TRAINABLE_MODULES}


def save_trainable_delta(model, directory, base_reference: str) -> Path:
    """Write ``config.json``, ``sam_delta.safetensors`` and ``sam_delta.json`` into ``directory``."""
    from safetensors.torch import save_file

    if not isinstance(base_reference, (str, os.PathLike)) or not str(base_reference):
        raise ValueError("base_reference must be a non-empty path to the base model directory")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(d))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _trainable_state_dict(model).items()}
    save_file(tensors, str(d / DELTA_WEIGHTS_NAME), metadata={"format": "pt"})
    info = {"format": DELTA_FORMAT, "version": 1, "base": str(base_reference), "keys": sorted(tensors)}
    with open(d / DELTA_INFO_NAME, "w") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    return d


def _resolve_base_reference(directory: Path, ref: str) -> Path | None:
    candidates = [Path(ref)] if os.path.isabs(ref) else [Path(ref), directory / ref]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def load_trainable_delta(
    cls,
    directory,
    base=None,
    *,
    dtype: torch.dtype | None = None,
    device=None,
    copy: bool = False,
    return_report: bool = False,
):
    """Base model (recorded reference, or ``base``) + the delta in ``directory``; see module docstring."""
    from safetensors.torch import load_file

    dtype = _dtype_plan(cls, dtype)
    d = Path(directory)
    info_path = d / DELTA_INFO_NAME
    if not info_path.is_file():
        raise FileNotFoundError(f"{str(info_path)!r} not found: {str(d)!r} is not a trainable-delta directory")
    with open(info_path) as fh:
        info = json.load(fh)
    if info.get("format") != DELTA_FORMAT:
        raise ValueError(f"{info_path}: format {info.get('format')!r} is not {DELTA_FORMAT!r}")
    weights_path = d / DELTA_WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{str(weights_path)!r} not found (listed by {str(info_path)!r})")
    delta = load_file(str(weights_path))
    if sorted(delta) != sorted(info.get("keys", [])):
        raise ValueError(
            f"{weights_path}: tensors {_format_keys(sorted(delta))} differ from the keys listed in {info_path}"
        )
    if base is None:
        ref = info.get("base")
        resolved = _resolve_base_reference(d, ref) if ref else None
        if resolved is None:
            raise FileNotFoundError(
                f"base model {ref!r} recorded in {str(info_path)!r} not found (tried it as given and "
                f"relative to {str(d)!r}); pass base= to load_trainable_delta"
            )
        base = resolved
    config = _config_class(cls).from_pretrained(str(d))
    _, base_sd, base_desc = _source_config_and_state_dict(cls, base, dtype=dtype, device=device)
    state_dict = dict(base_sd)
    state_dict.update(delta)
    model, report = _build_model(
        cls,
        config,
        state_dict,
        dtype=dtype,
        device=device,
        copy=copy,
        strict=True,
        source=f"{d} over base {base_desc}",
    )
    return (model, report) if return_report else model
