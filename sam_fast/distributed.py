"""Data parallelism for the trainer and the evaluation (torchrun; gloo on CPU, NCCL on GPUs); also
`is_sharded` for the model. Imports nothing from sam_fast, so every layer may use it.

Gradients. Only SAM's 4.3M trainable parameters get gradients, so instead of wrapping the model in
`DistributedDataParallel` (which would insist that every trainable module is used by every batch:
a batch of one-image samples leaves the guidance modules unused) the trainer all-reduces the
gradients itself, once per optimiser step, in one flat fp32 bucket. Each rank's loss is a sum
over its answer tokens divided by the token count of the *global* batch, so the summed gradients
equal those of one process running the whole global batch.

FSDP (``TrainConfig(fsdp=True)``, ``sam-fast train --fsdp`` under torchrun). Data parallelism
alone keeps a full copy of the frozen LLM on every GPU (Vicuna-7B: 13.5 GB in fp16, 27 GB in
fp32). `shard_language_model` applies FSDP2 (`torch.distributed.fsdp.fully_shard`) to
``model.language_model``: each decoder layer is one FSDP unit, then the LLM root (final norm,
``lm_head``), on a 1-D device mesh over all processes. Each rank then keeps 1/world of those
parameters; a unit's full parameters exist only while it runs (all-gathered before its forward,
freed after it, all-gathered again for the backward that carries the gradient back to the visual
tokens, freed again), so the LLM's resident memory per GPU is about its parameter bytes / world
size, plus one layer's full weights in flight (plus lm_head + norm, which the root keeps gathered
from forward to backward). For Vicuna-7B in fp16 on 4 GPUs: ~3.6 GB instead of 13.5 GB.

What it does not shard:
  * the LLM's input embedding table (``embed_tokens``, 2% of Vicuna-7B: 0.26 GB in fp16): SAM
    calls it *outside* the LLM's forward, to splice the visual tokens into the prompt embeddings,
    where an FSDP unit's parameters are still sharded (and a separately sharded embedding would
    run forward before the LLM root, which FSDP2 refuses); it is passed as ``ignored_params`` and
    stays replicated. With tied input/output embeddings ``lm_head`` is that same tensor and stays
    replicated too;
  * the four trainable modules (adaptive_adjustment, guidance_in, guidance_out,
    language_projection): replicated, their gradients summed by `all_reduce_grads` as without
    FSDP, so the optimiser, gradient clipping and checkpoints see plain tensors and checkpoints
    (trainable tensors only) are the same files with or without FSDP;
  * the frozen vision model and Q-former (~1.2B parameters in InstructBLIP-7B; cache their
    outputs with ``sam-fast cache-features`` to skip the ViT), activations and optimiser state
    (the latter is tiny: 4.3M parameters).
The LLM must be frozen (FSDP's own gradient reduce-scatter is not used) and a decoder-only model
whose layers sit at ``.model.layers`` (LLaMA/Vicuna, Mistral, Qwen ...) or ``.model.decoder.layers``
(OPT); anything else is refused with the reason. Every rank must run the LLM the same number of
times per step (the all-gathers are collectives): the trainer makes a rank whose micro-batch lost
all its samples (``--skip-bad``) run a stand-in batch with zero loss weight. On CPUs FSDP2 works
with gloo (tested: 2 processes give the losses and weights of one); it saves memory, not time
(every layer's weights cross the interconnect twice per micro-batch).

Evaluation is data parallel without FSDP: each rank holds a full model and generates for samples
rank, rank + world, ... (`shard_indices`); rank 0 gathers the predictions (`gather_objects`).
Beam search runs a data-dependent number of LLM forwards per batch (it stops when its beams are
done), so ranks generating different samples would call a sharded LLM's all-gathers a different
number of times and deadlock.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

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
        # on GPUs NCCL for CUDA tensors (gradients, FSDP's all-gathers) and gloo for the small CPU
        # tensors the trainer reduces (token counts, losses): NCCL alone refuses CPU tensors
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo")
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


# -- leaving a torchrun run -------------------------------------------------------------------
_left_group = False


def leave_process_group(together: bool = True) -> None:
    """Tear down the default process group: a barrier first when `together` (every rank finished
    its collectives, so no peer is still talking to this one), then ``destroy_process_group``.
    After this, end the process with `exit_process` (see there why)."""
    global _left_group
    if not (dist.is_available() and dist.is_initialized()):
        return
    if together:
        dist.barrier()
    dist.destroy_process_group()
    _left_group = True


def left_process_group() -> bool:
    """Whether `leave_process_group` tore a group down in this process (then use `exit_process`)."""
    return _left_group


def exit_process(code: int | str | None = 0) -> NoReturn:
    """End this process now with `code` (as ``sys.exit`` reads it), without the interpreter's
    finalization; atexit handlers run and stdout, stderr and logging are flushed first.

    Why not a normal exit: FSDP2 (``fully_shard``) keeps references to the gloo process group, whose
    threads (``gloo_tcp_loop``, ``pt_gloo_runloop``) then outlive ``destroy_process_group()``. A runloop
    thread that drops the last reference to a Python-owned tensor while the interpreter finalizes
    must take the GIL; CPython ends such a thread with ``pthread_exit``, the forced unwind meets a
    ``noexcept`` frame and ``std::terminate`` aborts the process ("terminate called without an active
    exception", SIGABRT) after all its work is done, so torchrun reports a failed run. ``os._exit``
    ends every thread at once, unwinding none."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        atexit._run_exitfuncs()  # what a normal exit runs before finalizing
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing left to save
                pass
        os._exit(code)


# -- FSDP for the frozen LLM ------------------------------------------------------------------
def _decoder_layers(llm: torch.nn.Module) -> torch.nn.ModuleList:
    for path in ("model.layers", "model.decoder.layers"):
        mod = llm
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            return mod
    raise ValueError(f"fsdp: cannot find the decoder layers of the language model ({type(llm).__name__}: looked "
                     "for .model.layers and .model.decoder.layers); train without --fsdp")


def local_numel(module: torch.nn.Module) -> tuple[int, int]:
    """(elements of `module`'s parameters held by this rank, elements of the full parameters)."""
    from torch.distributed.tensor import DTensor

    here = total = 0
    for p in module.parameters():
        total += p.numel()
        here += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return here, total


def shard_language_model(model, info: DistInfo) -> dict:
    """Shard ``model.language_model`` over the ranks with FSDP2 (module docstring): each decoder
    layer, then the LLM root; the input embeddings stay replicated. Returns what this rank holds:
    ``{"world_size", "llm_parameters", "llm_local_parameters", "replicated"}``."""
    if not info.enabled:
        raise ValueError("fsdp needs several processes (it shards the LLM over them); launch with "
                         "`torchrun --nproc_per_node N -m sam_fast.cli train ... --fsdp`, or train without --fsdp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        raise ValueError("fsdp: the model is already sharded with fully_shard; pass it unsharded")
    llm = model.language_model
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"fsdp shards only a frozen language model, but language_model has trainable parameters "
                         f"{trainable[:3]}{' ...' if len(trainable) > 3 else ''}: freeze it (SAM.freeze_backbone) "
                         "or train without --fsdp")
    layers = _decoder_layers(llm)
    devices = {p.device for p in llm.parameters()}
    if devices != {info.device}:
        raise ValueError(f"fsdp: move the model to this rank's device {info.device} first (the language model is "
                         f"on {sorted(map(str, devices))})")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    embed = llm.get_input_embeddings().weight
    replicated = [n for n, p in llm.named_parameters(remove_duplicate=False) if p is embed]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(llm, mesh=mesh, ignored_params={embed})
    here, total = local_numel(llm)
    return {"world_size": info.world_size, "llm_parameters": total, "llm_local_parameters": here,
            "replicated": replicated}


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


# -- data-parallel evaluation -----------------------------------------------------------------
def shard_indices(n: int, info: DistInfo) -> list[int]:
    """This rank's share of n samples: rank, rank + world, rank + 2 world, ..."""
    return list(range(info.rank, n, info.world_size))


def gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for small results)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
