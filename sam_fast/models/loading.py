"""Loading and saving SAM weights: HF InstructBLIP, LAVIS / released-SAM checkpoints, deltas.

Everything here is plain functions; `sam_fast.SAM`'s classmethods forward to them (``cls`` is
the SAM class, or any subclass of `PreTrainedModel` with the same state-dict layout).

Public functions
----------------
``from_instructblip(cls, path_or_model, *, dtype=None, device=None, copy=False, strict=True,
return_report=False, **config_overrides) -> SAM``
    Build SAM from an HF InstructBLIP directory (``config.json`` + ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``; ``pytorch_model.bin[.index.json]`` also read), a SAM
    directory saved with ``save_pretrained`` (``model_type == "sam_fast"``), or an in-memory
    `InstructBlipForConditionalGeneration` / SAM. The model is built with its parameters on the
    meta device and the checkpoint tensors are *assigned* (no second copy of a 7B model in RAM);
    an in-memory source therefore shares storage with the result unless ``copy=True``, and
    tensors read from ``.safetensors`` files without a dtype cast stay memory-mapped, as with HF
    ``from_pretrained`` (do not overwrite those files while the model is alive). The three
    new modules (``adaptive_adjustment``, ``guidance_in``, ``guidance_out``) start as the paper
    starts them (``model.reset_guidance_parameters()``: guidance zero) when the source lacks them.
    Then ``model.freeze_backbone()`` and ``model.eval()``.
    ``config_overrides`` go to ``SAMConfig.from_instructblip_config`` (``context_mode``,
    ``guidance``, ``interaction_layers``, ...); ``dtype`` (cast floating tensors while reading;
    ``cls._keep_in_fp32_modules`` such as ``query_tokens`` stay float32 under float16, as in HF),
    ``device`` (where tensors are placed), ``copy``, ``strict`` and ``return_report`` are
    reserved keyword names of this loader. Raises ValueError listing unexpected keys (a warning
    instead when ``strict=False``), shape mismatches and missing keys other than the three new
    modules (those can never be filled in, so they raise even with ``strict=False``).
    With ``return_report=True`` returns ``(model, LoadReport)``.

``lavis_to_sam_state_dict(sd) -> (new_sd, unmapped)``
    Rename a LAVIS ``blip2_vicuna_instruct`` or released-SAM state dict to our keys (the table:
    docs/model.md#checkpoint-key-maps). Tensors are not copied, except the EVA-ViT
    ``q_bias``/``v_bias`` pairs which become
    ``qkv.bias = cat[q_bias, zeros, v_bias]``. ``unmapped`` lists every input key that was not
    mapped, sorted; ``is_ignored_lavis_key(k)`` tells which of them are dropped on purpose
    (see ``IGNORED_LAVIS_KEYS``).

``from_lavis_checkpoint(cls, path, config=None, *, base=None, strict=True, context_mode=None,
dtype=None, device=None, copy=False, return_report=False) -> SAM``
    Load a LAVIS checkpoint file over the sources in ``base``. ``path`` and every ``.pth`` in
    ``base`` are read with ``torch.load(weights_only=True)``; a LAVIS runner checkpoint (a dict with
    ``model`` plus ``optimizer`` / ``config`` / ``scaler`` / ``epoch``) gives its ``model`` entry.
    ``base`` is one source or a list of them; each is
      - a LAVIS ``.pth`` (full, or trimmed like ``instruct_blip_vicuna7b_trimmed.pth``: query
        tokens, ``ln_vision``, Q-former, ``llm_proj``),
      - an EVA ViT ``.pth`` with unprefixed keys (LAVIS' ``eva_vit_g.pth``: ``cls_token``,
        ``blocks.0.attn.q_bias``, ...; its final norm / head and blocks past the configured depth
        are dropped as LAVIS drops them, listed in ``LoadReport.ignored``),
      - an HF LLM directory (``LlamaForCausalLM``, e.g. Vicuna-7B v1.1): its ``config.json`` must
        match ``config.text_config``; an embedding / LM head with fewer rows than
        ``text_config.vocab_size`` (Vicuna's 32000 vs LAVIS' 32000 + ``[PAD]``) is grown, each new
        row the mean of the existing rows (LAVIS initialises them at random), listed in
        ``LoadReport.resized``,
      - an HF InstructBLIP / SAM / delta directory or an in-memory InstructBLIP or SAM model
        (these also supply a configuration).
    Later sources win over earlier ones and ``path`` wins over all. The configuration is
    ``config`` (an InstructBlipConfig or SAMConfig, e.g. ``SAMConfig.instructblip_vicuna7b()``),
    else the first source's that has one; LAVIS files carry none. If ``path`` holds SAM keys
    (``one_2_muliple``, ``multiple_2_one``, ``attn``) it is the authors' checkpoint, which was
    trained with ``context_mode="shared"``: that mode is set, with a warning when the caller asked
    for another one (``context_mode=`` or ``config.context_mode``). The vision LayerNorm gets
    LAVIS' ``ln_vision`` eps 1e-5 (``config.post_layernorm_eps``) unless ``config`` sets
    ``post_layernorm_eps`` itself. With ``dtype=None`` and files of different floating dtypes
    (an fp16 ``eva_vit_g.pth`` with an fp32 Q-former file) every tensor is cast to float32.
    Errors (ValueError / FileNotFoundError, one line, naming the file): a file that is not a
    checkpoint or pickles more than ``weights_only=True`` allows (see
    ``torch_load_weights_only``), unknown keys (``strict=False``: a warning, keys in
    ``LoadReport.unexpected``), no source for a whole component (the ViT, the Q-former, the query
    tokens, the projection, the LLM), missing keys, shape mismatches, an LLM directory whose
    config differs from ``config.text_config``.

``torch_load_weights_only(path)``
    ``torch.load(weights_only=True)`` on CPU (memory-mapped for zip files) with one clear
    ValueError naming the file when it is not a checkpoint or pickles custom classes (it names
    them and how to re-save a trusted file's weights); nothing here unpickles arbitrary objects.
    Directories' ``pytorch_model.bin`` files are read through it too.

``save_trainable_delta(model, directory, base_reference) -> Path``
    Write ``config.json``, ``sam_delta.safetensors`` (``model.trainable_state_dict()`` only) and
    ``sam_delta.json`` = ``{"format": "sam_fast.trainable_delta", "version": 1, "base":
    base_reference, "keys": [...]}``. ``base_reference`` is a local directory (absolute, relative
    to the working directory, or relative to ``directory``) from which the frozen weights are read
    back: an HF InstructBLIP directory, a SAM directory or another delta directory.

``load_trainable_delta(cls, directory, base=None, *, dtype=None, device=None, copy=False,
return_report=False) -> SAM``
    Read the delta directory's config, take every other tensor from ``base`` (default: the
    recorded ``base_reference``; may also be a directory or an in-memory model), apply the delta.
    FileNotFoundError naming ``sam_delta.json`` when the base cannot be found.

``is_trainable_delta_dir(directory) -> bool``, ``read_state_dict(directory, *, dtype=None,
device=None) -> dict``, ``LoadReport`` (missing, unexpected, ignored, initialized, resized,
source), ``LAVIS_LN_VISION_EPS`` (1e-5).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sam_fast.config import check_config_dict, check_text_config, read_config_file

__all__ = [
    "NEW_MODULES",
    "TRAINABLE_MODULES",
    "IGNORED_LAVIS_KEYS",
    "DELTA_WEIGHTS_NAME",
    "DELTA_INFO_NAME",
    "LoadReport",
    "from_instructblip",
    "from_lavis_checkpoint",
    "lavis_to_sam_state_dict",
    "is_ignored_lavis_key",
    "save_trainable_delta",
    "load_trainable_delta",
    "is_trainable_delta_dir",
    "read_state_dict",
    "torch_load_weights_only",
    "LAVIS_LN_VISION_EPS",
]

# SAM's modules that training updates (everything else is the frozen InstructBLIP): what a
# checkpoint or a trainable delta holds. Defined here, imported by sam_fast.models.sam and the trainer.
TRAINABLE_MODULES = ("adaptive_adjustment", "guidance_in", "guidance_out", "language_projection")

# Modules SAM adds to InstructBLIP (absent from an HF InstructBLIP checkpoint).
NEW_MODULES = tuple(m for m in TRAINABLE_MODULES if m != "language_projection")

DELTA_WEIGHTS_NAME = "sam_delta.safetensors"
DELTA_INFO_NAME = "sam_delta.json"
DELTA_FORMAT = "sam_fast.trainable_delta"

# Keys of LAVIS / released-SAM checkpoints that are dropped on purpose (regex, full match), with
# the reason. Anything else that does not map is an *unknown* key and is an error.
IGNORED_LAVIS_KEYS: dict[str, str] = {
    r"Qformer\.cls\..*": "BERT masked-LM head of the Q-former; InstructBLIP sets it to None and "
    "HF InstructBLIP has no place for it",
    r"Qformer\.bert\.embeddings\.position_ids": "persistent arange buffer in LAVIS; a "
    "non-persistent buffer rebuilt from the config in HF",
    r"llm_model\.model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq": "RoPE frequency buffer "
    "(old transformers LLaMA); recomputed from the config",
    r"(vision_proj|text_proj|itm_head)\.(weight|bias)": "BLIP-2 stage-1 contrastive / matching "
    "heads, unused by InstructBLIP",
    r"temp": "BLIP-2 stage-1 contrastive temperature, unused by InstructBLIP",
}
_IGNORED_LAVIS_RE = [re.compile(p) for p in IGNORED_LAVIS_KEYS]

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


# ----------------------------------------------------------------------------------------------
# Reading HF checkpoint directories
# ----------------------------------------------------------------------------------------------
_SAFE_SINGLE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_BIN_SINGLE = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"


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


# ----------------------------------------------------------------------------------------------
# Sources: directories and in-memory models
# ----------------------------------------------------------------------------------------------
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
# LAVIS key map
# ----------------------------------------------------------------------------------------------
_V = r"visual_encoder\.blocks\.(\d+)\."
_Q = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
_ATTN_SUB = r"(?:attention|crossattention)"

# (LAVIS regex, our template). Full matches only; the first match wins.
_LAVIS_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"query_tokens", "query_tokens"),
        # EVA-CLIP ViT-g
        (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
        (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
        (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
        (_V + r"norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
        (_V + r"attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
        (_V + r"attn\.proj\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
        (_V + r"mlp\.fc([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.fc\2.\3"),
        (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
        # Q-former (BERT)
        (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.embeddings.layernorm.\1"),
        (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight", r"qformer.embeddings.\1.weight"),
        (
            _Q + r"(" + _ATTN_SUB + r")\.self\.(query|key|value)\.(weight|bias)",
            r"qformer.encoder.layer.\1.\2.attention.\3.\4",
        ),
        (
            _Q + r"(" + _ATTN_SUB + r")\.output\.(dense|LayerNorm)\.(weight|bias)",
            r"qformer.encoder.layer.\1.\2.output.\3.\4",
        ),
        (_Q + r"(intermediate|intermediate_query)\.dense\.(weight|bias)", r"qformer.encoder.layer.\1.\2.dense.\3"),
        (_Q + r"(output|output_query)\.(dense|LayerNorm)\.(weight|bias)", r"qformer.encoder.layer.\1.\2.\3.\4"),
        # SAM's additions (released code names; "muliple" sic)
        (r"Qformer\.bert\.encoder\.one_2_muliple\.0\.(weight|bias)", r"guidance_in.\1"),
        (r"Qformer\.bert\.encoder\.multiple_2_one\.0\.(weight|bias)", r"guidance_out.\1"),
        (r"attn\.(weight|bias)", r"adaptive_adjustment.\1"),
        # projection and LLM (LLaMA names are the same in LAVIS' copy and in HF)
        (r"llm_proj\.(weight|bias)", r"language_projection.\1"),
        (r"llm_model\.(.+)", r"language_model.\1"),
    ]
]
_QV_BIAS_RE = re.compile(_V + r"attn\.([qv])_bias")
_SAM_LAVIS_RE = re.compile(r"Qformer\.bert\.encoder\.(one_2_muliple|multiple_2_one)\.0\..*|attn\.(weight|bias)")


def is_ignored_lavis_key(key: str) -> bool:
    """True if ``key`` is a LAVIS key dropped on purpose (see ``IGNORED_LAVIS_KEYS``)."""
    return any(r.fullmatch(key) for r in _IGNORED_LAVIS_RE)


def lavis_to_sam_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map LAVIS InstructBLIP-Vicuna / released-SAM keys to SAM keys.

    Returns ``(new_sd, unmapped)``: ``unmapped`` is the sorted list of input keys that were not
    mapped (ignored ones included; classify them with ``is_ignored_lavis_key``). A leading
    ``module.`` (DDP wrapper) is stripped when every key has it. A ``q_bias`` without its
    ``v_bias`` (or vice versa) stays unmapped. Raises ValueError if two input keys map to the
    same output key.
    """
    keys = list(sd.keys())
    if keys and all(k.startswith("module.") for k in keys):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    new_sd: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    qv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}

    def put(new_key, value, old_key):
        if new_key in new_sd:
            raise ValueError(f"LAVIS keys {origin[new_key]!r} and {old_key!r} both map to {new_key!r}")
        new_sd[new_key] = value
        origin[new_key] = old_key

    for k, v in sd.items():
        if is_ignored_lavis_key(k):
            unmapped.append(k)
            continue
        m = _QV_BIAS_RE.fullmatch(k)
        if m:
            qv.setdefault(m.group(1), {})[m.group(2)] = (k, v)
            continue
        for pattern, template in _LAVIS_RULES:
            m = pattern.fullmatch(k)
            if m:
                put(m.expand(template), v, k)
                break
        else:
            unmapped.append(k)

    for layer, pair in qv.items():
        if set(pair) != {"q", "v"}:
            unmapped.extend(name for name, _ in pair.values())
            continue
        (qk, q), (vk, v) = pair["q"], pair["v"]
        if q.shape != v.shape or q.dim() != 1:
            raise ValueError(f"{qk!r} {tuple(q.shape)} and {vk!r} {tuple(v.shape)} are not matching vectors")
        put(f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias", torch.cat([q, torch.zeros_like(q), v]), qk)
    return new_sd, sorted(unmapped)


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


# ----------------------------------------------------------------------------------------------
# LAVIS checkpoints and the files LAVIS users hold
# ----------------------------------------------------------------------------------------------
# LAVIS' ln_vision: nn.LayerNorm(num_features), torch's default eps (HF's post_layernorm uses the
# vision config's layer_norm_eps, 1e-6, which the EVA blocks use in LAVIS too).
LAVIS_LN_VISION_EPS = 1e-5

# An EVA ViT state dict as LAVIS downloads it (eva_vit_g.pth): the keys of `visual_encoder` without
# the prefix. Its final norm / classification head and blocks past the configured depth are dropped,
# as LAVIS does (it loads that file with strict=False into 39 blocks and no head).
_EVA_KEY_RE = re.compile(r"cls_token|pos_embed|patch_embed\..+|blocks\.\d+\..+|(norm|fc_norm|head)\.(weight|bias)")
_EVA_HEAD_RE = re.compile(r"(norm|fc_norm|head)\.(weight|bias)")
_EVA_BLOCK_RE = re.compile(r"blocks\.(\d+)\..+")

# Fields of an LLM directory's config.json that must agree with config.text_config.
_LLM_CONFIG_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "hidden_act",
)

# (prefix, what it is and which LAVIS file has it): each must come from some source.
_COMPONENTS = (
    ("vision_model.encoder.", "the vision encoder (EVA ViT: LAVIS ships it as eva_vit_g.pth)"),
    ("query_tokens", "the query tokens (query_tokens in the LAVIS InstructBLIP .pth)"),
    ("qformer.", "the Q-former (Qformer.bert.* in the LAVIS InstructBLIP .pth)"),
    ("language_projection.", "the LLM projection (llm_proj.* in the LAVIS InstructBLIP or SAM .pth)"),
    ("language_model.", "the LLM (an HF LLaMA / Vicuna directory)"),
)


def _strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _is_eva_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for an unprefixed EVA ViT state dict (eva_vit_g.pth), False for LAVIS model keys."""
    keys = list(sd)
    return (
        bool(keys)
        and all(_EVA_KEY_RE.fullmatch(k) for k in keys)
        and any(k in ("cls_token", "pos_embed") or k.startswith(("patch_embed.", "blocks.")) for k in keys)
    )


@dataclass
class _Source:
    """One thing to take tensors from, read but not yet mapped to SAM keys."""

    desc: str
    kind: str  # "model" (HF InstructBLIP / SAM / delta dir, in-memory model), "lavis", "eva", "llm"
    tensors: dict[str, torch.Tensor]  # "model": SAM keys; "lavis"/"eva": the file's keys; "llm": LLM keys
    config: Any = None  # "model": its InstructBLIP / SAM config
    llm_config: dict | None = None  # "llm": its config.json


def _is_llm_dir(d: Path) -> bool:
    if not (d / "config.json").is_file():
        return False
    raw = _read_config_json(d)
    return raw.get("model_type") not in (None, "instructblip", "sam_fast") and "vision_config" not in raw


def _read_source(cls, source, *, dtype=None, device=None) -> _Source:
    """Read a LAVIS / EVA checkpoint file, an HF LLM directory, or anything `from_instructblip` takes."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        raw = _strip_module_prefix(_torch_load_state_dict(source))
        return _Source(str(source), "eva" if _is_eva_state_dict(raw) else "lavis", raw)
    if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
        raise FileNotFoundError(f"{str(source)!r} does not exist (expected a .pth file or a model directory)")
    if isinstance(source, (str, os.PathLike)) and not is_trainable_delta_dir(source) and _is_llm_dir(Path(source)):
        llm_config = _read_config_json(source)
        check_text_config(llm_config, str(Path(source) / "config.json"), prefix="")
        return _Source(str(source), "llm", read_state_dict(source, dtype=dtype, device=device), llm_config=llm_config)
    config, sd, desc = _source_config_and_state_dict(cls, source, dtype=dtype, device=device)
    return _Source(desc, "model", dict(sd), config=config)


def _map_source(src: _Source, config, report: LoadReport) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(SAM-keyed tensors, unknown keys) of one source; dropped keys go to ``report.ignored``."""
    if src.kind == "model":
        return src.tensors, []
    if src.kind == "llm":
        return {f"language_model.{k}": v for k, v in src.tensors.items()}, []
    raw = src.tensors
    if src.kind == "eva":
        depth = config.vision_config.num_hidden_layers
        kept = {}
        for k, v in raw.items():
            m = _EVA_BLOCK_RE.fullmatch(k)
            if _EVA_HEAD_RE.fullmatch(k) or (m and int(m.group(1)) >= depth):
                report.ignored.append(k)
            else:
                kept[k] = v
        raw = {f"visual_encoder.{k}": v for k, v in kept.items()}
    mapped, unmapped = lavis_to_sam_state_dict(raw)
    report.ignored.extend(k for k in unmapped if is_ignored_lavis_key(k))
    unknown = [k for k in unmapped if not is_ignored_lavis_key(k)]
    if src.kind == "eva":  # name keys as the file does
        unknown = [k[len("visual_encoder.") :] if k.startswith("visual_encoder.") else k for k in unknown]
    return mapped, unknown


def _check_llm_config(src: _Source, config) -> None:
    text = config.text_config
    diffs = []
    for name in _LLM_CONFIG_FIELDS:
        theirs = src.llm_config.get(name)
        if name == "num_key_value_heads" and theirs is None:
            theirs = src.llm_config.get("num_attention_heads")
        ours = getattr(text, name, None)
        if theirs is not None and ours is not None and theirs != ours:
            diffs.append(f"{name}={theirs!r} (config: {ours!r})")
    vocab = src.llm_config.get("vocab_size")
    if vocab is not None and vocab > text.vocab_size:
        diffs.append(f"vocab_size={vocab} (config: {text.vocab_size}, smaller)")
    if diffs:
        raise ValueError(f"{src.desc}: this LLM does not match config.text_config: {', '.join(diffs)}")


def _grow_vocabulary(sd: dict[str, torch.Tensor], src: _Source, config, report: LoadReport) -> None:
    """Append rows to an LLM directory's embedding / LM head up to ``text_config.vocab_size``.

    LAVIS adds ``[PAD]`` to Vicuna's 32000 tokens and resizes both (new rows random there); here
    every new row is the mean of the existing rows, which is deterministic.
    """
    vocab = config.text_config.vocab_size
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        t = sd.get(key)
        if t is None or t.dim() != 2 or t.shape[0] >= vocab:
            continue
        n = t.shape[0]
        mean = t.float().mean(0, keepdim=True).to(t.dtype)
        sd[key] = torch.cat([t, mean.expand(vocab - n, -1)])
        report.resized.append(f"{key} (from {src.desc}): {n} -> {vocab} rows, the new rows the mean of the others")


def _as_source_list(base) -> list:
    if base is None:
        return []
    if isinstance(base, (list, tuple)):
        if not base:
            raise ValueError("base=[] names no source; pass None or at least one file, directory or model")
        return list(base)
    return [base]


def _released_mode(path, main, config, context_mode: str | None) -> str | None:
    """The context mode to build with: ``"shared"`` for the authors' SAM checkpoint (trained so;
    another requested mode is warned about and replaced), else the requested one."""
    if not (main.kind == "lavis" and any(_SAM_LAVIS_RE.fullmatch(k) for k in main.tensors)):
        return context_mode
    asked = context_mode if context_mode is not None else getattr(config, "context_mode", None)
    if asked is not None and asked != "shared":
        warnings.warn(
            f"{path} is the authors' SAM checkpoint, trained with context_mode='shared'; "
            f"using 'shared' instead of the requested {asked!r}",
            stacklevel=3,  # the caller of from_lavis_checkpoint, as before the split
        )
    return "shared"


def _lavis_config(cls, path, config, sources, context_mode: str | None):
    """The SAMConfig of a LAVIS build: `config`, else the first source's; LAVIS' ln_vision eps
    unless the config sets one, and `context_mode` when given."""
    overrides: dict[str, Any] = {} if context_mode is None else {"context_mode": context_mode}
    if getattr(config, "post_layernorm_eps", None) is None:
        overrides["post_layernorm_eps"] = LAVIS_LN_VISION_EPS  # LAVIS' ln_vision
    if config is None:
        config = next((s.config for s in sources if s.config is not None), None)
    if config is None:
        raise ValueError(
            f"from_lavis_checkpoint({path}): pass config= (e.g. SAMConfig.instructblip_vicuna7b() for LAVIS' "
            f"InstructBLIP-Vicuna-7B files), or a base= holding one (an HF InstructBLIP or SAM directory); "
            f"LAVIS checkpoints carry no configuration"
        )
    return _to_sam_config(cls, config, overrides)


def _merged_state(sources, config, report: "LoadReport", strict: bool) -> tuple[dict, dict]:
    """(state_dict, origin): every source's tensors mapped to SAM keys, later sources winning (the
    checkpoint itself last), and the source each key came from. Unknown keys raise (`strict`) or
    are warned about; an LLM directory's config is checked and its vocabulary grown to SAM's."""
    state_dict: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for src in sources:
        mapped, unknown = _map_source(src, config, report)
        if unknown:
            msg = f"unknown keys in {src.desc} (no mapping to SAM): {_format_keys(unknown)}"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg + " -- ignored because strict=False", stacklevel=3)  # from_lavis_checkpoint's caller
            report.unexpected.extend(unknown)
        if src.kind == "llm":
            _check_llm_config(src, config)
            _grow_vocabulary(mapped, src, config, report)
        state_dict.update(mapped)
        origin.update(dict.fromkeys(mapped, src.desc))
    return state_dict, origin


def from_lavis_checkpoint(
    cls,
    path,
    config=None,
    *,
    base=None,
    strict: bool = True,
    context_mode: str | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    copy: bool = False,
    return_report: bool = False,
):
    """Build ``cls`` (SAM) from a LAVIS InstructBLIP / released-SAM ``.pth`` over ``base``.

    ``base``: one source or a list (LAVIS ``.pth``, unprefixed EVA ViT ``.pth``, HF LLM directory,
    HF InstructBLIP / SAM / delta directory, in-memory model); later ones win, ``path`` wins over
    all. For LAVIS' InstructBLIP-Vicuna files::

        SAM.from_lavis_checkpoint(
            "sam_checkpoint.pth", SAMConfig.instructblip_vicuna7b(context_mode="shared"),
            base=["instruct_blip_vicuna7b_trimmed.pth", "eva_vit_g.pth", "vicuna-7b-v1.1/"],
            dtype=torch.float16,
        )

    See the module docstring for the rules (configuration, ``post_layernorm_eps``, vocabulary
    growth, dtypes, errors).
    """
    dtype = _dtype_plan(cls, dtype)
    report = LoadReport()
    main = _read_source(cls, path)
    if main.kind not in ("lavis", "eva"):
        raise ValueError(
            f"{path}: from_lavis_checkpoint takes a LAVIS .pth file (directories go in base=, or to from_instructblip)"
        )
    bases = [_read_source(cls, b, dtype=dtype, device=device) for b in _as_source_list(base)]
    sources = [*bases, main]
    context_mode = _released_mode(path, main, config, context_mode)
    config = _lavis_config(cls, path, config, sources, context_mode)
    state_dict, origin = _merged_state(sources, config, report, strict)
    descs = [s.desc for s in sources]
    report.source = f"{path} over base {' + '.join(descs[:-1])}" if bases else str(path)
    absent = [what for prefix, what in _COMPONENTS if not any(k.startswith(prefix) for k in state_dict)]
    if absent:
        raise ValueError(f"no source supplies {'; '.join(absent)} (read: {', '.join(descs)}); add it to base=")
    if dtype is None:  # one dtype for the model: mixed files (fp16 EVA, fp32 Q-former) go to float32
        keep = _dtype_plan(cls, torch.float16)
        kinds = {
            t.dtype for k, t in state_dict.items() if t.is_floating_point() and _target_dtype(keep, k) != torch.float32
        }
        if len(kinds) > 1:
            dtype = _dtype_plan(cls, torch.get_default_dtype())

    model, report = _build_model(
        cls,
        config,
        state_dict,
        dtype=dtype,
        device=device,
        copy=copy,
        strict=strict,
        report=report,
        source=report.source,
        origin=origin if bases else None,
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
