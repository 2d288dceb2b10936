"""Counting host reads: the tensor operations that copy a value to the host.

On a GPU each of them waits for every queued kernel (the pipeline drains) and none may run while a
CUDA graph is captured; on the CPU the tests run on they cost nothing, so they are counted instead
of timed. `HostReads` is a `TorchFunctionMode` that counts, by name, the calls of the tensor methods
and torch functions that read a value back (``item``, ``tolist``, ``__bool__``, ``nonzero``, ...,
and indexing with a boolean mask, whose size is data).
"""

from __future__ import annotations

import collections

import torch
from torch.overrides import TorchFunctionMode

# methods / functions whose result is a host value or has a data-dependent size
READS = frozenset({
    "item", "tolist", "__bool__", "__int__", "__index__", "__float__", "__complex__", "nonzero", "argwhere",
    "masked_select", "unique", "unique_consecutive", "cpu", "numpy", "__array__", "equal", "allclose",
    "is_nonzero", "bincount",
})


def _bool_index(args) -> bool:
    """Whether an index argument (of ``__getitem__`` / ``__setitem__``) holds a boolean tensor."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype in (torch.bool, torch.uint8) for p in parts)


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: ...`` counts the host reads of the block: ``reads.total`` and
    ``reads.counts`` ({name: calls}); ``reads.where`` keeps a short stack per read for the message
    of a failing test."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.where: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name in ("__getitem__", "__setitem__") and _bool_index(args)):
            self.counts[name] += 1
            self.where.append(_caller(name))
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        return f"{dict(self.counts)} at\n" + "\n".join(self.where)


def _caller(name: str) -> str:
    """``name`` at the innermost frame outside torch and this module (the code that read)."""
    import traceback

    here = __file__
    frames = [f for f in traceback.extract_stack() if f.filename != here and "/torch/" not in f.filename]
    f = frames[-1] if frames else None
    return f"  {name}: {f.filename}:{f.lineno} {f.name}" if f else f"  {name}"


def assert_same_plan(got, want) -> None:
    """Two pack plans (`sam_fast.data.PackPlan`) hold the same fields: equal tensors (dtype too) and
    equal host values."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key in want:
        a, b = got[key], want[key]
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), (key, a, b)
        else:
            assert tuple(a) == tuple(b) if isinstance(b, tuple) else a == b, (key, a, b)
