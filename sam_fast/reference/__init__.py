"""Slow, obviously correct implementations written straight from the paper, for tests only, and
the released code's schedule and its list-based beam search, the benchmark baselines. Nothing in
the model's hot path imports this package."""

from sam_fast.reference.lavis_decoder import reference_lavis_generate
from sam_fast.reference.released_schedule import released_schedule_encode_images
from sam_fast.reference.sam_reference import reference_encode_images, reference_merged_map

__all__ = ["reference_encode_images", "reference_lavis_generate", "reference_merged_map",
           "released_schedule_encode_images"]
