"""Index plans built on the host and moved to the device without a host-device sync: the image
plan of a ragged batch (`ImagePlan`) and the helper that moves a host list (`device_tensor`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch


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
    (no device value is ever read back), like an unpadding plan: host lists plus the few index
    tensors the streams need, already on the device.

    A sample gets a W-stream (Part B) when it has contextual images: in ``leave_one_out`` mode
    (the paper) a sample of more than one image, in ``shared`` mode (the released code) every
    sample, a one-image sample being guided by its own image; none under ``guidance="none"``.

    Host: ``counts`` [B] images per sample, ``offsets`` [B+1] their prefix sums (cu_seqlens),
    ``context_mode``, ``guided`` (any W-stream at all).

    Device (long unless noted; None when there is no W-stream):

    - ``sample_of`` [T]: the sample of each image (the Q-stream rows, one per image).
    - ``cu`` [B+1] int32: ``offsets`` on the device (the re-weighting op's segments).
    - ``target`` [Tw]: the Q-stream row (image) each per-image W-stream row guides, image order.
    - ``w_samples`` [R0]: the sample of each W-stream row before layer l; shared mode runs them
      once per sample (dedup: every image of a sample sees the same I-hat there), leave_one_out
      once per guided image.
    - ``fan_out`` [Tw] or None: shared mode's dedup: per-image row j is deduplicated row
      ``fan_out[j]`` from layer l on (also the row of its merged K/V).
    - ``merged_rows`` or None: which rows of the materialised merged K/V (one per image in
      leave_one_out, one per sample in shared) the W-stream keeps; None: all of them.
    """

    counts: list[int]
    offsets: list[int]
    context_mode: str
    guided: bool
    sample_of: torch.Tensor
    cu: torch.Tensor | None = None
    target: torch.Tensor | None = None
    w_samples: torch.Tensor | None = None
    fan_out: torch.Tensor | None = None
    merged_rows: torch.Tensor | None = None

    @classmethod
    def build(cls, counts: Sequence[int], context_mode: str, guidance: str, device) -> "ImagePlan":
        """The plan of a batch of ``len(counts)`` samples with ``counts[b] >= 1`` images each."""
        counts = [int(n) for n in counts]
        if not counts or min(counts) < 1:
            raise ValueError(f"ImagePlan: every sample needs >= 1 image, got counts {counts}")
        if context_mode not in ("leave_one_out", "shared"):
            raise ValueError(f"ImagePlan: context_mode={context_mode!r} is not 'leave_one_out' or 'shared'")
        offsets = [0] + list(itertools.accumulate(counts))
        sample_of = [b for b, n in enumerate(counts) for _ in range(n)]
        shared = context_mode == "shared"
        has_context = [guidance != "none" and (shared or n > 1) for n in counts]
        base = dict(counts=counts, offsets=offsets, context_mode=context_mode, guided=any(has_context),
                    sample_of=device_tensor(sample_of, device))
        if not any(has_context):
            return cls(**base)
        target = [t for t, b in enumerate(sample_of) if has_context[b]]
        target_t = device_tensor(target, device)
        if shared:
            samples = [b for b in range(len(counts)) if has_context[b]]
            slot = {b: j for j, b in enumerate(samples)}
            w_samples = device_tensor(samples, device)
            fan_out = device_tensor([slot[sample_of[t]] for t in target], device)
            merged_rows = w_samples if len(samples) < len(counts) else None
        else:
            w_samples = device_tensor([sample_of[t] for t in target], device)
            fan_out = None
            merged_rows = target_t if len(target) < len(sample_of) else None
        return cls(**base, cu=device_tensor(offsets, device, torch.int32), target=target_t, w_samples=w_samples,
                   fan_out=fan_out, merged_rows=merged_rows)

    @property
    def num_images(self) -> int:
        """T, the images of the batch."""
        return self.offsets[-1]
