"""The machinery every checkpoint family shares: which modules SAM trains and adds, the `LoadReport`,
the dtype plan (HF's float32-kept modules), and building a model from a state dict with its
parameters on the meta device and the tensors assigned (no second copy of the weights).
Each family's module (`hf`, `lavis`, `released`) maps its keys and hands a SAM state dict here."""

from __future__ import annotations

import contextlib
import copy as _copy
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# SAM's modules that training updates (everything else is the frozen InstructBLIP): what a
# checkpoint or a trainable delta holds. Defined here, below the model, so the loaders need not import
# sam_fast.models.sam; the model exposes it as `SAM.TRAINABLE_MODULES`.
TRAINABLE_MODULES = ("adaptive_adjustment", "guidance_in", "guidance_out", "language_projection")

# Modules SAM adds to InstructBLIP (absent from an HF InstructBLIP checkpoint).
NEW_MODULES = tuple(m for m in TRAINABLE_MODULES if m != "language_projection")

# Keys of HF checkpoints that older transformers versions saved but which are buffers now.
_HF_LEGACY_BUFFER_RE = re.compile(r".*rotary_emb\.inv_freq")


@dataclass
class LoadReport:
    """What a load did. All lists hold our (SAM) key names except ``ignored`` entries that come
    from a LAVIS checkpoint, which keep their LAVIS names.

    missing: model keys nobody supplied (a successful load has none).
    unexpected: source keys the model has no place for (an error unless ``strict=False``).
    ignored: source keys dropped on purpose (known buffers, LAVIS heads; see IGNORED_LAVIS_KEYS).
    initialized: keys of the new modules initialised (guidance zero) instead of loaded.
    resized: what was grown to the configured vocabulary, one line per tensor (an HF LLM
        directory with fewer rows than ``text_config.vocab_size``, e.g. Vicuna's 32000 rows for
        LAVIS' 32000 + ``[PAD]``).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    source: str = ""


DTypeArg = Any  # None, a torch.dtype, or a callable key -> torch.dtype | None


def _target_dtype(dtype: DTypeArg, key: str):
    return dtype(key) if callable(dtype) and not isinstance(dtype, torch.dtype) else dtype


def _prepare(t: torch.Tensor, dtype, device, copy: bool) -> torch.Tensor:
    """Cast (floating tensors only) / move / clone one tensor; ``dtype`` is already resolved."""
    t = t.detach()
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
        copy = False
    if device is not None and t.device != torch.device(device):
        t = t.to(device)
        copy = False
    if copy:
        t = t.clone()
    return t


def _dtype_plan(cls, dtype: torch.dtype | None) -> DTypeArg:
    """``dtype`` for every key, except the modules the model keeps in float32 (HF semantics:
    ``_keep_in_fp32_modules`` when casting to float16, ``_keep_in_fp32_modules_strict`` when
    casting to float16 or bfloat16)."""
    if dtype is None or not isinstance(dtype, torch.dtype):
        return dtype  # None, or already a plan
    keep = []
    if dtype == torch.float16:
        keep += list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])
    if not keep:
        return dtype
    pattern = re.compile(r"(^|\.)(" + "|".join(re.escape(m) for m in keep) + r")($|\.)")
    return lambda key: torch.float32 if pattern.search(key) else dtype


# ----------------------------------------------------------------------------------------------
# Building a model from a state dict without a second copy of the weights
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """While active, every registered nn.Parameter is moved to the meta device right away.

    Buffers (RoPE inv_freq, the Q-former's position_ids) are left real, because non-persistent
    buffers are not in any checkpoint and must keep the values computed in ``__init__``.
    """
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _non_persistent_buffer_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            names.add(f"{mod_name}.{b}" if mod_name else b)
    return names


def _is_new_module_key(key: str) -> bool:
    return key.split(".", 1)[0] in NEW_MODULES


def _format_keys(keys: Iterable[str], limit: int = 40) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _build_model(
    cls,
    config,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype=None,
    device=None,
    copy: bool = False,
    strict: bool = True,
    source: str = "",
    report: LoadReport | None = None,
    origin: Mapping[str, str] | None = None,
):
    """Construct ``cls(config)`` with meta parameters and assign ``state_dict`` into it.

    New modules absent from ``state_dict`` are materialised and initialised (guidance zero). Raises
    ValueError on shape mismatches, on missing keys (other than the new modules) and, when
    ``strict``, on unexpected keys. ``origin`` (key -> the file or directory it came from) makes
    those messages name the file of each key when several sources were merged.
    """
    report = report if report is not None else LoadReport(source=source)
    report.source = report.source or source
    with _parameters_on_meta():
        model = cls(config)
    where = f" in {source}" if source else ""
    to_load = _matching_tensors(model, state_dict, dtype, device, copy, report, origin, where)
    if report.unexpected:
        _refuse_unexpected(cls, report.unexpected, strict, source, origin, where)
    _init_missing_new_modules(model, to_load, dtype, device, report)
    model.load_state_dict(to_load, strict=False, assign=True)
    _retie(model)
    report.missing = [k for k, t in model.state_dict().items() if t.is_meta]
    if report.missing:
        raise ValueError(f"missing keys{where} (not in the checkpoint): {_format_keys(report.missing)}")
    if device is not None:
        model.to(device)  # buffers; parameters are already there
    if hasattr(model, "freeze_backbone"):
        model.freeze_backbone()
    model.eval()
    return model, report


def _matching_tensors(model, state_dict, dtype, device, copy: bool, report: LoadReport, origin, where: str) -> dict:
    """The tensors of `state_dict` that have a place in `model`, prepared (dtype, device, copy); keys without
    one go to ``report.ignored`` (non-persistent or HF legacy buffers) or ``report.unexpected``. Raises
    ValueError listing every shape mismatch."""
    expected = model.state_dict()
    non_persistent = _non_persistent_buffer_names(model)
    to_load: dict[str, torch.Tensor] = {}
    mismatched = []
    for k, t in state_dict.items():
        if k not in expected:
            if k in non_persistent or _HF_LEGACY_BUFFER_RE.fullmatch(k):
                report.ignored.append(k)
            else:
                report.unexpected.append(k)
            continue
        if tuple(t.shape) != tuple(expected[k].shape):
            src = f" (from {origin[k]})" if origin and k in origin else ""
            mismatched.append(f"{k}{src}: checkpoint {tuple(t.shape)} vs model {tuple(expected[k].shape)}")
            continue
        to_load[k] = _prepare(t, _target_dtype(dtype, k), device, copy)
    if mismatched:
        raise ValueError(f"shape mismatch{where}: " + "; ".join(mismatched))
    return to_load


def _refuse_unexpected(cls, unexpected: list[str], strict: bool, source: str, origin, where: str) -> None:
    """Raise (`strict`) or warn about keys with no place in `cls`, grouped by the file they came from."""
    if origin:
        by_source: dict[str, list[str]] = {}
        for k in unexpected:
            by_source.setdefault(origin.get(k, source), []).append(k)
        listed = "; ".join(f"in {src}: {_format_keys(keys)}" for src, keys in by_source.items())
        msg = f"unexpected keys (no place in {cls.__name__}): {listed}"
    else:
        msg = f"unexpected keys{where} (no place in {cls.__name__}): {_format_keys(unexpected)}"
    if strict:
        raise ValueError(msg)
    warnings.warn(msg + " -- ignored because strict=False", stacklevel=4)


def _init_missing_new_modules(model, to_load: dict, dtype, device, report: LoadReport) -> None:
    """Materialise and initialise (guidance zero) the new modules where the source lacks them; loaded
    values (assigned afterwards) replace the initial ones where it has them."""
    missing_new = [k for k in model.state_dict() if _is_new_module_key(k) and k not in to_load]
    if not missing_new:
        return
    ref = to_load.get("language_projection.weight")
    new_dtype = _target_dtype(dtype, "guidance_in.weight")
    new_dtype = new_dtype or (ref.dtype if ref is not None else torch.get_default_dtype())
    new_device = device or (ref.device if ref is not None else "cpu")
    for name in NEW_MODULES:
        mod = getattr(model, name, None)
        if mod is not None:
            mod.to_empty(device=new_device)
            mod.to(new_dtype)
    if hasattr(model, "reset_guidance_parameters"):
        model.reset_guidance_parameters()
    report.initialized = sorted(missing_new)


def _retie(model: nn.Module) -> None:
    """Re-tie shared weights after ``assign=True`` replaced Parameter objects."""
    tie = getattr(model, "tie_weights", None)
    if tie is None:
        return
    try:
        tie()
    except Exception as exc:  # pragma: no cover - a model whose tying needs loaded data only
        warnings.warn(f"tie_weights() failed after loading: {exc!r}", stacklevel=3)


def _config_class(cls):
    config_cls = getattr(cls, "config_class", None)
    if config_cls is None:
        raise TypeError(f"{cls.__name__} has no config_class")
    return config_cls


def _to_sam_config(cls, config, overrides: Mapping[str, Any]):
    """An InstructBlipConfig / SAMConfig (object) -> cls's config class, overrides applied."""
    config_cls = _config_class(cls)
    if isinstance(config, config_cls) and not overrides:
        return _copy.deepcopy(config)
    return config_cls.from_instructblip_config(config, **overrides)
