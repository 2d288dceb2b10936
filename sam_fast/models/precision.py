"""The frozen backbone in half precision, the trainable modules in float32 (``--dtype bf16|fp16|fp32``).

SAM trains 4.3M parameters over a frozen 7B backbone. `cast_frozen` casts the frozen parameters (ViT,
query tokens, Q-former, LLM) to bf16 or fp16, halving their memory, while the four
``TRAINABLE_MODULES`` stay float32 master weights: their gradients, the optimiser's moments and the
checkpoints stay float32 whatever the dtype. Buffers are left alone (the LLM's rotary ``inv_freq``
stays float32, as transformers loads it).

Such a model runs under `autocast`: `torch.autocast` in the frozen dtype, which casts at the
boundaries where half-precision activations meet a float32 trainable Linear (Adaptive Adjustment on
the ViT's features, the guidance Linears inside the Q-former, the language projection). Everything
else is the model's own handling, written for autocast (``E.to(x.dtype)`` into the Q-former,
``visual.to(embeds.dtype)`` into the LLM, the attention bias cast to the projections' dtype). Both
bf16 and fp16 run on a CPU too (slowly), so no dtype is refused there.
"""

from __future__ import annotations

import contextlib

import torch

from sam_fast.models.loading.common import TRAINABLE_MODULES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF = (torch.bfloat16, torch.float16)


def cast_frozen(model, dtype: str):
    """Cast `model`'s frozen parameters to `dtype` (a key of `DTYPES`) and its trainable modules to
    float32, in place (the same `Parameter` objects, so an optimiser built before stays valid);
    returns `model`. Under fp16 the modules the model keeps in float32 when loaded in fp16
    (``_keep_in_fp32_modules``: the query tokens) stay float32, as transformers keeps them."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r:.80} is not one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    trainable = {id(p) for name in TRAINABLE_MODULES for p in getattr(model, name).parameters()}
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or []) if target == torch.float16 else set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            want = torch.float32 if id(p) in trainable or name.split(".")[0] in keep else target
            if p.is_floating_point() and p.dtype != want:
                p.data = p.data.to(want)
    return model


def frozen_dtype(model) -> torch.dtype:
    """The dtype of the frozen LLM's weights (its input embeddings: replicated even under FSDP)."""
    return model.get_input_embeddings().weight.dtype


def autocast(model, device_type: str | None = None):
    """`torch.autocast` in the frozen weights' dtype when they are half precision and the trainable
    modules are not (a `cast_frozen` model), else a context that does nothing (a model all in one
    dtype runs as it always has)."""
    frozen, trained = frozen_dtype(model), model.language_projection.weight.dtype
    if frozen not in HALF or frozen == trained:
        return contextlib.nullcontext()
    return torch.autocast(device_type or model.language_projection.weight.device.type, dtype=frozen)
