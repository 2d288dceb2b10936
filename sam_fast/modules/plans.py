"""Index plans built on the host and moved to the device without a host-device sync."""

from __future__ import annotations

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
