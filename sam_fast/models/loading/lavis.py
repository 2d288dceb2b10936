"""LAVIS ``blip2_vicuna_instruct`` checkpoints and the files LAVIS users hold: the key map
(`lavis_to_sam_state_dict`, the table in docs/model.md#checkpoint-key-maps), LAVIS ``.pth`` files,
LAVIS' unprefixed EVA ViT file, HF LLM directories, merged over any base in `from_lavis_checkpoint`.
The released SAM checkpoint's own keys and context mode come from `released`."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sam_fast.config import check_text_config
from sam_fast.models.loading.common import (
    LoadReport,
    _build_model,
    _dtype_plan,
    _format_keys,
    _target_dtype,
    _to_sam_config,
)
from sam_fast.models.loading.files import _read_config_json, _torch_load_state_dict, read_state_dict
from sam_fast.models.loading.hf import _source_config_and_state_dict, is_trainable_delta_dir
from sam_fast.models.loading.released import SAM_RULES, _released_mode

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

# ----------------------------------------------------------------------------------------------
# The key map
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
        *SAM_RULES,
        # projection and LLM (LLaMA names are the same in LAVIS' copy and in HF)
        (r"llm_proj\.(weight|bias)", r"language_projection.\1"),
        (r"llm_model\.(.+)", r"language_model.\1"),
    ]
]
_QV_BIAS_RE = re.compile(_V + r"attn\.([qv])_bias")


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


def _one_dtype(cls, state_dict):
    """The dtype plan when none is asked: the files' own dtype, or the default dtype (float32) when
    the tensors that keep a half dtype mix several (fp16 EVA, fp32 Q-former): one dtype per model."""
    keep = _dtype_plan(cls, torch.float16)
    kinds = {t.dtype for k, t in state_dict.items()
             if t.is_floating_point() and _target_dtype(keep, k) != torch.float32}
    return _dtype_plan(cls, torch.get_default_dtype()) if len(kinds) > 1 else None


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
    if dtype is None:
        dtype = _one_dtype(cls, state_dict)
    model, report = _build_model(cls, config, state_dict, dtype=dtype, device=device, copy=copy, strict=strict,
                                 report=report, source=report.source, origin=origin if bases else None)
    return (model, report) if return_report else model
