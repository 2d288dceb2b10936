"""The op boundary: every hot spot of SAM goes through a function here.

Modules call these functions; they dispatch to compiled kernels (`sam_fast._C`, `sam_fast._kernels`)
or to the plain-PyTorch reference beside each op (`*_ref`), which is also the specification.
"""

from sam_fast.ops.context_reweight import context_reweight, context_reweight_ref
from sam_fast.ops.cross_attention import (
    MixPlan,
    cross_attention,
    cross_attention_ref,
    cross_attention_streams,
    cross_attention_streams_ref,
    mix_kv,
    streams_backend,
)
from sam_fast.ops.dispatch import BackendUnavailable, explain
from sam_fast.ops.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_backend,
    linear_cross_entropy_ref,
)
from sam_fast.ops.llama import rms_norm, rms_norm_ref, swiglu, swiglu_ref

__all__ = [
    "BackendUnavailable",
    "MixPlan",
    "context_reweight",
    "context_reweight_ref",
    "cross_attention",
    "cross_attention_ref",
    "cross_attention_streams",
    "cross_attention_streams_ref",
    "explain",
    "linear_cross_entropy",
    "linear_cross_entropy_backend",
    "linear_cross_entropy_ref",
    "mix_kv",
    "rms_norm",
    "rms_norm_ref",
    "streams_backend",
    "swiglu",
    "swiglu_ref",
]
