"""Device helpers shared by the kernel files (bare ``@triton.jit`` functions, no kernels): the
prologue every kernel starts with, turning a program id into the indices and masks of its block.

Indices are int64, so that offsets computed from them never wrap (an activation of a long batch
passes 2^31 elements).
"""

import triton
import triton.language as tl


@triton.jit
def _span(pid, n, BLOCK: tl.constexpr):
    """Block `pid` of BLOCK consecutive indices of [0, n): (int64 indices, mask of those < n)."""
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < n


@triton.jit
def _row_block(pid, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program `pid`'s BLOCK_M rows of an [M, D] row-major tensor: (rows, cols, row mask, column
    mask, 2-D mask, int64 element offsets)."""
    rows, rmask = _span(pid, M, BLOCK_M)
    cols, cmask = _span(pid * 0, D, BLOCK_D)
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    return rows, cols, rmask, cmask, mask, offs
