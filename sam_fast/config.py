"""Configuration of SAM: InstructBLIP's three sub-configs plus the guidance settings.

`SAMConfig` subclasses `transformers.InstructBlipConfig`, so an InstructBLIP `config.json`
converts by adding three fields:

- ``context_mode``: ``"leave_one_out"`` (paper, default: image i is guided by a merged map of the
  *other* images of its sample) or ``"shared"`` (released code: one merged map over *all* images of
  the sample, shared by all of them; needed for the authors' released checkpoint).
- ``guidance``: ``"adaptive"`` (paper Table 3 row 7: Adaptive Adjustment softmax re-weighting),
  ``"mean"`` (row 3: uniform weights) or ``"none"`` (rows 1/2: plain InstructBLIP, no W-stream).
- ``interaction_layers``: ``(l, k)``, 1-based, ``1 <= l <= k <= num Q-former layers``. The
  W-stream input to layer l receives ``guidance_in(h_i)``; the W-stream output of layer k gives
  ``c_i = guidance_out(w)``, added to the Q-stream input of layer k. Default: the last layer for
  both (paper: l = k = 12).

What the modes and layers mean: docs/model.md#context-modes, docs/model.md#guidance-modes and
docs/model.md#w-former-and-the-interaction-layers.

Sizes and types are checked before anything is built (`check_config_dict`, `ConfigError`): a
``config.json`` with a million layers, a hidden size of 1e9, zero heads or ``torch_dtype: "float7"``
is one line naming the file, the dotted key and the value, not minutes of building layers or a
traceback from torch. The bounds are far beyond any released model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from functools import lru_cache

from transformers import (
    InstructBlipConfig,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
)

from sam_fast._text import bounded_repr

CONTEXT_MODES = ("leave_one_out", "shared")
GUIDANCE_MODES = ("adaptive", "mean", "none")

MAX_WIDTH = 65536  # hidden sizes (ViT-g: 1408, Vicuna-13B: 5120, the largest open LLMs: 16384)
MAX_LAYERS = 1024  # layers of one stack (Vicuna-7B: 32, ViT-g: 39)
MAX_VOCAB = 10_000_000  # vocabulary sizes and token ids (LLaMA: 32000)
MAX_IMAGE_SIZE = 4096  # the vision tower's input size in pixels (InstructBLIP: 224)
MAX_QUERY_TOKENS = 1024  # visual tokens per image (InstructBLIP: 32)
MAX_POSITIONS = 1 << 24  # LLM positions (rotary: no table is built); the Q-former's table is capped at 65536

# (low, high) of each integer field, per sub-config ("" is the top level). A field absent from a file
# takes the class default; a present one must be an integer in range (null only where _NULLABLE says).
_BOUNDS = {
    "": {"num_query_tokens": (1, MAX_QUERY_TOKENS), "image_token_index": (0, MAX_VOCAB)},
    "vision_config": {"hidden_size": (1, MAX_WIDTH), "intermediate_size": (1, 4 * MAX_WIDTH),
                      "num_hidden_layers": (1, MAX_LAYERS), "num_attention_heads": (1, MAX_WIDTH),
                      "image_size": (1, MAX_IMAGE_SIZE), "patch_size": (1, MAX_IMAGE_SIZE)},
    "qformer_config": {"vocab_size": (1, MAX_VOCAB), "hidden_size": (1, MAX_WIDTH),
                       "intermediate_size": (1, 4 * MAX_WIDTH), "num_hidden_layers": (1, MAX_LAYERS),
                       "num_attention_heads": (1, MAX_WIDTH), "cross_attention_frequency": (1, MAX_LAYERS),
                       "encoder_hidden_size": (1, MAX_WIDTH), "max_position_embeddings": (1, 65536)},
    "text_config": {"vocab_size": (1, MAX_VOCAB), "hidden_size": (1, MAX_WIDTH),
                    "intermediate_size": (1, 4 * MAX_WIDTH), "num_hidden_layers": (1, MAX_LAYERS),
                    "num_attention_heads": (1, MAX_WIDTH), "num_key_value_heads": (1, MAX_WIDTH),
                    "head_dim": (1, MAX_WIDTH), "max_position_embeddings": (1, MAX_POSITIONS)},
}
_NULLABLE = {"image_token_index", "num_key_value_heads", "head_dim"}  # None: derived by the config class
_EPS = {"vision_config": "layer_norm_eps", "qformer_config": "layer_norm_eps", "text_config": "rms_norm_eps"}
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64", "half", "float", "double")


class ConfigError(ValueError):
    """A model or processor configuration value of the wrong type, or beyond what any real model has."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@lru_cache(maxsize=None)
def _defaults(config_cls) -> dict:
    """The class defaults of a (dataclass) transformers config: what a field absent from a file becomes."""
    if not dataclasses.is_dataclass(config_cls):
        return {}
    return {f.name: f.default for f in dataclasses.fields(config_cls) if f.default is not dataclasses.MISSING}


def _section_class(section: str, sub: dict):
    """The transformers config class a sub-config dict is built with (InstructBlipConfig's choices)."""
    if section == "":
        return InstructBlipConfig
    if section == "vision_config":
        return InstructBlipVisionConfig
    if section == "qformer_config":
        return InstructBlipQFormerConfig
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[sub.get("model_type", "opt")]  # InstructBlipConfig's default text model


def _known_dtype(v) -> bool:
    import torch

    return v is None or (isinstance(v, torch.dtype) and v.is_floating_point) or (
        isinstance(v, str) and v in _FLOAT_DTYPES)


def _check_dtype(sub: dict, prefix: str, where: str) -> None:
    """transformers turns a dtype name into ``getattr(torch, name)``: "float7" would be an AttributeError."""
    for key in ("torch_dtype", "dtype"):
        v = sub.get(key)
        # transformers also writes a per-sub-config mapping of names
        ok = all(_known_dtype(x) for x in v.values()) if isinstance(v, dict) else _known_dtype(v)
        if not ok:
            raise ConfigError(f"{where}: {prefix}{key} = {bounded_repr(v)}: expected null or one of {_FLOAT_DTYPES}")


def _check_section(sub, section: str, where: str, prefix: str | None = None) -> dict:
    """The effective integer fields of one sub-config (file value, else class default), checked against
    `_BOUNDS`; `ConfigError` naming ``prefix + key`` otherwise."""
    prefix = f"{section}." if prefix is None else prefix
    if hasattr(sub, "to_dict"):
        sub = sub.to_dict()
    if not isinstance(sub, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.')} = {bounded_repr(sub)}: expected an object")
    _check_dtype(sub, prefix, where)
    if section == "text_config" and "model_type" in sub:
        from transformers import CONFIG_MAPPING

        if not isinstance(sub["model_type"], str) or sub["model_type"] not in CONFIG_MAPPING:
            raise ConfigError(f"{where}: {prefix}model_type = {bounded_repr(sub['model_type'])}: not a model type "
                              f"transformers knows (SAM's LLM is 'llama')")
    defaults = _defaults(_section_class(section, sub))
    values = {}
    for key, (low, high) in _BOUNDS[section].items():
        v = sub[key] if key in sub else defaults.get(key)
        if v is None and (key not in sub or key in _NULLABLE):
            continue
        if not _is_int(v) or not low <= v <= high:
            raise ConfigError(f"{where}: {prefix}{key} = {bounded_repr(v)}: expected an integer in [{low}, {high}]")
        values[key] = v
    eps = _EPS.get(section)
    if eps in sub:
        v = sub[eps]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1 and math.isfinite(v)):
            raise ConfigError(f"{where}: {prefix}{eps} = {bounded_repr(v)}: expected a number between 0 and 1")
    return values


def _divides(where: str, what: str, small: str, big: str, values: dict, prefix: str) -> None:
    if small in values and big in values and values[big] % values[small]:
        raise ConfigError(f"{where}: {prefix}{small} = {values[small]} does not divide {prefix}{big} = "
                          f"{values[big]} ({what})")


def check_text_config(sub, where: str, prefix: str = "text_config.") -> dict:
    """Check an LLM config (``text_config``, or an LLM folder's config.json with ``prefix=""``); the
    effective sizes. `ConfigError` naming `where` and the key otherwise."""
    v = _check_section(sub, "text_config", where, prefix)
    if v.get("head_dim") is None:
        _divides(where, "the attention heads split the hidden size", "num_attention_heads", "hidden_size", v, prefix)
    _divides(where, "the key/value heads are shared by groups of heads", "num_key_value_heads", "num_attention_heads",
             v, prefix)
    return v


def check_config_dict(raw, where: str) -> dict:
    """Raise `ConfigError` (one line: `where`, the dotted key, the value in at most ~80 characters) unless the
    InstructBLIP / SAM config `raw` (a config.json's object, or `SAMConfig`'s keyword arguments) has sizes and
    types a model can be built from: integers within the generous bounds of `_BOUNDS`, heads dividing hidden
    sizes, the image size a multiple of the patch size, a known dtype. Checked before anything is built.
    Returns the effective integer fields per sub-config (``""``: the top level), class defaults filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: holds a JSON {type(raw).__name__}, not an object")
    sections = {"": _check_section(raw, "", where, prefix="")}
    for section in ("vision_config", "qformer_config"):
        sub = raw.get(section)
        sections[section] = _check_section({} if sub is None else sub, section, where)
    text = raw.get("text_config")
    sections["text_config"] = check_text_config({} if text is None else text, where)
    for section in ("vision_config", "qformer_config"):
        _divides(where, "the attention heads split the hidden size", "num_attention_heads", "hidden_size",
                 sections[section], f"{section}.")
    _divides(where, "the image is cut into whole patches", "patch_size", "image_size", sections["vision_config"],
             "vision_config.")
    return sections


def read_config_file(path) -> dict:
    """The JSON object in the config file `path`, read only when it is a regular file (a FIFO would block);
    `ConfigError` naming the file for a cut, non-JSON, too deeply nested or non-object file."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read()
        value = json.loads(data)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError (a cut file), ConfigError passes through below
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


RECOMPUTE_SETTINGS = (True, False, "auto")
RECOMPUTE_DEVICE_FRACTION = 1 / 16  # "auto" on CUDA: recompute above this share of the device's memory
RECOMPUTE_CPU_BYTES = 8 << 30  # "auto" on a CPU: recompute only above this many bytes


def _recompute_setting(value):
    """True / False (also 0 / 1 and their strings, as older files and CLIs spell them) or "auto"."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "auto":
            return "auto"
        if low in ("true", "1", "false", "0"):
            return low in ("true", "1")
    elif isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"recompute_qformer = {bounded_repr(value)}: expected true, false or \"auto\"")


def _budget_setting(value):
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise ConfigError(f"recompute_budget_bytes = {bounded_repr(value)}: expected null or an integer >= 0")
    return value


def qformer_activation_bytes(config, images: int, instruction_tokens: int, dtype_bytes: int) -> int:
    """Bytes of the activations autograd keeps for the frozen Q/W-former's backward in one training
    step that does not recompute it (an estimate from the config; the test compares it with the
    saved tensors of a real step): `images` Q-stream rows and as many W-stream rows of
    ``num_query_tokens + instruction_tokens`` tokens, in every layer where a gradient passes
    (the W-stream from layer 1 with adaptive guidance, whose softmax weights reach every
    cross-attention layer's K/V, else from layer l; both streams run as one batch before layer k;
    after k the Q-stream alone). Per token and layer: the layer input, q, k, v, the attention
    output and its projection's input, two LayerNorm inputs (9 x hidden) and the FFN's two
    intermediate tensors (2 x intermediate); cross-attention layers add 4 x hidden per query."""
    if config.guidance == "none" or images <= 0:
        return 0  # only language_projection trains: no gradient passes through the Q-former
    qc = config.qformer_config
    H, F, Q, n_layers = qc.hidden_size, qc.intermediate_size, config.num_query_tokens, qc.num_hidden_layers
    freq = getattr(qc, "cross_attention_frequency", 2) or 2
    l, k = config.interaction_layers
    first = 1 if config.guidance == "adaptive" else l
    tokens = Q + max(int(instruction_tokens), 0)
    total = 0
    for n in range(first, n_layers + 1):  # 1-based
        rows = 2 * images if n <= k else images
        per_row = tokens * (9 * H + 2 * F) + (4 * Q * H if (n - 1) % freq == 0 else 0)
        total += rows * per_row
    return int(total * dtype_bytes)


def recompute_budget(config=None, device=None, *, total_memory: int | None = None) -> tuple[int, str]:
    """(bytes, where from) above which ``recompute_qformer="auto"`` recomputes: the config's
    ``recompute_budget_bytes``, else `RECOMPUTE_DEVICE_FRACTION` of the CUDA device's memory
    (`total_memory`, else torch's figure for `device`), else `RECOMPUTE_CPU_BYTES`."""
    explicit = getattr(config, "recompute_budget_bytes", None)
    if explicit is not None:
        return int(explicit), "recompute_budget_bytes"
    dev_type = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
    if dev_type == "cuda" or total_memory is not None:
        if total_memory is None:
            import torch

            total_memory = torch.cuda.get_device_properties(device).total_memory
        return int(total_memory * RECOMPUTE_DEVICE_FRACTION), \
            f"1/{round(1 / RECOMPUTE_DEVICE_FRACTION)} of the device's {total_memory / 2**30:.0f} GiB"
    return RECOMPUTE_CPU_BYTES, f"the {dev_type.upper()} budget"


def choose_recompute_qformer(config, images: int, instruction_tokens: int, dtype_bytes: int, device=None, *,
                             total_memory: int | None = None) -> tuple[bool, str]:
    """(recompute?, why in one line) for a training step of `images` images with Q-former
    instructions of `instruction_tokens` tokens in a `dtype_bytes` dtype on `device`:
    ``config.recompute_qformer`` when True / False, else (``"auto"``) whether
    `qformer_activation_bytes` exceed `recompute_budget`."""
    setting = getattr(config, "recompute_qformer", "auto")
    if setting != "auto":
        return bool(setting), f"recompute_qformer={setting} in the config"
    need = qformer_activation_bytes(config, images, instruction_tokens, dtype_bytes)
    budget, source = recompute_budget(config, device, total_memory=total_memory)
    verdict = "recomputed in the backward" if need > budget else "kept"
    return need > budget, (f"auto: the Q/W-former would keep {need / 2**30:.2f} GiB of activations ({images} images, "
                           f"{config.num_query_tokens} + {instruction_tokens} tokens, {dtype_bytes}-byte dtype), "
                           f"{'over' if need > budget else 'within'} the budget of {budget / 2**30:.2f} GiB "
                           f"({source}): {verdict}")


class SAMConfig(InstructBlipConfig):
    """InstructBLIP configuration plus SAM's bidirectional-semantic-guidance settings.

    Args:
        context_mode: "leave_one_out" | "shared" (see module docstring).
        guidance: "adaptive" | "mean" | "none".
        interaction_layers: (l, k), 1-based; None means (L, L) with L the Q-former depth.
        post_layernorm_eps: eps of the LayerNorm after the vision encoder
            (``vision_model.post_layernorm``); None (default) uses ``vision_config.layer_norm_eps``
            as HF InstructBLIP does (1e-6). LAVIS' ``ln_vision`` uses 1e-5, which
            ``SAM.from_lavis_checkpoint`` records here.
        packed_loss: with labels, `SAM.forward` runs the LLM on the batch's real tokens only,
            packed into one sequence with per-sample causal attention, and computes the loss from
            the hidden states at supervised positions without materialising logits (default True;
            ``forward(..., packing=False)`` or ``sam-fast train --no-packing`` keeps the padded
            HF call, which also returns logits).
        recompute_qformer: in training, whether `SAM.encode_images` runs the frozen Q/W-former's
            two streams again in the backward instead of keeping their activations through the
            LLM step. True / False force it; ``"auto"`` (default) decides once, at the model's
            first training forward, from that batch's shapes (no host read):
            `qformer_activation_bytes` (rows x Q-former tokens x layers x the tensors autograd
            keeps x dtype bytes) against a budget: ``recompute_budget_bytes`` when set, else 1/16
            of the CUDA device's memory, else 8 GiB on a CPU; recomputed only above it
            (`choose_recompute_qformer`; ``SAM.recompute_qformer_choice`` says which and why).
            Why not always: the streams are a few % of a 7B step's FLOPs but their recomputation
            costs more time than that where they weigh more than a small LLM (the ``mid`` bench
            config ran 1.40x -> 1.10x the released step with it), and the memory it saves (~3 GB
            at the 7B proportions, B = 8) matters only where memory is short.
        recompute_budget_bytes: the ``"auto"`` budget in bytes (None: from the device, as above).
        **kwargs: everything `InstructBlipConfig` takes (vision_config, qformer_config,
            text_config, num_query_tokens, image_token_index, ...).

    Raises:
        ValueError: naming the offending value for an unknown mode or out-of-range layers.
    """

    model_type = "sam_fast"

    def __init__(
        self, context_mode="leave_one_out", guidance="adaptive", interaction_layers=None, post_layernorm_eps=None,
        packed_loss=True, recompute_qformer="auto", recompute_budget_bytes=None, **kwargs,
    ):
        check_config_dict(kwargs, type(self).__name__)  # before InstructBlipConfig builds anything from them
        self.packed_loss = bool(packed_loss)
        self.recompute_qformer = _recompute_setting(recompute_qformer)
        self.recompute_budget_bytes = _budget_setting(recompute_budget_bytes)
        if post_layernorm_eps is not None and not float(post_layernorm_eps) > 0:
            raise ValueError(f"post_layernorm_eps={post_layernorm_eps!r} must be a positive number or None")
        self.post_layernorm_eps = None if post_layernorm_eps is None else float(post_layernorm_eps)
        self.context_mode = context_mode
        self.guidance = guidance
        self.interaction_layers = interaction_layers
        super().__init__(**kwargs)
        n_layers = self.qformer_config.num_hidden_layers
        if self.interaction_layers is None:
            self.interaction_layers = (n_layers, n_layers)
        self.interaction_layers = tuple(int(v) for v in self.interaction_layers)
        self.validate_sam()

    # -- validation -------------------------------------------------------------------------
    def validate_sam(self) -> None:
        """Check the SAM-specific fields; raises ValueError naming the bad value."""
        if self.context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode={self.context_mode!r} is not one of {CONTEXT_MODES}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance={self.guidance!r} is not one of {GUIDANCE_MODES}")
        il = self.interaction_layers
        n_layers = self.qformer_config.num_hidden_layers
        if len(il) != 2:
            raise ValueError(f"interaction_layers={il!r} must be a pair (l, k)")
        l, k = il
        if not (1 <= l <= k <= n_layers):
            raise ValueError(
                f"interaction_layers=(l={l}, k={k}) must satisfy 1 <= l <= k <= {n_layers} "
                f"(the number of Q-former layers)"
            )
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens={self.num_query_tokens} must be >= 1")
        if self.image_token_index is None:
            raise ValueError("image_token_index is None: SAM needs a placeholder token id for visual tokens")
        if self.image_token_index < 0:
            raise ValueError(f"image_token_index={self.image_token_index} must be >= 0")
        tc = self.text_config
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tc, name, None) is not None and getattr(tc, name) == self.image_token_index:
                raise ValueError(
                    f"image_token_index={self.image_token_index} equals text_config.{name}: such positions would "
                    f"be taken for image placeholders; use an id no real token has (e.g. the vocabulary size, "
                    f"{tc.vocab_size})"
                )
        if self.qformer_config.encoder_hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                f"qformer_config.encoder_hidden_size={self.qformer_config.encoder_hidden_size} != "
                f"vision_config.hidden_size={self.vision_config.hidden_size}"
            )

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reading of config.json, after checking a local one with `check_config_dict`, so that
        `from_pretrained` (of the config, of `SAM`, of a trainable delta) names the file in its one-line error."""
        path = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "", "config.json")
        if os.path.isdir(os.fspath(pretrained_model_name_or_path)) and os.path.lexists(path):
            check_config_dict(read_config_file(path), path)
        return super().get_config_dict(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_instructblip_config(cls, config: InstructBlipConfig, **overrides) -> "SAMConfig":
        """Convert an `InstructBlipConfig` (object or dict) into a SAMConfig; `overrides` win."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
            d.pop(key, None)
        d.update(overrides)
        if d.get("image_token_index") is None and "image_token_id" in d:
            d["image_token_index"] = d.pop("image_token_id")
        if d.get("image_token_index") is None:  # older InstructBLIP configs: no placeholder id
            text = d.get("text_config") or {}
            text = text.to_dict() if hasattr(text, "to_dict") else text
            d["image_token_index"] = int(text.get("vocab_size", 32001))  # outside the vocabulary
        return cls(**d)

    @classmethod
    def instructblip_vicuna7b(cls, **overrides) -> "SAMConfig":
        """The paper's full-size model: EVA-CLIP ViT-g/14 (39 blocks, 1408 wide, 224 px -> 257
        tokens), BERT-base Q-former (12 layers, cross-attention every 2nd, 32 queries), Vicuna-7B
        v1.1 (LLaMA, 4096 hidden, 32 layers). Public sizes only; no weights.

        The LLM vocabulary is LAVIS' Vicuna one: 32000 ids + ``[PAD]`` = 32000. The image
        placeholder id is 32001, outside it (placement goes by the placeholder mask, the id is
        never looked up), so it can never equal ``[PAD]`` or any real token; it is also the
        ``<image>`` id of HF's newer InstructBLIP revision (vocabulary 32064)."""
        vision = InstructBlipVisionConfig(
            hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
            image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
        )
        qformer = InstructBlipQFormerConfig(
            vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408,
            max_position_embeddings=512, layer_norm_eps=1e-12,
        )
        text = LlamaConfig(
            vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False,
        )
        kw = dict(
            vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
            num_query_tokens=32, image_token_index=32001,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "SAMConfig":
        """A small configuration for tests and the demo (random weights, seconds on a CPU).

        Same structure as the full model: cross-attention every 2nd Q-former layer, LLaMA LLM.
        Vision 28x28 px with patch 14 (P = 5 tokens), Q-former hidden 32 with 4 layers, 8 queries.
        Random weights get larger initialisations than HF's defaults (vision 1e-10 -> 0.02, LLM
        0.02 -> 0.2) so that a random frozen backbone still responds to its inputs.
        """
        vision = InstructBlipVisionConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=14, initializer_range=0.02,
        )
        qformer = InstructBlipQFormerConfig(
            vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=64, cross_attention_frequency=2, encoder_hidden_size=48,
            max_position_embeddings=64,
        )
        text = LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
            initializer_range=0.2,
        )
        kw = dict(
            vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
            num_query_tokens=8, image_token_index=3,
        )
        kw.update(overrides)
        return cls(**kw)


def _register_auto_config() -> None:
    from transformers import AutoConfig

    AutoConfig.register(SAMConfig.model_type, SAMConfig, exist_ok=True)


_register_auto_config()  # AutoConfig.from_pretrained reads a SAM folder once sam_fast is imported
