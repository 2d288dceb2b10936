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
    new modules (``adaptive_adjustment``, ``guidance_in``, ``guidance_out``) are initialised per
    the spec (``model.reset_guidance_parameters()``: guidance zero) when the source lacks them.
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
    Rename a LAVIS ``blip2_vicuna_instruct`` or released-SAM state dict to our keys. Tensors are
    not copied, except the EVA-ViT ``q_bias``/``v_bias`` pairs which become
    ``qkv.bias = cat[q_bias, zeros, v_bias]``. ``unmapped`` lists every input key that was not
    mapped, sorted; ``is_ignored_lavis_key(k)`` tells which of them are dropped on purpose
    (see ``IGNORED_LAVIS_KEYS``).

``from_lavis_checkpoint(cls, path, config=None, *, base=None, strict=True, context_mode=None,
dtype=None, device=None, copy=False, return_report=False) -> SAM``
    Load a LAVIS ``.pth`` (``torch.load(weights_only=True)``, ``["model"]`` unwrapped). If it holds
    SAM keys (``one_2_muliple``, ``multiple_2_one``, ``attn``) it is the authors' checkpoint, which
    was trained with ``context_mode="shared"``: that mode is set, with a warning when the caller
    asked for another one (``context_mode=`` or ``config.context_mode``). ``base`` (an HF
    InstructBLIP / SAM / delta directory, or an in-memory InstructBLIP or SAM model) supplies every
    tensor the checkpoint lacks (released checkpoints hold only the trained tensors) and, when
    ``config`` is None, the configuration. Without ``base`` the checkpoint must be complete and
    ``config`` is required. Unknown keys raise ValueError naming them (``strict=False``: warn);
    ignored keys are reported in ``LoadReport.ignored``.

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
device=None) -> dict``, ``LoadReport`` (missing, unexpected, ignored, initialized, source).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
]

from sam_fast.models.sam import TRAINABLE_MODULES  # noqa: E402  (what a delta holds; spec section 1)

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
    initialized: keys of the new modules initialised per the spec instead of loaded.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)
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
    tensor. Raises FileNotFoundError naming the directory and the file names looked for.
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
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
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
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found (not an HF model directory)")
    with open(path) as fh:
        return json.load(fh)


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
):
    """Construct ``cls(config)`` with meta parameters and assign ``state_dict`` into it.

    New modules absent from ``state_dict`` are materialised and initialised per the spec. Raises
    ValueError on shape mismatches, on missing keys (other than the new modules) and, when
    ``strict``, on unexpected keys.
    """
    report = report if report is not None else LoadReport(source=source)
    report.source = report.source or source
    with _parameters_on_meta():
        model = cls(config)
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
            mismatched.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(expected[k].shape)}")
            continue
        to_load[k] = _prepare(t, _target_dtype(dtype, k), device, copy)
    where = f" in {source}" if source else ""
    if mismatched:
        raise ValueError(f"shape mismatch{where}: " + "; ".join(mismatched))
    if report.unexpected:
        msg = f"unexpected keys{where} (no place in {cls.__name__}): {_format_keys(report.unexpected)}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + " -- ignored because strict=False", stacklevel=3)

    # The new modules: initialise per spec where the source lacks them; loaded values (assigned
    # below) replace the initial ones where it has them.
    new_keys = [k for k in expected if _is_new_module_key(k)]
    missing_new = [k for k in new_keys if k not in to_load]
    if missing_new:
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

    See the module docstring. The three new modules are initialised per the spec when absent
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


def _load_lavis_file(path) -> dict[str, torch.Tensor]:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (nor a dict with a 'model' state dict)")
    return dict(obj)


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
    """Build ``cls`` (SAM) from a LAVIS InstructBLIP or released-SAM ``.pth``; see module docstring."""
    dtype = _dtype_plan(cls, dtype)
    lavis_sd = _load_lavis_file(path)
    is_sam_ckpt = any(_SAM_LAVIS_RE.fullmatch(k) for k in lavis_sd)
    mapped, unmapped = lavis_to_sam_state_dict(lavis_sd)
    report = LoadReport(source=str(path))
    report.ignored = [k for k in unmapped if is_ignored_lavis_key(k)]
    unknown = [k for k in unmapped if not is_ignored_lavis_key(k)]
    if unknown:
        msg = f"unknown keys in {path} (no mapping to SAM): {_format_keys(unknown)}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + " -- ignored because strict=False", stacklevel=2)
        report.unexpected.extend(unknown)

    if is_sam_ckpt:
        asked = context_mode if context_mode is not None else getattr(config, "context_mode", None)
        if asked is not None and asked != "shared":
            warnings.warn(
                f"{path} is the authors' SAM checkpoint, trained with context_mode='shared'; "
                f"using 'shared' instead of the requested {asked!r}",
                stacklevel=2,
            )
        context_mode = "shared"

    overrides = {} if context_mode is None else {"context_mode": context_mode}
    state_dict: dict[str, torch.Tensor] = {}
    if base is not None:
        base_config, base_sd, base_desc = _source_config_and_state_dict(cls, base, dtype=dtype, device=device)
        state_dict.update(base_sd)
        report.source = f"{path} over base {base_desc}"
        if config is None:
            config = base_config
    elif config is None:
        raise ValueError(
            f"from_lavis_checkpoint({path}): pass config= or base= (a LAVIS checkpoint carries no configuration)"
        )
    config = _to_sam_config(cls, config, overrides)
    state_dict.update(mapped)  # the checkpoint wins over the base
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
