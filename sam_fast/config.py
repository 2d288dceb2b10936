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
"""

from __future__ import annotations

from transformers import (
    InstructBlipConfig,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
)

CONTEXT_MODES = ("leave_one_out", "shared")
GUIDANCE_MODES = ("adaptive", "mean", "none")


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
        recompute_qformer: in training, `SAM.encode_images` does not keep the frozen Q/W-former's
            activations for the backward but runs the two streams again there (default True: at
            the real model's proportions the streams are ~3% of a step's FLOPs but ~20% of its
            activation memory, held through the whole LLM step). False keeps them.
        **kwargs: everything `InstructBlipConfig` takes (vision_config, qformer_config,
            text_config, num_query_tokens, image_token_index, ...).

    Raises:
        ValueError: naming the offending value for an unknown mode or out-of-range layers.
    """

    model_type = "sam_fast"

    def __init__(
        self, context_mode="leave_one_out", guidance="adaptive", interaction_layers=None, post_layernorm_eps=None,
        packed_loss=True, recompute_qformer=True, **kwargs,
    ):
        self.packed_loss = bool(packed_loss)
        self.recompute_qformer = bool(recompute_qformer)
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
