"""Data parallelism for the trainer (torchrun; gloo on CPU, NCCL on GPUs).

Only SAM's 4.3M trainable parameters get gradients, so instead of wrapping the model in
`DistributedDataParallel` (which would insist that every trainable module is used by every batch:
a batch of one-image samples leaves the guidance modules unused) the trainer all-reduces the
gradients itself, once per optimiser step, in one flat fp32 bucket. Each rank's loss is a sum
over its answer tokens divided by the token count of the *global* batch, so the summed gradients
equal those of one process running the whole global batch.

FSDP (sharding the frozen 7B LLM over GPUs) is not implemented: on GPUs with < 40 GB, load the
backbone in bf16 (`SAM.from_instructblip(..., dtype=torch.bfloat16)`), cache the ViT features
(`image_features`), or shard `language_model` with `torch.distributed.fsdp.fully_shard` before
handing the model to `Trainer`; the trainer's gradient all-reduce only touches the four trainable
modules, which stay replicated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)
    return DistInfo(0, 1, 0, dev)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum the gradients of `params` over ranks in one flat bucket (missing grads count as zero)."""
    if not info.enabled:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
