"""Index plans built on the host and moved to the device without a host-device sync: the image
plan of a ragged batch (`ImagePlan`) and the helper that moves a host list (`device_tensor`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from sam_fast.config import CONTEXT_MODES


def device_tensor(values: Sequence, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small tensor of host-known `values` (index plans built from the image counts) on
    `device`. On CUDA it goes through pinned memory with a non-blocking copy: a copy from pageable
    memory waits for all queued GPU work (e.g. the ViT) first, which would stall the host before
    it can queue the Q-former's launches. PyTorch's pinned allocator keeps the staging buffer
    alive until the copy has run."""
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.compiler.is_compiling():  # dynamo cannot trace pin_memory
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class ImagePlan:
    """Where every image of a ragged batch goes, built once on the host from the image counts
    (no device value is ever read back), like an unpadding plan: host lists plus the one index
    tensor every batch needs, already on the device. The W-stream's own index tensors are its
    schedule's (`sam_fast.modules.schedules`).

    An image gets a W-stream (Part B) when its sample has contextual images: in ``leave_one_out``
    mode (the paper) a sample of more than one image, in ``shared`` mode (the released code) every
    sample, a one-image sample being guided by its own image; none under ``guidance="none"``.

    Host: ``counts`` [B] images per sample, ``offsets`` [B+1] their prefix sums (cu_seqlens),
    ``context_mode``, ``targets`` [Tw] the images with a W-stream row, in image order (empty: no
    W-stream), ``image_samples`` [T] the sample of each image.
    Device: ``sample_of`` [T] long, ``image_samples`` on the device (the sample of each
    Q-stream row, one row per image).
    """

    counts: list[int]
    offsets: list[int]
    context_mode: str
    targets: tuple[int, ...]
    image_samples: tuple[int, ...]
    sample_of: torch.Tensor

    @classmethod
    def build(cls, counts: Sequence[int], context_mode: str, guidance: str, device) -> "ImagePlan":
        """The plan of a batch of ``len(counts)`` samples with ``counts[b] >= 1`` images each."""
        counts = [int(n) for n in counts]
        if not counts or min(counts) < 1:
            raise ValueError(f"ImagePlan: every sample needs >= 1 image, got counts {counts}")
        if context_mode not in CONTEXT_MODES:
            raise ValueError(f"ImagePlan: context_mode={context_mode!r} is not 'leave_one_out' or 'shared'")
        offsets = [0] + list(itertools.accumulate(counts))
        sample_of = tuple(b for b, n in enumerate(counts) for _ in range(n))
        has_context = [guidance != "none" and (context_mode == "shared" or n > 1) for n in counts]
        targets = tuple(t for t, b in enumerate(sample_of) if has_context[b])
        return cls(counts=counts, offsets=offsets, context_mode=context_mode, targets=targets,
                   image_samples=sample_of, sample_of=device_tensor(sample_of, device))

    @property
    def guided(self) -> bool:
        """Whether any image has a W-stream."""
        return bool(self.targets)

    @property
    def num_images(self) -> int:
        """T, the images of the batch."""
        return self.offsets[-1]
