"""SAM model and its checkpoint loading."""

from sam_fast.models.sam import SAM, SAMOutput, TRAINABLE_MODULES

__all__ = ["SAM", "SAMOutput", "TRAINABLE_MODULES"]
