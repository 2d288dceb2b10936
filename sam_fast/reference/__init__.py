"""Slow, obviously correct implementations written straight from the paper, for tests only.
Nothing in the model's hot path imports this package."""

from sam_fast.reference.sam_reference import reference_encode_images, reference_merged_map

__all__ = ["reference_encode_images", "reference_merged_map"]
