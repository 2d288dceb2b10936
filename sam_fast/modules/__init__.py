"""Building blocks of SAM, between the ops and the model: the image plan of a ragged batch
(`ImagePlan`), Part B's `AdaptiveAdjustment` and the two injections (`GuidanceIn`, `GuidanceOut`),
the Q-former run as two streams (`WFormer`), and the W-stream's schedules (`SharedSchedule`,
`LeaveOneOutMaterialised`, `LeaveOneOutInKernel`, chosen once per model by `choose_w_schedule`)."""

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
from sam_fast.modules.schedules import (
    LeaveOneOutInKernel,
    LeaveOneOutMaterialised,
    SharedSchedule,
    WSchedule,
    choose_w_schedule,
)

__all__ = [
    "AdaptiveAdjustment",
    "CrossKV",
    "GuidanceIn",
    "GuidanceOut",
    "ImagePlan",
    "LayerKV",
    "LeaveOneOutInKernel",
    "LeaveOneOutMaterialised",
    "SharedSchedule",
    "WFormer",
    "WSchedule",
    "WStream",
    "attention_bias",
    "choose_w_schedule",
    "device_tensor",
    "leave_one_out_mix",
    "merged_context_kv",
    "merged_context_maps",
    "project_cross_kv",
    "qformer_layer",
]
