"""SAM: InstructBLIP-Vicuna-7B with bidirectional semantic guidance between the images of one
instruction (Wu et al., "Semantic Alignment for Multimodal Large Language Models", MM '24).

For every image i of a sample with images {I_m}:

- Part A, assisted visual token extraction (Q-stream): the frozen Q-former reads E_i = ViT(I_i)
  with the instruction; its input to layer l is the initial visual tokens h_i.
- Part B, contextual semantic generation (W-stream): the Adaptive Adjustment merges the contextual
  images patch by patch into I-hat (softmax over images of ``Linear(E_m[j])``); the same frozen
  Q-former layers (the W-former) read I-hat, with ``w <- w + guidance_in(h_i)`` before layer l, and
  yield ``c_i = guidance_out(w)`` after layer k.
- The Q-stream input to layer k gets ``x <- x + c_i``; the 32 query rows of the Q-stream output,
  through ``language_projection``, are image i's visual tokens.

In leave_one_out mode (the paper's) a one-image sample has no contextual image: c_i = 0 and its
tokens equal InstructBLIP's; in shared mode (the released code's) its own image is its context.
The guidance Linears start at zero, so an untrained SAM is InstructBLIP exactly
(docs/model.md#context-modes).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    InstructBlipQFormerModel,
    InstructBlipVisionModel,
)
from transformers.modeling_outputs import ModelOutput
from transformers.models.instructblip.modeling_instructblip import InstructBlipPreTrainedModel

from sam_fast.config import SAMConfig, choose_recompute_qformer
from sam_fast.data.pack_plan import PackPlan
from sam_fast.models import loading, run_dir
from sam_fast.models.hf_compat import cache_kwarg, passes_cache
from sam_fast.models.loading.common import TRAINABLE_MODULES
from sam_fast.models.packing import compiled_planned_loss, planned_lm_loss, static_planned_loss_sum
from sam_fast.models import static_step
from sam_fast.models.static_step import with_zero_weight as _in_graph_with_weight_zero
from sam_fast.ops.linear_cross_entropy import linear_cross_entropy
from sam_fast.distributed import is_sharded
from sam_fast.models.generation import (
    GENERATION_MODES,
    SETTING_RULES,
    GenerationSettingError,
    check_compile_decode,
    check_setting,
    generated_tokens_penalty,
    lavis_generate,
    prefill_for_beams,
)
from sam_fast.modules import (
    AdaptiveAdjustment,
    GuidanceIn,
    GuidanceOut,
    ImagePlan,
    WFormer,
    attention_bias,
)
from sam_fast.modules import schedules as w_schedules

GENERATION_DEFAULTS = dict(num_beams=5, max_new_tokens=256, repetition_penalty=1.5, length_penalty=1.0, do_sample=False)
LAVIS_KWARGS = ("num_beams", "max_length", "max_new_tokens", "min_length", "repetition_penalty", "length_penalty",
                "compile_decode")


def paper_generation_config(text_config) -> GenerationConfig:
    """The paper's decoding settings (5 beams, repetition penalty 1.5, length penalty 1, up to 256
    new tokens, no sampling) with the LLM's special ids: `SAM.generation_config`'s default."""
    ids = {k: getattr(text_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return GenerationConfig(**GENERATION_DEFAULTS, **{k: v for k, v in ids.items() if v is not None})


# keyword arguments `AutoModel.from_pretrained` passes on (resolved Hub settings and the config it
# read); a trainable-delta directory is local and carries its own config.json
_HUB_KWARGS = ("config", "cache_dir", "force_download", "local_files_only", "proxies", "revision", "token",
               "trust_remote_code", "code_revision", "adapter_kwargs", "_from_auto", "_from_pipeline", "_commit_hash",
               "subfolder")

# set by SAM itself: a caller passing them would be ignored or clash
_OWN_LLM_INPUTS = frozenset({"input_ids", "inputs_embeds", "attention_mask", "labels", "self", "kwargs"})
_LLM_KEYWORDS: dict[type, frozenset[str]] = {}


def _llm_keywords(language_model) -> frozenset[str]:
    """Keyword names the LLM's forward accepts besides those SAM sets: its named parameters and,
    when it takes ``**kwargs``, HF's common model keywords (`TransformersKwargs`)."""
    cls = type(language_model)
    if cls not in _LLM_KEYWORDS:
        params = inspect.signature(language_model.forward).parameters
        names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        names |= {"return_dict", "output_attentions", "output_hidden_states"}
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            try:
                from transformers.utils.generic import TransformersKwargs

                names |= set(TransformersKwargs.__annotations__)
            except ImportError:  # older transformers: no such TypedDict
                pass
        _LLM_KEYWORDS[cls] = frozenset(names - _OWN_LLM_INPUTS)
    return _LLM_KEYWORDS[cls]


def _prompt_length(input_ids) -> int | None:
    """Positions of the left-padded prompts (placeholders become visual tokens one for one)."""
    return input_ids.shape[1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None


def _token_id(value, default: int) -> int:
    return default if value is None else int(value[0] if isinstance(value, (list, tuple)) else value)


@dataclass
class SAMOutput(ModelOutput):
    """Output of `SAM.forward`.

    loss: mean next-token cross-entropy over labelled positions (when labels are given).
    logits: [B, S, vocab] LLM logits.
    visual_tokens: [T, Q, llm_hidden] the visual tokens placed into the prompt.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    visual_tokens: torch.Tensor | None = None
    language_model_outputs: object | None = None


def _counts_list(image_counts) -> list[int]:
    if image_counts is None:
        raise ValueError("image_counts is required: one entry per sample (number of its images)")
    if isinstance(image_counts, torch.Tensor):
        if image_counts.dim() != 1 or image_counts.is_floating_point() or image_counts.dtype == torch.bool:
            raise ValueError(
                f"image_counts must be a 1-D integer tensor, got shape {tuple(image_counts.shape)} "
                f"dtype {image_counts.dtype}"
            )
        counts = [int(c) for c in image_counts.tolist()]
    else:
        if isinstance(image_counts, (str, bytes)) or not hasattr(image_counts, "__iter__"):
            raise ValueError(f"image_counts must be a list of integers (one per sample), got {image_counts!r}")
        counts = []
        for c in image_counts:
            # ints only: 2.9 or "2" would otherwise be truncated or split silently
            if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                raise ValueError(f"image_counts must hold integers, got {c!r} in {list(image_counts)!r}")
            counts.append(int(c))
    if not counts:
        raise ValueError("image_counts is empty: a batch needs at least one sample")
    bad = [(b, c) for b, c in enumerate(counts) if c < 1]
    if bad:
        raise ValueError(f"image_counts: every sample needs >= 1 image; sample(s) {bad} (index, count) have fewer")
    return counts


def _instruction_mask(ids, mask, B: int) -> torch.Tensor:
    """The Q-former instruction's padding mask [B, L] (all ones by default), `ids` checked to be
    [B, L], one row per sample."""
    if ids is None or ids.dim() != 2 or ids.shape[0] != B:
        got = None if ids is None else tuple(ids.shape)
        raise ValueError(f"qformer_input_ids must be [B={B}, L] (one row per sample), got {got}")
    if mask is None:
        return torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise ValueError(f"qformer_attention_mask {tuple(mask.shape)} must match qformer_input_ids {tuple(ids.shape)}")
    return mask


def _summed_fused_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the supervised rows (a pack plan's: every target a checked class
    id, so nothing is read back), logits never materialised whole."""
    return linear_cross_entropy(hidden, weight, targets, reduction="sum", checked_targets=True)


_NO_TARGET = ("labels has no predicted position (all -100 after the first): the loss would be 0/0 = NaN; give each "
              "batch at least one answer token")


def _as_plan(pack_plan) -> PackPlan:
    """`pack_plan` as a `PackPlan` (a batch mover may have rebuilt it as a plain dict)."""
    if isinstance(pack_plan, PackPlan):
        return pack_plan
    if not isinstance(pack_plan, Mapping):
        raise ValueError(f"pack_plan must be the PackPlan of the batch (sam_fast.data.Collator / SAMProcessor), "
                         f"got {type(pack_plan).__name__}")
    return PackPlan(pack_plan)


class SAM(InstructBlipPreTrainedModel):
    """SAM as a transformers `PreTrainedModel` (state-dict compatible with HF InstructBLIP).

    Attributes (HF InstructBLIP's names plus SAM's three modules): ``vision_model``, ``query_tokens`` [1, Q, 768], ``qformer``,
    ``adaptive_adjustment`` (`AdaptiveAdjustment`, Linear(D, 1)), ``guidance_in``, ``guidance_out``
    (`GuidanceIn` / `GuidanceOut`, Linear(768, 768), zero-initialised), ``language_projection``
    (Linear(768, llm_hidden)), ``language_model``; ``w_former`` (`WFormer`) runs the Q-former's
    layers as Q-stream and W-stream and holds no parameter of its own.
    Only the last four (``TRAINABLE_MODULES``) require grad.
    """

    config_class = SAMConfig
    config: SAMConfig
    # the modules training updates and checkpoints / deltas hold; the tuple is the checkpoint format's
    # (sam_fast.models.loading.common), which the loaders read without importing this module
    TRAINABLE_MODULES = TRAINABLE_MODULES
    main_input_name = "pixel_values"
    base_model_prefix = "sam"
    _keep_in_fp32_modules = ["query_tokens"]
    # through the LLM only (`_set_gradient_checkpointing`): its activations are a training step's memory
    supports_gradient_checkpointing = True
    # `forward` takes `num_items_in_batch` (HF Trainer's token count for gradient accumulation)
    accepts_loss_kwargs = True

    def __init__(self, config: SAMConfig):
        super().__init__(config)
        config.validate_sam()
        if not config.use_decoder_only_language_model:
            raise ValueError(
                f"SAM needs a causal (decoder-only) LLM; text_config.model_type={config.text_config.model_type!r}"
            )
        qcfg = config.qformer_config
        self.vision_model = InstructBlipVisionModel._from_config(config.vision_config)
        if config.post_layernorm_eps is not None:  # LAVIS' ln_vision uses 1e-5, HF the vision config's eps
            self.vision_model.post_layernorm.eps = config.post_layernorm_eps
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        self.qformer = InstructBlipQFormerModel._from_config(qcfg)
        self.adaptive_adjustment = AdaptiveAdjustment(config.vision_config.hidden_size)
        self.guidance_in = GuidanceIn(qcfg.hidden_size, qcfg.hidden_size)
        self.guidance_out = GuidanceOut(qcfg.hidden_size, qcfg.hidden_size)
        # both streams over the Q-former's layers; holds references only (no state-dict key)
        self.w_former = WFormer(self.qformer, self.guidance_in, self.guidance_out, config)
        self.language_projection = nn.Linear(qcfg.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # (recompute?, why) of recompute_qformer="auto", decided at the first training forward
        self.recompute_qformer_choice: tuple[bool, str] | None = None
        self.post_init()
        self.freeze_backbone()
        self._decide_w_schedule()
        self.generation_config = paper_generation_config(config.text_config)
        self.loss_type = "ForCausalLM"  # labels are shifted: HF Trainer counts `labels[..., 1:]` for num_items_in_batch

    @classmethod
    def can_generate(cls) -> bool:
        """True: `generate` exists, `generation_config` holds its defaults and is saved with the model."""
        return True

    # -- parameters --------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            nn.init.zeros_(self.query_tokens)
        if module is getattr(self, "guidance_in", None) or module is getattr(self, "guidance_out", None):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def reset_guidance_parameters(self) -> None:
        """Re-initialise the three new modules as the paper starts them: guidance Linears zero, Adaptive
        Adjustment normal(0, initializer_range) weight and zero bias."""
        with torch.no_grad():
            for m in (self.guidance_in, self.guidance_out):
                m.weight.zero_()
                m.bias.zero_()
            self.adaptive_adjustment.weight.normal_(0.0, self.config.initializer_range)
            self.adaptive_adjustment.bias.zero_()

    def freeze_backbone(self) -> None:
        """Freeze everything but the four trainable modules (the paper trains only these 4.3M parameters)."""
        for p in self.parameters():
            p.requires_grad_(False)
        for name in self.TRAINABLE_MODULES:
            for p in getattr(self, name).parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> "SAM":
        """Set training mode on the trainable modules only. The frozen backbone (ViT, Q-former,
        LLM) stays in eval mode, so its dropout (the Q-former's 0.1) stays off whether the model
        is trained by `sam-fast train`, a user's own loop or HF `Trainer`: one recipe. To train
        with the frozen Q-former's dropout on, call ``model.qformer.train()`` after this."""
        super().train(mode)
        for name in ("vision_model", "qformer", "language_model"):
            getattr(self, name).train(False)
        self._sync_checkpointing_mode()
        if "_w_choice" in self.__dict__:  # built; loaders end with eval() once the weights are placed
            self._decide_w_schedule()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors of the four trainable modules, keyed like `state_dict()`."""
        return {f"{m}.{k}": v for m in self.TRAINABLE_MODULES for k, v in getattr(self, m).state_dict().items()}

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the LLM's input embedding and LM head to `new_num_tokens` rows (HF semantics,
        e.g. after adding tokens to the LLM tokenizer) and keep ``config.text_config.vocab_size``
        in step. The resized tensors keep their frozen/trainable state. Warns when the image
        placeholder id ``config.image_token_index`` becomes a real token id (its positions are
        still taken as image placeholders).

        Returns:
            The new input embedding module.
        """
        old_vocab = self.config.text_config.vocab_size
        modules = {"input": self.get_input_embeddings(), "output": self.get_output_embeddings()}
        frozen = {k: [p.requires_grad for p in m.parameters()] for k, m in modules.items() if m is not None}
        embeddings = self.language_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        for key, module in (("input", self.get_input_embeddings()), ("output", self.get_output_embeddings())):
            if module is not None and key in frozen:
                for p, flag in zip(module.parameters(), frozen[key]):
                    p.requires_grad_(flag)
        vocab = embeddings.weight.shape[0]
        self.config.text_config.vocab_size = vocab
        self.language_model.config.vocab_size = vocab
        if old_vocab <= self.config.image_token_index < vocab:
            warnings.warn(
                f"resize_token_embeddings: image_token_index={self.config.image_token_index} is now inside the "
                f"vocabulary ({vocab} ids); every position holding that id is taken as an image placeholder",
                stacklevel=2,
            )
        return embeddings

    # -- gradient checkpointing ----------------------------------------------------------------
    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        """`gradient_checkpointing_enable()` / `activation_checkpointing_enable()` land here:
        checkpointing is set on the LLM only (its decoder layers' activations are what a training
        step keeps; the frozen ViT and Q-former keep almost none, as nothing before the guidance
        modules needs a gradient). The LLM stays in eval mode under `train()` (no dropout), except
        the flag that lets its checkpointed layers recompute in the backward pass. While it is on,
        `forward` takes the padded LLM call (the packed step cannot be recomputed)."""
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        self.language_model._set_gradient_checkpointing(enable=enable, **kwargs)
        self._sync_checkpointing_mode()

    def _checkpointing_modules(self) -> list[nn.Module]:
        return [m for m in self.language_model.modules() if getattr(m, "gradient_checkpointing", False) is True]

    def _sync_checkpointing_mode(self) -> None:
        # HF checkpoints a layer only when it is in training mode; only the flagged modules
        # themselves follow `self.training` (not their children: attention dropout stays off).
        for m in self._checkpointing_modules():
            m.training = self.training

    def _llm_checkpointing(self) -> bool:
        return self.training and torch.is_grad_enabled() and bool(self._checkpointing_modules())

    # -- inputs ------------------------------------------------------------------------------
    def _image_features(self, pixel_values, image_features) -> torch.Tensor:
        vcfg = self.config.vision_config
        if (pixel_values is None) == (image_features is None):
            raise ValueError("give exactly one of pixel_values [T,3,H,W] or image_features [T,P,D]")
        if pixel_values is not None:
            size = vcfg.image_size
            if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
                raise ValueError(
                    f"pixel_values must be [T, 3, {size}, {size}], got {tuple(pixel_values.shape)}"
                )
            return self.vision_model(pixel_values=pixel_values).last_hidden_state
        n_pos = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        if image_features.dim() != 3 or image_features.shape[1:] != (n_pos, vcfg.hidden_size):
            raise ValueError(
                f"image_features must be [T, P={n_pos}, D={vcfg.hidden_size}] (vision model output), "
                f"got {tuple(image_features.shape)}"
            )
        return image_features

    # -- Parts A and B -----------------------------------------------------------------------
    def encode_images(
        self,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_counts: Sequence[int] | torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Visual tokens of a ragged batch.

        Args:
            pixel_values: [T, 3, H, W] images, sample-major; or
            image_features: [T, P, D] cached vision-model outputs E (then the ViT is skipped).
            image_counts: [B] images per sample (list or LongTensor), each >= 1, summing to T.
            qformer_input_ids: [B, L] the instruction, one row per sample, shared by its images.
            qformer_attention_mask: [B, L] 0/1 padding mask (default all ones).

        Returns:
            [T, Q, llm_hidden] visual tokens, image order as given.

        Steps (equal to the per-image reference `sam_fast.reference.reference_encode_images`):
        features E -> `ImagePlan` (built once on the host from the counts) -> [query tokens ;
        instruction] embeddings, once per sample -> the K/V of every cross-attention layer, once
        per image in one GEMM (Part A) -> the W-stream: I-hat's K/V merged from those by the
        `AdaptiveAdjustment` (I-hat is never projected; where the attention op forms mixed K/V in
        its kernel, leave_one_out's are not even materialised) -> `WFormer`: Q-stream and W-stream
        rows batched in every layer up to k, with the two injections -> `language_projection`.
        In shared mode the W-stream layers before l run once per sample (so in training those
        layers draw one dropout mask per sample instead of one per image).
        """
        cfg = self.config
        E = self._image_features(pixel_values, image_features)
        counts = _counts_list(image_counts)
        if sum(counts) != E.shape[0]:
            raise ValueError(f"image_counts {counts} sum to {sum(counts)} but there are T={E.shape[0]} images")
        qformer_attention_mask = _instruction_mask(qformer_input_ids, qformer_attention_mask, len(counts))
        plan = ImagePlan.build(counts, cfg.context_mode, cfg.guidance, E.device)
        embed, mask = self._instruction_embeddings(qformer_input_ids, qformer_attention_mask)
        x = embed(plan.sample_of)  # Q-stream (Part A): one row per image
        bias = attention_bias(mask, x.dtype)  # [B, 1, 1, Q+L]
        kv = self.w_former.project_kv(E.to(x.dtype))
        w_stream = self._w_stream(E, kv, plan, embed, bias)  # W-stream (Part B)
        streams = (x, bias.index_select(0, plan.sample_of), kv, w_stream)
        if self._recompute_streams(E.shape[0], mask.shape[1] - cfg.num_query_tokens, x.dtype, E.device):
            # The two streams' activations (the frozen Q-former's, about a fifth of a training
            # step's memory at the real proportions) are not kept through the LLM's step: the
            # backward runs the streams again (a few % of the step's FLOPs) from their inputs.
            hidden = torch.utils.checkpoint.checkpoint(self.w_former, *streams, use_reentrant=False)
        else:
            hidden = self.w_former(*streams)
        tokens = self.language_projection(hidden)
        unused = [] if plan.guided else [self.guidance_in, self.guidance_out]
        if not plan.guided or cfg.guidance != "adaptive":
            unused.append(self.adaptive_adjustment)
        return _in_graph_with_weight_zero(tokens, unused)

    def _instruction_embeddings(self, ids: torch.Tensor, mask: torch.Tensor):
        """(embed, mask): ``embed(rows)`` [R, Q+L, H] the [query tokens ; instruction] embeddings of
        the samples `rows` [R], and their 0/1 padding mask [B, Q+L]. Embedded once per sample and
        shared by the rows of both streams; in training with embedding dropout every row gets its
        own call, hence its own mask, as in the per-image reference."""
        B, Q = ids.shape[0], self.config.num_query_tokens
        embeddings = self.qformer.embeddings
        if embeddings.training and embeddings.dropout.p > 0:
            def embed(rows: torch.Tensor) -> torch.Tensor:
                r_ids = ids.index_select(0, rows)
                return embeddings(input_ids=r_ids, query_embeds=self.query_tokens.expand(len(r_ids), -1, -1))
        else:
            emb = embeddings(input_ids=ids, query_embeds=self.query_tokens.expand(B, -1, -1))

            def embed(rows: torch.Tensor) -> torch.Tensor:
                return emb.index_select(0, rows)
        return embed, torch.cat([mask.new_ones(B, Q), mask], 1)

    def _w_stream(self, E, kv, plan: ImagePlan, embed, bias):
        """The W-stream of the batch (None: no image is guided), laid out by the model's schedule
        (`w_schedule`): I-hat's K/V merged by the Adaptive Adjustment from the images' K/V `kv`."""
        if not plan.guided:
            return None
        return self.w_schedule.build(plan, self.adaptive_adjustment, E, kv, self.config.guidance, embed, bias)

    # -- the W-stream's schedule, chosen once --------------------------------------------------
    def _w_schedule_key(self) -> tuple:
        """What the schedule depends on: context mode, and the Q-former cross-attention's device
        type, dtype, sizes and active dropout (attributes only, no tensor)."""
        heads, head_dim, device, dtype, dropout = self.w_former.attention_kind()
        return self.config.context_mode, heads, head_dim, device.type, dtype, dropout

    def _decide_w_schedule(self, schedule=None) -> None:
        """Choose the W-stream schedule for the model as it is now (`choose_w_schedule`), or keep
        `schedule`, until `_w_schedule_key` changes."""
        key = self._w_schedule_key()
        if schedule is None:
            mode, heads, head_dim, device_type, dtype, dropout = key
            schedule = w_schedules.choose_w_schedule(mode, heads, head_dim, device_type, dtype, dropout)
        self._w_choice = (key, schedule)

    @property
    def w_schedule(self) -> type:
        """The W-stream schedule `encode_images` runs (`sam_fast.modules.schedules`: shared mode's,
        or leave_one_out's with the K/V materialised or mixed inside the attention kernel). Chosen
        from the device type, dtype and Q-former sizes when the model is built, moved or cast
        (`_apply`: ``.to``, ``.cuda``, ``.double``, ...) and set to train or eval mode (the
        loaders, which place weights without `_apply`, end with ``eval()``); never per call. A new
        ``config.context_mode``, the Q-former's attention dropout switched on by hand or weights
        placed some other way are noticed from attributes and re-decided once. Assign a schedule
        class to force one (tests, benchmarks) until one of those changes."""
        key, schedule = self._w_choice
        if key != self._w_schedule_key():
            self._decide_w_schedule()
            key, schedule = self._w_choice
        return schedule

    @w_schedule.setter
    def w_schedule(self, schedule) -> None:
        if schedule not in w_schedules.SCHEDULES or schedule.context_mode != self.config.context_mode:
            names = [s.__name__ for s in w_schedules.SCHEDULES if s.context_mode == self.config.context_mode]
            raise ValueError(f"w_schedule: {getattr(schedule, '__name__', repr(schedule))[:80]} is not a schedule of "
                             f"context_mode={self.config.context_mode!r} (one of {names})")
        self._decide_w_schedule(schedule)

    def _apply(self, fn, recurse=True):
        """`nn.Module._apply` (``.to``, ``.cuda``, ``.half``, ``.double``, ...), then the W-stream's
        schedule chosen again for the new device and dtype."""
        out = super()._apply(fn, recurse)
        if "_w_choice" in self.__dict__:  # built: the Q-former exists
            self._decide_w_schedule()
        return out

    def _recompute_streams(self, images: int, instruction_tokens: int, dtype: torch.dtype, device) -> bool:
        """Whether `encode_images` recomputes the Q/W-former in the backward instead of keeping its
        activations (`SAMConfig.recompute_qformer`): only when a gradient will be taken, never
        while torch.compile traces (the compiler plans its own recomputation). ``"auto"`` is
        decided once, from the first such batch's shapes (`choose_recompute_qformer`: no host
        read), and kept in `recompute_qformer_choice` with the reason."""
        setting = getattr(self.config, "recompute_qformer", False)
        if not (setting and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and any(p.requires_grad for m in (self.guidance_in, self.guidance_out, self.adaptive_adjustment)
                        for p in m.parameters())):
            return False
        if setting != "auto":
            return True
        if self.recompute_qformer_choice is None:
            self.recompute_qformer_choice = choose_recompute_qformer(
                self.config, images, instruction_tokens, dtype.itemsize, device)
        return self.recompute_qformer_choice[0]

    # -- LLM ---------------------------------------------------------------------------------
    def _placeholders(self, input_ids, counts: list[int], on_device: bool = False) -> torch.Tensor:
        """[B, S] bool mask of the image placeholders, checked against the image counts (on the
        device, without a host read, when `on_device` or compiling)."""
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {None if input_ids is None else tuple(input_ids.shape)}")
        if input_ids.shape[0] != len(counts):
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but image_counts has {len(counts)} samples")
        Q = self.config.num_query_tokens
        placeholder = input_ids == self.config.image_token_index
        if on_device or torch.compiler.is_compiling():  # no host read: checked on the device
            want_t = torch.tensor([n * Q for n in counts], device=input_ids.device)
            torch._assert_async((placeholder.sum(1) == want_t).all(),
                                f"image placeholders (token {self.config.image_token_index}) per sample must be "
                                f"{Q} x its image count {counts}")
            return placeholder
        found = placeholder.sum(1).tolist()
        want = [n * Q for n in counts]
        if found != want:
            bad = [(b, f, w) for b, (f, w) in enumerate(zip(found, want)) if f != w]
            raise ValueError(
                f"image placeholders (token {self.config.image_token_index}) per sample must be "
                f"{Q} x its image count; (sample, found, expected): {bad}"
            )
        return placeholder

    def _check_positions(self, input_ids) -> None:
        limit = self.config.text_config.max_position_embeddings
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions but the LLM takes at most "
                f"max_position_embeddings={limit}: shorten the prompts (or the answers)"
            )

    def _llm_inputs(self, pixel_values, image_features, image_counts, qformer_input_ids, qformer_attention_mask,
                    input_ids, attention_mask, plan: PackPlan | None = None):
        """(visual tokens [T,Q,H], LLM input embeddings with the placeholders filled, attention mask).
        With a pack `plan` the image counts are its host copy (nothing read back)."""
        counts = _counts_list(image_counts if plan is None else list(plan.image_counts))
        placeholder = self._placeholders(input_ids, counts, on_device=plan is not None)  # before the encoding
        self._check_positions(input_ids)
        visual = self.encode_images(pixel_values, image_features, counts, qformer_input_ids, qformer_attention_mask)
        # Placement is by the placeholder mask, never by looking the id up: `image_token_index`
        # may lie outside the vocabulary (the full-size config puts it there so that it can never
        # equal a real token such as [PAD]).
        embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))
        tokens = visual.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter(placeholder.unsqueeze(-1), tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return visual, embeds, attention_mask

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_counts: Sequence[int] | torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packing: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        pack_plan: PackPlan | Mapping | None = None,
        **kwargs,
    ) -> SAMOutput:
        """Visual tokens into the LLM prompt, then the LLM (with loss when `labels` are given).

        Args:
            pixel_values: [T, 3, H, W] float images of the whole batch, sample-major (sample 0's
                images, then sample 1's, ...); H = W = ``config.vision_config.image_size``. Or
            image_features: [T, P, D] cached vision-model outputs instead (the ViT is skipped).
            image_counts: [B] images per sample (list of ints or 1-D LongTensor), each >= 1,
                summing to T. Required (with a `pack_plan` the plan's host copy is used).
            qformer_input_ids: [B, L] Q-former (BERT) ids of each sample's instruction, shared by
                its images.
            qformer_attention_mask: [B, L] 0/1 (default all ones).
            input_ids: [B, S] LLM ids holding exactly Q = ``config.num_query_tokens`` copies of
                ``config.image_token_index`` per image of the sample, in image order; the visual
                tokens are placed there.
            attention_mask: [B, S] 0/1 (default all ones).
            labels: [B, S] target ids, -100 where ignored; at least one supervised position after
                the first. Gives ``loss`` (mean next-token cross-entropy).
            packing: with `labels`, run the LLM on the real tokens only (default
                ``config.packed_loss``, True; see below).
            num_items_in_batch: divisor of the summed loss instead of this batch's supervised
                token count (HF `Trainer` passes the count over all accumulated micro-batches).
            pack_plan: the batch's `sam_fast.data.PackPlan` (``batch["pack_plan"]`` of
                `sam_fast.data.Collator` and `SAMProcessor` with answers): where every token goes
                in the packed step, built on the host, so that the step reads nothing back from
                the device. Without it the packed step builds it from the tensors (a host read of
                ids, mask and labels).
                It must describe this batch: its shapes are checked on the host, its contents on
                the device (without a sync).
            **kwargs: keyword arguments of the LLM's forward (``output_hidden_states``,
                ``use_cache``, ...); they imply the padded call. Any other name (a misspelt
                ``lables=``) raises ValueError naming it.

        Returns:
            `SAMOutput`: ``loss`` (scalar, with labels), ``logits`` [B, S, vocab] (padded call
            only), ``visual_tokens`` [T, Q, llm_hidden], ``language_model_outputs``.

        With `labels` and `packing` the LLM step skips the padding: the rows' real tokens run as
        one packed sequence (positions restart per sample, causal attention within each sample:
        flash-attn's varlen kernel on CUDA where installed, SDPA per sample elsewhere;
        `sam_fast.models.packing`), and the loss comes from the hidden states at supervised
        positions through `sam_fast.ops.linear_cross_entropy` (no ``[tokens, vocab]`` logits).
        Same loss and gradients as the padded call; ``logits`` is then None. ``packing=False``,
        extra LLM kwargs, an FSDP-sharded LLM, gradient checkpointing in training and
        torch.compile run the padded HF call, which returns logits [B, S, vocab].
        """
        if kwargs:
            self._check_llm_kwargs(kwargs)
        compiling = torch.compiler.is_compiling()
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        plan = None if pack_plan is None else self._checked_plan(pack_plan, input_ids, image_counts)
        if packing is None:
            packing = getattr(self.config, "packed_loss", True)
        if compiling:  # the packed step's shapes are data (sample lengths): the padded call compiles whole
            packing = False
        if self._llm_checkpointing():  # the packed step's attention cannot be recomputed in the backward pass
            packing = False
            kwargs.setdefault("use_cache", False)
        if labels is not None and packing and not kwargs and not is_sharded(self.language_model):
            return self._packed_forward(pixel_values, image_features, image_counts, qformer_input_ids,
                                        qformer_attention_mask, input_ids, attention_mask, labels, plan,
                                        num_items_in_batch)
        if labels is not None and input_ids is not None:
            self._check_labelled(labels, plan, compiling)
            if plan is not None:
                self._assert_plan_matches(plan, input_ids, attention_mask, labels)
        visual, embeds, attention_mask = self._llm_inputs(
            pixel_values, image_features, image_counts, qformer_input_ids, qformer_attention_mask, input_ids,
            attention_mask, plan
        )
        if labels is not None and num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)
        return SAMOutput(loss=out.loss, logits=out.logits, visual_tokens=visual, language_model_outputs=out)

    @staticmethod
    def _check_labelled(labels, plan: PackPlan | None, compiling: bool) -> None:
        """Refuse labels with no predicted position (the loss would be 0/0); with a plan from its
        shapes, compiled on the device, otherwise with one host read."""
        if plan is not None:
            if plan.num_targets == 0:
                raise ValueError(_NO_TARGET)
        elif compiling:  # no host read in a compiled graph: checked on the device
            torch._assert_async((labels[:, 1:] != -100).any(),
                                "labels has no predicted position (all -100 after the first)")
        elif not bool((labels[:, 1:] != -100).any()):
            raise ValueError(_NO_TARGET)

    # -- the packed step ----------------------------------------------------------------------
    def _packed_forward(self, pixel_values, image_features, image_counts, qformer_input_ids, qformer_attention_mask,
                        input_ids, attention_mask, labels, plan: PackPlan | None, num_items_in_batch) -> SAMOutput:
        """The training step on the batch's real tokens (see `forward`). With a pack `plan` nothing
        is read back from the device; without one it is built from the tensors first (their host
        read), with the checks of the padded path and of `sam_fast.models.packing.pack`."""
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {None if input_ids is None else tuple(input_ids.shape)}")
        if plan is None:
            plan = self._plan_from_tensors(input_ids, attention_mask, labels, image_counts)
        else:
            self._assert_plan_matches(plan, input_ids, attention_mask, labels)
        self._check_positions(input_ids)
        if plan.num_targets == 0:
            raise ValueError(_NO_TARGET)
        whole = self.__dict__.get("_compiled_training_step")
        if whole is not None:  # the whole step as one graph (`compile_training_step`)
            step, settings = whole
            plan = plan if plan.bucketed_plan else plan.bucketed()  # a plan built here: default buckets
            mask = _instruction_mask(qformer_input_ids, qformer_attention_mask, len(plan.image_counts))
            loss, visual = static_step.run_training_step(step, self, pixel_values, image_features, qformer_input_ids,
                                                         mask, input_ids, plan, num_items_in_batch, **settings)
            return SAMOutput(loss=loss, visual_tokens=visual)
        visual = self.encode_images(pixel_values, image_features, list(plan.image_counts), qformer_input_ids,
                                    qformer_attention_mask)
        embeds = self._packed_embeddings(input_ids, plan, visual)
        step = self.__dict__.get("_compiled_packed_step")
        if step is not None:
            loss = compiled_planned_loss(step, self.language_model, embeds, plan, num_items_in_batch)
        else:
            loss = planned_lm_loss(self.language_model, embeds, plan, loss_fn=_summed_fused_loss,
                                   num_items_in_batch=num_items_in_batch)
        return SAMOutput(loss=loss, visual_tokens=visual)

    def compile_packed_step(self, enable: bool = True, **compile_kwargs) -> "SAM":
        """Run the LLM part of the packed training step (body, loss; forward and backward) as one
        graph of ``torch.compile(fullgraph=True, dynamic=False, **compile_kwargs)``
        (`sam_fast.models.packing.static_planned_loss_sum`); `enable=False` goes back to eager.

        The graph is specialised to the packed row's length and target count, so give it
        bucketed plans (``Collator(..., pack_buckets=(256, 128))``, `PackPlan.bucketed`): one
        compilation per bucket. The images are encoded and placed eagerly before it (the
        Q/W-former's shapes follow each batch's image counts; `compile_training_step` captures
        them too, with the images bucketed); without a plan the step still
        builds one (its host read). Same loss and gradients as the eager packed step."""
        if not enable:
            self.__dict__.pop("_compiled_packed_step", None)
            return self
        kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self.__dict__["_compiled_packed_step"] = torch.compile(static_planned_loss_sum, **kwargs)
        return self

    def compile_training_step(self, enable: bool = True, mode: str | None = None,
                              image_bucket: int = static_step.IMAGE_BUCKET, text_bucket: int = static_step.TEXT_BUCKET,
                              **compile_kwargs) -> "SAM":
        """Run the WHOLE packed training step (images from features or pixels, the Q/W-former,
        the placement into the packed row, the LLM and its loss; forward and backward) as one
        graph of ``torch.compile(fullgraph=True, dynamic=False, mode=mode, **compile_kwargs)``
        (`sam_fast.models.static_step`); `enable=False` goes back to eager. It replaces
        `compile_packed_step` while on.

        The graph's shapes depend on buckets only: give bucketed pack plans
        (``Collator(..., pack_buckets=...)``); the images are padded to a multiple of
        `image_bucket` with filler images and the Q-former instruction to a multiple of
        `text_bucket`, both masked out. One compilation per (token, target, image, text) bucket.
        ``mode="reduce-overhead"`` captures the step as CUDA graphs on CUDA (the Q/W-former's
        hundreds of small kernels launched as one); ``None`` is torch.compile's default. Same
        loss and gradients as the eager step up to float rounding (``sam-fast env`` names the
        mode). Without a plan the step still builds one (its host read)."""
        if not enable:
            self.__dict__.pop("_compiled_training_step", None)
            self.__dict__.pop("training_step_mode", None)
            return self
        if mode not in static_step.CAPTURE_MODES or int(image_bucket) < 1 or int(text_bucket) < 1:
            raise ValueError(f"compile_training_step: mode={mode!r} (one of {static_step.CAPTURE_MODES}), "
                             f"image_bucket={image_bucket!r}, text_bucket={text_bucket!r} (>= 1)")
        kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        if mode is not None:
            kwargs["mode"] = mode
        settings = dict(image_bucket=int(image_bucket), text_bucket=int(text_bucket),
                        cuda_graphs=mode == "reduce-overhead" and self.device.type == "cuda")
        step = torch.compile(static_step.static_training_step, **kwargs)
        self.__dict__["_compiled_training_step"] = (step, settings)
        self.__dict__["training_step_mode"] = mode or "default"
        return self

    def _plan_from_tensors(self, input_ids, attention_mask, labels, image_counts) -> PackPlan:
        """The pack plan of a batch that came without one: its tensors read to the host once."""
        counts = _counts_list(image_counts)
        if input_ids.shape[0] != len(counts):
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but image_counts has {len(counts)} samples")
        plan = PackPlan.from_tensors(input_ids, attention_mask, labels, counts, self.config.image_token_index,
                                     self.config.num_query_tokens, self.get_input_embeddings().num_embeddings)
        return plan.to(input_ids.device)

    def _checked_plan(self, pack_plan, input_ids, image_counts) -> PackPlan:
        """`pack_plan` on the batch's device, its host fields checked against the batch's shapes and
        `image_counts` (a list compared, a tensor's length only: its values stay on the device)."""
        plan = _as_plan(pack_plan)
        if input_ids is None or input_ids.dim() != 2 or tuple(plan.batch_shape) != tuple(input_ids.shape):
            got = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"pack_plan was built for a batch of shape {tuple(plan.batch_shape)} but input_ids is "
                             f"{got}: build the plan from this batch (or leave it out)")
        if isinstance(image_counts, torch.Tensor):
            if tuple(image_counts.shape) != (len(plan.image_counts),):
                raise ValueError(f"image_counts has shape {tuple(image_counts.shape)} but pack_plan has "
                                 f"{len(plan.image_counts)} samples")
        elif image_counts is not None and _counts_list(image_counts) != list(plan.image_counts):
            raise ValueError(f"image_counts {_counts_list(image_counts)} differ from pack_plan's "
                             f"{list(plan.image_counts)}")
        return plan.to(input_ids.device, non_blocking=True)  # a no-op where the batch mover has moved it

    def _assert_plan_matches(self, plan: PackPlan, input_ids, attention_mask, labels) -> None:
        """Check on the device, without a host read, that `plan` describes this batch: its tokens
        are exactly the valid ones, its image rows exactly the placeholders, its targets the
        labels after its target rows and no label is elsewhere. A mismatch is a RuntimeError on
        the CPU, a device-side assert on a GPU."""
        flat_ids, ph = input_ids.reshape(-1), self.config.image_token_index
        index = plan.index[:plan.num_tokens]  # not the filler of a bucketed plan
        target_rows, targets = plan.target_rows[:plan.num_targets], plan.targets[:plan.num_targets]
        ok = (flat_ids.index_select(0, index.index_select(0, plan.image_rows)) == ph).all()
        ok = ok & ((input_ids == ph).sum() == plan.image_rows.shape[0])
        if attention_mask is not None:
            mask = attention_mask.reshape(-1)
            ok = ok & (mask.index_select(0, index) == 1).all() & ((mask != 0).sum() == plan.num_tokens)
        elif plan.num_tokens != input_ids.numel():
            raise ValueError(f"pack_plan has {plan.num_tokens} tokens but the batch has no attention_mask "
                             f"(all {input_ids.numel()} valid)")
        flat_labels = labels.reshape(-1)
        next_tokens = index.index_select(0, target_rows + 1)
        ok = ok & (flat_labels.index_select(0, next_tokens) == targets).all()
        ok = ok & ((flat_labels != -100).sum() == plan.num_labels)
        torch._assert_async(ok, "pack_plan does not describe this batch (its tokens, image placeholders or labels "
                                "differ): build it from this batch or leave it out")

    def _packed_embeddings(self, input_ids, plan: PackPlan, visual) -> torch.Tensor:
        """LLM input embeddings [N, H] of the batch's valid tokens in packed order, the visual
        tokens at the plan's image rows (the padded batch's embeddings are never built)."""
        ids = input_ids.reshape(-1).index_select(0, plan.index)
        if plan.filler_tokens:  # a bucketed plan's filler is embedded as id 0 (its index is a placeholder)
            ids = torch.cat([ids[:plan.num_tokens], ids.new_zeros(plan.filler_tokens)])
        # the placeholder id may lie outside the vocabulary: its rows are looked up as id 0, then replaced
        embeds = self.get_input_embeddings()(ids.index_fill(0, plan.image_rows, 0))
        tokens = visual.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        return embeds.index_copy(0, plan.image_rows, tokens)

    def _check_llm_kwargs(self, kwargs: dict) -> None:
        """Refuse keyword arguments that neither `forward` nor the LLM's forward takes."""
        allowed = _llm_keywords(self.language_model)
        unknown = sorted(k for k in kwargs if k not in allowed)
        if not unknown:
            return
        own = [n for n in inspect.signature(type(self).forward).parameters if n not in ("self", "kwargs")]
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, own + sorted(allowed), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"SAM.forward got unexpected keyword argument(s) {', '.join(hints)}; it takes {own} and the LLM's "
            f"keywords {sorted(allowed)}"
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_counts: Sequence[int] | torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_mode: str = "hf",
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate answers from left-padded prompts; returns only the new tokens [B, S_new].

        The prompt reaches the LLM as embeddings (visual tokens in the placeholders), so the
        repetition penalty sees generated tokens only, as in the released code, and a sample's
        answer does not depend on the samples batched with it.

        Args:
            generation_mode: ``"hf"`` (default): transformers' `generate`; any HF generation
                kwarg applies (``max_new_tokens``, ``max_length``, ``num_beams``, ``do_sample``,
                ``logits_processor``, ...). ``"lavis"``: the released SAM code's decoder
                (transformers 4.33 beam search as LAVIS called it), which reproduces its answers;
                it takes ``num_beams``, ``max_length`` (BOS included: 256 -> 255 new tokens) or
                ``max_new_tokens`` (= max_length - 1), ``min_length``, ``repetition_penalty`` and
                ``length_penalty`` (see `sam_fast.models.generation`). `sam-fast eval` uses it.
                Its ``compile_decode`` (keyword or ``generation_config.compile_decode``; default
                False): True compiles the decoding step with CUDA graphs on CUDA (eager on a CPU),
                a dict passes those `torch.compile` arguments. Same ids either way.
            Other arguments as `forward`.

        Settings: ``generation_config`` (a `GenerationConfig`; default ``self.generation_config``,
        the paper's: 5 beams, repetition_penalty 1.5, length_penalty 1, up to 256 new tokens, saved
        and loaded with the model as ``generation_config.json``), then keyword arguments over it, as
        in HF models. ``"lavis"`` reads the beams and penalties from it and its length from
        ``max_length`` / ``max_new_tokens`` (default max_length 256, min_length 1).
        Every setting either mode reads, from the keyword arguments or a config, is checked
        before the images are encoded (`sam_fast.models.generation.SETTING_RULES`: integer counts
        >= 1, finite penalties, repetition_penalty > 0, ...; in ``"hf"`` mode a max_length that
        exceeds the prompt's length): a bad one is one ValueError naming it and its value.

        Speed ("hf" mode): with beams each prompt is run once and its KV cache copied to the beams
        (HF would run it once per beam); ``cache_implementation="static"`` gives a fixed-shape KV
        cache, for which HF's generate compiles the decoding step on a GPU. Same ids either way.

        Returns:
            [B, S_new] LongTensor of the new token ids (no prompt), padded after ``</s>``.
        """
        if generation_mode not in GENERATION_MODES:
            raise ValueError(f"generation_mode={generation_mode!r} is not one of {GENERATION_MODES}")
        generate_kwargs.pop("pack_plan", None)  # a training batch's plan of its packed step: nothing to generate from
        user_config = generate_kwargs.pop("generation_config", None)
        config = copy.deepcopy(self.generation_config)
        if user_config is not None:  # as HF: what the user's config sets wins, the rest is the model's
            diff = user_config.to_diff_dict()
            config.update(**diff)
            if "max_length" in diff and "max_new_tokens" not in diff:
                config.max_new_tokens = None  # the user's max_length, not the model's default max_new_tokens
        # every setting is checked before the images are encoded: a bad one fails in one line
        if generation_mode == "lavis":
            settings = self._lavis_settings(config, user_config, generate_kwargs)
        else:
            llm_kwargs = self._hf_settings(config, generate_kwargs, _prompt_length(input_ids))
        _, embeds, attention_mask = self._llm_inputs(
            pixel_values, image_features, image_counts, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask
        )
        if generation_mode == "lavis":
            return lavis_generate(self.language_model, embeds, attention_mask, **settings)
        return self._generate_hf(embeds, attention_mask, config, llm_kwargs)

    def _lavis_settings(self, config, user_config, generate_kwargs) -> dict:
        """`lavis_generate`'s keyword arguments: the settings of `config` under the keyword
        arguments (only `LAVIS_KWARGS`), each checked (`check_setting`)."""
        extra = sorted(set(generate_kwargs) - set(LAVIS_KWARGS))
        if extra:
            raise ValueError(f"generation_mode='lavis' takes only {sorted(LAVIS_KWARGS)}; got {extra}")
        if "max_length" in generate_kwargs and "max_new_tokens" in generate_kwargs:
            raise GenerationSettingError("generate: give max_length or max_new_tokens, not both")

        def setting(name: str, default, config_value=None):
            if name in generate_kwargs:
                check_setting(name, generate_kwargs[name])
                return generate_kwargs[name]
            check_setting(name, config_value, "generation_config.")
            return default if config_value is None else config_value

        new_tokens = generate_kwargs.get("max_new_tokens")
        check_setting("max_new_tokens", new_tokens)
        config_length = None  # a max_length the user's config sets (and no max_new_tokens beside it)
        if new_tokens is None and "max_length" not in generate_kwargs and user_config is not None:
            diff = user_config.to_diff_dict()
            if "max_length" in diff and "max_new_tokens" not in diff:
                config_length = user_config.max_length
                check_setting("max_length", config_length, "generation_config.")
            else:
                new_tokens = user_config.max_new_tokens
                check_setting("max_new_tokens", new_tokens, "generation_config.")
        # the seeded BOS counts in max_length: LAVIS' max_length=256 is 255 new tokens
        default_length = config_length if config_length is not None else 256 if new_tokens is None else new_tokens + 1
        max_length = setting("max_length", default_length)
        if max_length < 2:
            raise GenerationSettingError(f"generate: max_length={max_length} must be >= 2 in generation_mode='lavis' "
                             f"(it counts the seeded BOS: max_length - 1 new tokens)")
        gen = self.language_model.generation_config  # LLaMA's: bos 1, eos 2, pad 0

        def token(name: str, default: int) -> int:
            own = getattr(config, name)
            return _token_id(own if own is not None else getattr(gen, name), default)

        compile_decode = generate_kwargs.get("compile_decode", getattr(config, "compile_decode", False))
        check_compile_decode(compile_decode, "" if "compile_decode" in generate_kwargs else "generation_config.")
        return dict(
            max_length=max_length,
            compile_decode=compile_decode,
            num_beams=setting("num_beams", 1, config.num_beams),
            min_length=setting("min_length", 1),
            repetition_penalty=setting("repetition_penalty", 1.0, config.repetition_penalty),
            length_penalty=setting("length_penalty", 1.0, config.length_penalty),
            bos_token_id=token("bos_token_id", 1), eos_token_id=token("eos_token_id", 2),
            pad_token_id=token("pad_token_id", 0),
        )

    def _hf_settings(self, config, generate_kwargs, prompt_length: int | None) -> dict:
        """Update `config` with the keyword arguments and check every decoding setting it then
        holds (`check_setting`, and a max_length that leaves room after the prompt, which HF
        counts in it); returns the keyword arguments that are not generation settings (for the
        LLM)."""
        if "max_length" in generate_kwargs and "max_new_tokens" not in generate_kwargs:
            config.max_new_tokens = None  # the user's max_length is not overridden by the default
        kwargs = config.update(**generate_kwargs)
        for name in SETTING_RULES:
            check_setting(name, getattr(config, name, None), "" if name in generate_kwargs else "generation_config.")
        if config.max_new_tokens is None and config.max_length is not None and prompt_length is not None:
            if config.max_length <= prompt_length:
                where = "" if "max_length" in generate_kwargs else "generation_config."
                raise GenerationSettingError(
                    f"generate: {where}max_length={config.max_length} must exceed the prompt's length "
                    f"({prompt_length}): in generation_mode='hf' it counts the prompt; max_new_tokens counts "
                    f"only the answer"
                )
        return kwargs

    def _generate_hf(self, embeds, attention_mask, config, kwargs) -> torch.LongTensor:
        """transformers' `generate` on the prompt embeddings with the checked `config` and the
        LLM's keyword arguments: the repetition penalty on generated tokens only, and with beams
        the prompt run once per sample (`prefill_for_beams`)."""
        penalty = config.repetition_penalty
        if penalty is not None and penalty != 1.0:
            # HF's own processor would exempt the first k generated tokens of a row left-padded by k
            processors = generated_tokens_penalty(penalty)
            processors.extend(kwargs.pop("logits_processor", None) or [])
            kwargs["logits_processor"] = processors
        config.repetition_penalty = 1.0
        beams = int(config.num_beams or 1)
        use_cache = kwargs.get("use_cache", config.use_cache)
        if (beams > 1 and not passes_cache(kwargs) and use_cache is not False
                and (config.num_return_sequences or 1) == 1):
            # HF copies the prompt to every beam before its prefill (num_beams x the prefill work):
            # run the prompt but its last position once per sample, then give every beam a copy
            static_len = None
            if config.cache_implementation == "static":  # HF refuses a cache object next to this setting
                config.cache_implementation = None
                new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
                static_len = embeds.shape[1] + int(new)
            kwargs[cache_kwarg()] = prefill_for_beams(self.language_model, embeds, attention_mask, beams,
                                                          static_cache_len=static_len)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                            generation_config=config, **kwargs)

    # -- loading (sam_fast.models.loading) ---------------------------------------------------
    @classmethod
    def from_instructblip(cls, path_or_model, **kwargs) -> "SAM":
        """SAM from an HF InstructBLIP directory (safetensors, sharded too) or an in-memory
        `InstructBlipForConditionalGeneration`; the three new modules start as in the paper (guidance
        Linears zero). Keyword arguments: loader options (`dtype`, `device`, `copy`, `strict`,
        `return_report`) and SAMConfig overrides (`context_mode=...`, ...). See
        `sam_fast.models.loading.from_instructblip`."""
        return loading.from_instructblip(cls, path_or_model, **kwargs)

    @classmethod
    def from_lavis_checkpoint(cls, path, config=None, *, base=None, **kwargs) -> "SAM":
        """SAM from a LAVIS InstructBLIP `.pth` or the authors' released SAM checkpoint (a LAVIS
        runner checkpoint; it implies context_mode="shared"), read with
        `torch.load(weights_only=True)`. `base` supplies the weights the file lacks: one source or
        a list of them (LAVIS `.pth` files, LAVIS' unprefixed `eva_vit_g.pth`, an HF LLM directory
        such as Vicuna-7B, an HF InstructBLIP / SAM directory, an in-memory model); later sources
        win, `path` wins over all. `config` (e.g. `SAMConfig.instructblip_vicuna7b()`) is needed
        unless a base carries one. The vision LayerNorm keeps LAVIS' eps 1e-5
        (`config.post_layernorm_eps`). Unknown, unexpected and missing keys, a component no source
        supplies and files that are not plain checkpoints raise one error naming the file
        (`strict=False`: unknown keys only warn). Keyword arguments: `strict`, `context_mode`,
        `dtype`, `device`, `copy`, `return_report`. See
        `sam_fast.models.loading.from_lavis_checkpoint`."""
        return loading.from_lavis_checkpoint(cls, path, config, base=base, **kwargs)

    def save_trainable_delta(self, directory, base_reference: str):
        """Save config + only the trainable tensors (`sam_delta.safetensors`) + a reference to the
        base weights (`sam_delta.json`); `SAM.from_pretrained(directory)` loads it back."""
        return loading.save_trainable_delta(self, directory, base_reference)

    @classmethod
    def from_trainable_delta(cls, directory, base=None, **kwargs) -> "SAM":
        """Load the base model then the trainable delta saved by `save_trainable_delta`."""
        return loading.load_trainable_delta(cls, directory, base=base, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "SAM":
        """HF `from_pretrained` for full SAM directories; a trainable-delta directory (from
        `save_trainable_delta` or `sam_fast.train.hf.SAMTrainer`) is detected and loaded over its
        base (``base=`` overrides the recorded one; the directory's own config.json is used, so a
        ``config`` passed by `AutoModel.from_pretrained` is not needed there). A `sam-fast train`
        output directory (``run.json``), or a checkpoint inside it, loads its base with the newest
        intact checkpoint (or that checkpoint), as ``sam-fast generate --model RUN`` does."""
        local = isinstance(pretrained_model_name_or_path, (str, os.PathLike))
        if local and loading.is_trainable_delta_dir(pretrained_model_name_or_path):
            for key in _HUB_KWARGS:  # what AutoModel.from_pretrained adds; a delta directory is local
                kwargs.pop(key, None)
            return loading.load_trainable_delta(cls, pretrained_model_name_or_path, *args, **kwargs)
        found = run_dir.run_location(pretrained_model_name_or_path) if local else None
        if found is not None:
            if args:
                raise TypeError(f"{cls.__name__}.from_pretrained: a training output takes no positional model "
                                f"arguments (got {len(args)})")
            for key in _HUB_KWARGS:  # a run directory is local and has its own configs
                kwargs.pop(key, None)
            return run_dir.load_run(cls, *found, **kwargs)[0]
        # transformers >= 5.25 turns Hub kernels on by default: layers replaced by code fetched from
        # the Hub at run time, with other numerics. Off unless asked for by name.
        kwargs.setdefault("use_kernels", False)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.freeze_backbone()
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isfile(
                os.path.join(pretrained_model_name_or_path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path)
        return model


def _register_auto_models() -> None:
    """`AutoModel` (and the image-text-to-text auto class of this transformers, where it has one)
    build `SAM` for a folder whose config.json says ``model_type: sam_fast``."""
    import transformers

    AutoModel.register(SAMConfig, SAM, exist_ok=True)
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, name, None)
        if auto is not None:
            auto.register(SAMConfig, SAM, exist_ok=True)


_register_auto_models()
