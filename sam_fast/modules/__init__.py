"""Building blocks of SAM, between the ops and the model: the image plan of a ragged batch
(`ImagePlan`), Part B's `AdaptiveAdjustment` and the two injections (`GuidanceIn`, `GuidanceOut`),
and the Q-former run as two streams (`WFormer`)."""

from sam_fast.modules.plans import ImagePlan, device_tensor
from sam_fast.modules.guidance import (
    AdaptiveAdjustment,
    GuidanceIn,
    GuidanceOut,
    leave_one_out_mix,
    merged_context_kv,
    merged_context_maps,
)
from sam_fast.modules.qformer import (
    CrossKV,
    LayerKV,
    WFormer,
    WStream,
    attention_bias,
    project_cross_kv,
    qformer_layer,
)

__all__ = [
    "AdaptiveAdjustment",
    "CrossKV",
    "GuidanceIn",
    "GuidanceOut",
    "ImagePlan",
    "LayerKV",
    "WFormer",
    "WStream",
    "attention_bias",
    "device_tensor",
    "leave_one_out_mix",
    "merged_context_kv",
    "merged_context_maps",
    "project_cross_kv",
    "qformer_layer",
]
