"""Building blocks of SAM, between the ops and the model."""

from sam_fast.modules.guidance import merged_context_maps
from sam_fast.modules.qformer import attention_bias, qformer_layer, run_two_streams

__all__ = ["attention_bias", "merged_context_maps", "qformer_layer", "run_two_streams"]
