"""Triton kernels of context re-weighting (sam_fast.ops.context_reweight; the launchers, autograd and
torch.library registration live there). The math and its numerics: csrc/context_reweight_common.h.

Designed from the roofline: the op moves one read and one write of the values (forward) or two
reads and one write (backward) and does a few flops per element, so every kernel is a single
streaming pass over [T, P, D] with no serial per-image reduction in it. Three kinds of kernels:

1. `context_reweight_coef_kernel`, one program per (sample, block of patches), a lane per patch:
   from the scores SC [T, P] (fp32) the per-(image, patch) coefficients COEF [T, P, 4] and the
   per-(sample, patch) rows IDX [B, P, 2] (argmax i1, runner-up i2, local indices). With e_k =
   exp(s_k - m1) (m1, m2 the top-2 scores), Z = sum_k e_k:
     shared:        COEF[k] = (a_k = e_k / Z, 0, 0)
     leave_one_out: COEF[k] = (e_k, 1 / Z_k with Z_k = Z - e_k (0 at i1), a_{i1,k} = exp(s_k - m2) /
                    sum_{m != i1} exp(s_m - m2) (0 at i1)).
   For k != i1, e_k <= 1 = e_i1 <= Z_k, so Z - e_k loses nothing and the outputs
   y_k = (S - e_k V_k) / Z_k, S = sum_m e_m V_m, add at most ~eps |V| (no catastrophic
   cancellation: that needs e_k V_k to dominate S, i.e. k = i1, whose output is the direct sum
   y_i1 = sum_m a_{i1,m} V_m). A column (sample, patch) with a non-finite score gets NaN
   coefficients: every output and gradient of it is then NaN by arithmetic, with no branch.
2. `context_reweight_fwd_kernel` / `context_reweight_bwd_kernel`, one program per (sample, patch)
   x a block of BLOCK_D channels: the sample's images come in chunks of NB rows, a [NB, BLOCK_D]
   tile each. A sample of up to NB images (the launcher sizes NB to the batch) is loaded once, and
   every output row is formed from that register tile and written: one read, one write. A bigger
   sample takes a second pass over its chunks, re-read from L2. Rows, columns and images past the
   edge are masked (BLOCK_D need not divide D).
   The backward writes dV and, per channel block, the partial channel sums of the score gradient's
   dot products to PART [NCB, T, P, 4] (values shifted by the argmax row, so that a saturated
   softmax gives its tiny score gradients accurately; csrc/context_reweight_common.h):
     shared:        p_k = g . (x_k - x_i1)
     leave_one_out: q_k = (x_k - x_i1) . (H - g_k / Z_k)   with H = sum_i g_i / Z_i,
                    c_k = g_k . (y_k - x_i1),  p1_k = g_i1 . (x_k - x_i2).
3. `context_reweight_dscore_kernel`, one program per (sample, block of patches): sums PART over the
   channel blocks in block order (fixed order, no atomics: bitwise reproducible) and forms
     shared:        ds_k = a_k (p_k - sum_m a_m p_m)
     leave_one_out: ds_k = e_k (q_k - sum_{i != k} c_i / Z_i) + a_{i1,k} (p1_k - sum_m a_{i1,m} p1_m)
   the "sum over all but k" summed directly (no total minus the own term).

No value written by a kernel is read back by the same kernel (nothing passes between threads
except through tl.sum): no barrier is needed anywhere. Loads are cast to fp32 right away (bf16
arithmetic is also broken in the CPU interpreter); no index is ever taken from a comparison that
NaN could leave unset: the argmax rows start at 0.
"""

import triton
import triton.language as tl

from sam_fast._kernels._common import _span

# Initial running maxima: finite, so that no inf - inf appears even in the branch a tl.where drops,
# and the most negative float, so that every finite score is >= it (an initial -1e38 left the
# softmax of a column whose scores are all below -1e38 at zero).
NEG_BIG = tl.constexpr(-3.4028234663852886e38)  # a constexpr object: a bare annotated float is not visible inside @jit on a GPU
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |s| <= FLT_MAX: finite (false for NaN and inf)
NCOEF = tl.constexpr(4)  # floats per (image, patch) in COEF and PART (the fourth is padding)


@triton.jit
def _sample(CU, b):
    """(first image as int64, image count) of sample b."""
    t0 = tl.load(CU + b).to(tl.int64)
    n = (tl.load(CU + b + 1).to(tl.int64) - t0).to(tl.int32)
    return t0, n


@triton.jit
def _top2(SC, t0, n, P, rows, rmask, BLOCK_P: tl.constexpr):
    """Per patch lane: the top two scores (m1 at local image i1, m2 at i2) and whether any score is
    not finite. i1 and i2 are valid images (0) even when no comparison succeeds (NaN, -inf)."""
    m1 = tl.full([BLOCK_P], NEG_BIG, tl.float32)
    m2 = tl.full([BLOCK_P], NEG_BIG, tl.float32)
    i1 = tl.zeros([BLOCK_P], tl.int32)
    i2 = tl.zeros([BLOCK_P], tl.int32)
    nonfinite = tl.zeros([BLOCK_P], tl.int32)
    for k in range(0, n):
        s = tl.load(SC + (t0 + k) * P + rows, mask=rmask, other=0.0)
        nonfinite += tl.where(tl.abs(s) <= FLT_MAX, 0, 1)
        new1 = s > m1
        new2 = (s <= m1) & (s > m2)  # a tie with m1 lands here: m2 == m1, as in the C++ Top2
        m2 = tl.where(new1, m1, tl.where(new2, s, m2))
        i2 = tl.where(new1, i1, tl.where(new2, k, i2))
        m1 = tl.where(new1, s, m1)
        i1 = tl.where(new1, k, i1)
    return m1, i1, m2, i2, nonfinite > 0


@triton.jit
def context_reweight_coef_kernel(SC, CU, COEF, IDX, P, SHARED: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    t0, n = _sample(CU, b)
    rows, rmask = _span(tl.program_id(1), P, BLOCK_P)
    m1, i1, m2, i2, bad = _top2(SC, t0, n, P, rows, rmask, BLOCK_P)
    z = tl.zeros([BLOCK_P], tl.float32)
    z2 = tl.zeros([BLOCK_P], tl.float32)  # normaliser of i1's own output, relative to m2
    for k in range(0, n):
        s = tl.load(SC + (t0 + k) * P + rows, mask=rmask, other=0.0)
        z += tl.exp(s - m1)
        z2 += tl.where(k == i1, 0.0, tl.exp(tl.minimum(s - m2, 0.0)))  # (> 0 only where dropped)
    inv_z = 1.0 / tl.where(z > 0, z, 1.0)
    inv_z2 = tl.where(z2 > 0, 1.0 / tl.where(z2 > 0, z2, 1.0), 0.0)  # 0: a one-image sample
    for k in range(0, n):
        s = tl.load(SC + (t0 + k) * P + rows, mask=rmask, other=0.0)
        e = tl.exp(s - m1)
        own = k == i1
        if SHARED:
            c0, c1, c2 = e * inv_z, tl.zeros_like(e), tl.zeros_like(e)
        else:
            c0 = e
            c1 = tl.where(own, 0.0, 1.0 / tl.where(own, 1.0, z - e))
            c2 = tl.where(own, 0.0, tl.exp(tl.minimum(s - m2, 0.0)) * inv_z2)
        dst = COEF + ((t0 + k) * P + rows) * NCOEF
        tl.store(dst, tl.where(bad, float("nan"), c0), mask=rmask)
        tl.store(dst + 1, tl.where(bad, float("nan"), c1), mask=rmask)
        tl.store(dst + 2, tl.where(bad, float("nan"), c2), mask=rmask)
    tl.store(IDX + (b * P + rows) * 2, i1, mask=rmask)
    tl.store(IDX + (b * P + rows) * 2 + 1, i2, mask=rmask)


@triton.jit
def _column(CU, IDX, P, D, BLOCK_D: tl.constexpr):
    """This program's (sample, patch) column and channel block: (t0, n, patch j, i1, i2, int64
    channels, channel mask, int64 offset of image row 0 of the column in a [T, P, D] tensor)."""
    col = tl.program_id(0)
    b = col // P
    j = col % P
    t0, n = _sample(CU, b)
    cols, cmask = _span(tl.program_id(1), D, BLOCK_D)
    i1 = tl.load(IDX + col.to(tl.int64) * 2)
    i2 = tl.load(IDX + col.to(tl.int64) * 2 + 1)
    return t0, n, j, i1, i2, cols, cmask


@triton.jit
def _chunk(t0, c0, n, j, P, D, cols, cmask, NB: tl.constexpr):
    """Images c0 .. c0+NB-1 of the sample in the column: (local image k [NB], its mask, int64 row
    (t0 + k) * P + j into [T, P] tensors, int64 [NB, BLOCK_D] offsets into [T, P, D], 2-D mask)."""
    k = c0 + tl.arange(0, NB)
    kmask = k < n
    row = (t0 + k) * P + j
    offs = row[:, None] * D + cols[None, :]
    return k, kmask, row, offs, kmask[:, None] & cmask[None, :]


@triton.jit
def _coef(COEF, row, kmask, SLOT: tl.constexpr):
    return tl.load(COEF + row * NCOEF + SLOT, mask=kmask, other=0.0)


@triton.jit
def _load(X, offs, mask):
    return tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def context_reweight_fwd_kernel(
    V, COEF, IDX, CU, OUT, P, D,
    SHARED: tl.constexpr, NB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t0, n, j, i1, i2, cols, cmask = _column(CU, IDX, P, D, BLOCK_D)
    S = tl.zeros([BLOCK_D], tl.float32)  # sum_k w_k V_k (w = a in shared, e in leave_one_out)
    S1 = tl.zeros([BLOCK_D], tl.float32)  # i1's own output: sum_k a_{i1,k} V_k
    x = tl.zeros([NB, BLOCK_D], tl.float32)
    for c0 in range(0, n, NB):
        k, kmask, row, offs, mask = _chunk(t0, c0, n, j, P, D, cols, cmask, NB)
        x = _load(V, offs, mask)
        S += tl.sum(_coef(COEF, row, kmask, 0)[:, None] * x, axis=0)
        if not SHARED:
            S1 += tl.sum(_coef(COEF, row, kmask, 2)[:, None] * x, axis=0)
    if SHARED:
        out = (tl.program_id(0).to(tl.int64) // P) * P + j  # output row b * P + j
        tl.store(OUT + out * D + cols, S.to(OUT.dtype.element_ty), mask=cmask)
    else:
        for c0 in range(0, n, NB):
            k, kmask, row, offs, mask = _chunk(t0, c0, n, j, P, D, cols, cmask, NB)
            if n > NB:  # else x still holds the only chunk
                x = _load(V, offs, mask)
            e = _coef(COEF, row, kmask, 0)
            inv_z = _coef(COEF, row, kmask, 1)
            y = (S[None, :] - e[:, None] * x) * inv_z[:, None]
            y = tl.where((k == i1)[:, None], S1[None, :], y)
            tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_shared(G, V, COEF, DV, part, t0, n, j, i1, P, D, cols, cmask,
                VALUES_GRAD: tl.constexpr, NB: tl.constexpr):
    """Shared mode: dV_k = a_k g and the partial p_k = g . (x_k - x_i1) of every image k."""
    out = (tl.program_id(0).to(tl.int64) // P) * P + j
    live = cmask & (n > 0)  # (an empty sample has no row i1 to read)
    g = tl.load(G + out * D + cols, mask=cmask, other=0.0).to(tl.float32)
    x1 = tl.load(V + ((t0 + i1) * P + j) * D + cols, mask=live, other=0.0).to(tl.float32)
    for c0 in range(0, n, NB):
        k, kmask, row, offs, mask = _chunk(t0, c0, n, j, P, D, cols, cmask, NB)
        x = _load(V, offs, mask)
        tl.store(part + row * NCOEF, tl.sum(g[None, :] * (x - x1[None, :]), axis=1), mask=kmask)
        if VALUES_GRAD:
            dv = _coef(COEF, row, kmask, 0)[:, None] * g[None, :]
            tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_loo(G, V, COEF, DV, part, t0, n, j, i1, i2, P, D, cols, cmask,
             VALUES_GRAD: tl.constexpr, NB: tl.constexpr, BLOCK_D: tl.constexpr):
    """Leave-one-out: dV_k = e_k (H - g_k / Z_k) + a_{i1,k} g_i1 and the partials q_k, c_k, p1_k
    (module docstring) of every image k."""
    live = cmask & (n > 0)  # (an empty sample has no row i1 to read)
    x1 = tl.load(V + ((t0 + i1) * P + j) * D + cols, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(V + ((t0 + i2) * P + j) * D + cols, mask=live, other=0.0).to(tl.float32)
    g1 = tl.load(G + ((t0 + i1) * P + j) * D + cols, mask=live, other=0.0).to(tl.float32)
    H = tl.zeros([BLOCK_D], tl.float32)  # sum_i g_i / Z_i (i1 excluded: its 1/Z is 0)
    Ssh = tl.zeros([BLOCK_D], tl.float32)  # sum_m e_m (x_m - x_i1)
    x = tl.zeros([NB, BLOCK_D], tl.float32)
    g = tl.zeros([NB, BLOCK_D], tl.float32)
    for c0 in range(0, n, NB):
        k, kmask, row, offs, mask = _chunk(t0, c0, n, j, P, D, cols, cmask, NB)
        x = _load(V, offs, mask)
        g = _load(G, offs, mask)
        H += tl.sum(_coef(COEF, row, kmask, 1)[:, None] * g, axis=0)
        Ssh += tl.sum(_coef(COEF, row, kmask, 0)[:, None] * (x - x1[None, :]), axis=0)
    for c0 in range(0, n, NB):
        k, kmask, row, offs, mask = _chunk(t0, c0, n, j, P, D, cols, cmask, NB)
        if n > NB:  # else x and g still hold the only chunk
            x = _load(V, offs, mask)
            g = _load(G, offs, mask)
        e = _coef(COEF, row, kmask, 0)[:, None]
        inv_z = _coef(COEF, row, kmask, 1)[:, None]
        xs = x - x1[None, :]
        h = H[None, :] - inv_z * g  # sum_{i != k} g_i / Z_i
        ysh = (Ssh[None, :] - e * xs) * inv_z  # y_k - x_i1 (k != i1)
        tl.store(part + row * NCOEF, tl.sum(xs * h, axis=1), mask=kmask)
        tl.store(part + row * NCOEF + 1, tl.sum(g * ysh, axis=1), mask=kmask)
        tl.store(part + row * NCOEF + 2, tl.sum(g1[None, :] * (x - x2[None, :]), axis=1), mask=kmask)
        if VALUES_GRAD:
            dv = e * h + _coef(COEF, row, kmask, 2)[:, None] * g1[None, :]
            tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def context_reweight_bwd_kernel(
    G, V, COEF, IDX, CU, DV, PART, P, D, PART_STRIDE,
    SHARED: tl.constexpr, VALUES_GRAD: tl.constexpr, NB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t0, n, j, i1, i2, cols, cmask = _column(CU, IDX, P, D, BLOCK_D)
    part = PART + tl.program_id(1).to(tl.int64) * PART_STRIDE  # this channel block's partials
    if SHARED:
        _bwd_shared(G, V, COEF, DV, part, t0, n, j, i1, P, D, cols, cmask, VALUES_GRAD, NB)
    else:
        _bwd_loo(G, V, COEF, DV, part, t0, n, j, i1, i2, P, D, cols, cmask, VALUES_GRAD, NB, BLOCK_D)


@triton.jit
def _tile(t0, c0, n, rows, rmask, P, NB: tl.constexpr):
    """Images c0 .. c0+NB-1 x patch lanes `rows`: (int64 [NB, BLOCK_P] rows into [T, P], mask)."""
    k = c0 + tl.arange(0, NB)
    return (t0 + k)[:, None] * P + rows[None, :], (k < n)[:, None] & rmask[None, :]


@triton.jit
def _part_sum(PART, row, mask, NCB, PART_STRIDE, SLOT: tl.constexpr):
    """Slot SLOT of the partials of `row`, summed over the NCB channel blocks in block order."""
    acc = tl.zeros(row.shape, tl.float32)
    ptr = PART + row * NCOEF + SLOT
    for _ in range(0, NCB):
        acc += tl.load(ptr, mask=mask, other=0.0)
        ptr += PART_STRIDE
    return acc


@triton.jit
def _sum_but_self(v, NB: tl.constexpr):
    """out[k] = sum_{i != k} v[i] over axis 0 of v [NB, BLOCK_P], summed directly."""
    i = tl.arange(0, NB)
    keep = (i[:, None] != i[None, :])[:, :, None]
    return tl.sum(tl.where(keep, v[None, :, :], 0.0), axis=1)


@triton.jit
def _ds_loo(COEF, PART, t0, n, c0, rows, rmask, P, NCB, PART_STRIDE, NB: tl.constexpr):
    """Leave-one-out score gradients of images c0 .. c0+NB-1 (module docstring)."""
    row, mask = _tile(t0, c0, n, rows, rmask, P, NB)
    q = _part_sum(PART, row, mask, NCB, PART_STRIDE, 0)
    p1 = _part_sum(PART, row, mask, NCB, PART_STRIDE, 2)
    c1 = tl.zeros(rows.shape, tl.float32)  # sum_m a_{i1,m} p1_m
    c_but = tl.zeros(row.shape, tl.float32)  # sum_{i != k} c_i / Z_i
    for c2 in range(0, n, NB):
        row2, mask2 = _tile(t0, c2, n, rows, rmask, P, NB)
        c1 += tl.sum(_coef(COEF, row2, mask2, 2) * _part_sum(PART, row2, mask2, NCB, PART_STRIDE, 2), axis=0)
        v = _coef(COEF, row2, mask2, 1) * _part_sum(PART, row2, mask2, NCB, PART_STRIDE, 1)
        if c2 == c0:
            c_but += _sum_but_self(v, NB)
        else:
            c_but += tl.sum(v, axis=0)[None, :]
    e = _coef(COEF, row, mask, 0)
    return row, mask, e * (q - c_but) + _coef(COEF, row, mask, 2) * (p1 - c1[None, :])


@triton.jit
def _ds_shared(COEF, PART, t0, n, c0, rows, rmask, P, NCB, PART_STRIDE, NB: tl.constexpr):
    """Shared-mode score gradients of images c0 .. c0+NB-1: a_k (p_k - sum_m a_m p_m)."""
    row, mask = _tile(t0, c0, n, rows, rmask, P, NB)
    c = tl.zeros(rows.shape, tl.float32)
    for c2 in range(0, n, NB):
        row2, mask2 = _tile(t0, c2, n, rows, rmask, P, NB)
        c += tl.sum(_coef(COEF, row2, mask2, 0) * _part_sum(PART, row2, mask2, NCB, PART_STRIDE, 0), axis=0)
    p = _part_sum(PART, row, mask, NCB, PART_STRIDE, 0)
    return row, mask, _coef(COEF, row, mask, 0) * (p - c[None, :])


@triton.jit
def context_reweight_dscore_kernel(
    COEF, CU, PART, DS, P, NCB, PART_STRIDE,
    SHARED: tl.constexpr, NB: tl.constexpr, BLOCK_P: tl.constexpr,
):
    t0, n = _sample(CU, tl.program_id(0))
    rows, rmask = _span(tl.program_id(1), P, BLOCK_P)
    for c0 in range(0, n, NB):
        if SHARED:
            row, mask, ds = _ds_shared(COEF, PART, t0, n, c0, rows, rmask, P, NCB, PART_STRIDE, NB)
        else:
            row, mask, ds = _ds_loo(COEF, PART, t0, n, c0, rows, rmask, P, NCB, PART_STRIDE, NB)
        tl.store(DS + row, ds, mask=mask)
