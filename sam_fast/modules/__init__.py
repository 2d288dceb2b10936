"""Building blocks of SAM, between the ops and the model."""

from sam_fast.modules.plans import device_tensor
from sam_fast.modules.guidance import leave_one_out_mix, merged_context_kv, merged_context_maps
from sam_fast.modules.qformer import (
    SCRATCH_COLUMNS,
    CrossKV,
    WStream,
    attention_bias,
    mix_in_kernel,
    project_cross_kv,
    qformer_layer,
    run_two_streams,
)

__all__ = [
    "SCRATCH_COLUMNS",
    "CrossKV",
    "WStream",
    "attention_bias",
    "device_tensor",
    "leave_one_out_mix",
    "merged_context_kv",
    "merged_context_maps",
    "mix_in_kernel",
    "project_cross_kv",
    "qformer_layer",
    "run_two_streams",
]
