"""Old import path of `sam_fast.distributed` (data parallelism and FSDP for training and evaluation),
kept so that code importing ``sam_fast.train.distributed`` keeps working."""

from sam_fast.distributed import (  # noqa: F401
    DistInfo,
    all_reduce_grads,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
    init_from_env,
    is_sharded,
    local_numel,
    shard_indices,
    shard_language_model,
)
