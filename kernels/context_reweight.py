"""Triton kernels of context re-weighting (sam_fast.ops.context_reweight; the launchers, autograd and
torch.library registration live there). The math and its numerics: csrc/context_reweight_common.h.

One program = one sample b x a block of BLOCK_P patch rows x the whole value width (BLOCK_D =
next_pow2(D)); the grid (B, cdiv(P, BLOCK_P)) covers a ragged batch in one launch, each program
reading its sample's offsets from ``cu``. The scores SC [T, P] come in fp32; everything is
accumulated in fp32 (loads are cast right away: bf16 arithmetic is also broken in the CPU
interpreter).

Forward, one pass over the images, online: the running top-2 scores (m1 at i1, m2), the sum of
all images S = sum_k exp(s_k - m1) V_k with Z, and the sum of all images but the current argmax
S2 = sum_{k != i1} exp(s_k - m2) V_k with Z2 (when a new argmax arrives, the old S becomes S2).
Shared mode writes S / Z. Leave-one-out re-reads each V_i (cache-hot: the program just read it)
for y_i = (S - e_i V_i) / (Z - e_i), i != i1, and writes y_i1 = S2 / Z2. For i != i1 the removed
weight e_i <= 1 <= Z - e_i, so the subtraction adds at most ~eps |V_i| to y_i: no catastrophic
cancellation (that would need e_i V_i to dominate S, i.e. i = i1, which is the S2 case).

Non-finite input: a patch row whose scores are not all finite (NaN, +-inf) writes NaN for all its
outputs, NaN value gradients and NaN score gradients, as the other backends
(csrc/context_reweight_common.h). No index is ever taken from a comparison that NaN could leave
unset: the argmax rows start at 0.

Backward: per program the exact (direct) leave-one-out sums, with values shifted by the argmax row
(csrc/context_reweight_common.h) so a saturated softmax gives accurate tiny score gradients, which
go to DS [T, P]; each program writes only its own rows (no atomics: bitwise reproducible).
"""

import triton
import triton.language as tl

# Initial running maxima: finite, so that no inf - inf appears even in the branch a tl.where drops,
# and the most negative float, so that every finite score is >= it (an initial -1e38 left the
# softmax of a column whose scores are all below -1e38 at zero).
NEG_BIG = tl.constexpr(-3.4028234663852886e38)  # a constexpr object: a bare annotated float is not visible inside @jit on a GPU
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |s| <= FLT_MAX: finite (false for NaN and inf)


@triton.jit
def _column_block(b, CU, P, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sample b's images and this program's block of patch rows (axis 1 of the grid): (first image
    t0, image count n, rows, row mask, 2-D mask, int64 offsets of a [P, D] image)."""
    t0 = tl.load(CU + b).to(tl.int64)
    n = (tl.load(CU + b + 1).to(tl.int64) - t0).to(tl.int32)
    rows = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < P
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    return t0, n, rows, rmask, mask, offs


@triton.jit
def context_reweight_fwd_kernel(
    V, SC, CU, OUT, P, D,
    SHARED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    t0, n, rows, rmask, mask, offs = _column_block(b, CU, P, D, BLOCK_P, BLOCK_D)

    m1 = tl.full([BLOCK_P], NEG_BIG, tl.float32)
    m2 = tl.full([BLOCK_P], NEG_BIG, tl.float32)
    i1 = tl.full([BLOCK_P], -1, tl.int32)
    S = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    Z = tl.zeros([BLOCK_P], tl.float32)
    S2 = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    Z2 = tl.zeros([BLOCK_P], tl.float32)
    nonfinite = tl.zeros([BLOCK_P], tl.int32)  # > 0: a score of the row is NaN or inf
    for k in range(0, n):
        x = tl.load(V + (t0 + k) * P * D + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(SC + (t0 + k) * P + rows, mask=rmask, other=0.0)
        nonfinite += tl.where(tl.abs(s) <= FLT_MAX, 0, 1)
        new1 = s > m1
        m1n = tl.where(new1, s, m1)
        alpha = tl.exp(m1 - m1n)
        es = tl.exp(s - m1n)
        if not SHARED:
            new2 = (s <= m1) & (s > m2)
            m2n = tl.where(new1, m1, tl.where(new2, s, m2))
            beta = tl.where(new1, 0.0, tl.exp(m2 - m2n))  # new1: unused (S2 := S)
            e2 = tl.where(new1, 0.0, tl.exp(tl.minimum(s - m2n, 0.0)))  # (<= 0 unless dropped)
            S2 = tl.where(new1[:, None], S, S2 * beta[:, None] + e2[:, None] * x)
            Z2 = tl.where(new1, Z, Z2 * beta + e2)
            i1 = tl.where(new1, k, i1)
            m2 = m2n
        S = S * alpha[:, None] + es[:, None] * x
        Z = Z * alpha + es
        m1 = m1n

    bad = (nonfinite > 0)[:, None]
    if SHARED:
        inv = tl.where(Z > 0, 1.0 / tl.where(Z > 0, Z, 1.0), 0.0)
        y = tl.where(bad, float("nan"), S * inv[:, None])
        tl.store(OUT + b * P * D + offs, y.to(OUT.dtype.element_ty), mask=mask)
    else:
        inv2 = tl.where(Z2 > 0, 1.0 / tl.where(Z2 > 0, Z2, 1.0), 0.0)
        y1 = S2 * inv2[:, None]
        for i in range(0, n):
            x = tl.load(V + (t0 + i) * P * D + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(SC + (t0 + i) * P + rows, mask=rmask, other=0.0)
            e = tl.where(i == i1, 0.0, tl.exp(s - m1))
            den = tl.where(i == i1, 1.0, Z - e)
            y = (S - e[:, None] * x) / den[:, None]
            y = tl.where((i == i1)[:, None], y1, y)
            y = tl.where(bad, float("nan"), y)
            tl.store(OUT + (t0 + i) * P * D + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _image_grads(DV, DS, t, P, D, rows, rmask, offs, mask, gk, ds, bad, VALUES_GRAD: tl.constexpr):
    """The gradients of image row t (this program's patch rows): dV = G_k (NaN in non-finite rows)
    when VALUES_GRAD, and the score gradients ds."""
    if VALUES_GRAD:
        dx = tl.where(bad[:, None], float("nan"), gk)
        tl.store(DV + t * P * D + offs, dx.to(DV.dtype.element_ty), mask=mask)
    tl.store(DS + t * P + rows, ds, mask=rmask)


@triton.jit
def context_reweight_bwd_kernel(
    G, V, SC, CU, CWS, DV, DS, P, D,
    SHARED: tl.constexpr, VALUES_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    t0, n, rows, rmask, mask, offs = _column_block(b, CU, P, D, BLOCK_P, BLOCK_D)

    # Pass 1: the top two scores (m1 at i1, m2 at i2) per patch row.
    m1 = tl.full([BLOCK_P], NEG_BIG, tl.float32)
    m2 = tl.full([BLOCK_P], NEG_BIG, tl.float32)
    i1 = tl.zeros([BLOCK_P], tl.int32)
    i2 = tl.zeros([BLOCK_P], tl.int32)
    nonfinite = tl.zeros([BLOCK_P], tl.int32)  # > 0: NaN gradients for the row
    for k in range(0, n):
        s = tl.load(SC + (t0 + k) * P + rows, mask=rmask, other=0.0)
        nonfinite += tl.where(tl.abs(s) <= FLT_MAX, 0, 1)
        new1 = s > m1
        new2 = (s <= m1) & (s > m2)
        m2 = tl.where(new1, m1, tl.where(new2, s, m2))
        i2 = tl.where(new1, i1, tl.where(new2, k, i2))
        m1 = tl.where(new1, s, m1)
        i1 = tl.where(new1, k, i1)
    # Rows of the argmax (and of the runner-up): the shifts that keep saturated ds accurate.
    x1 = tl.load(V + (t0 + i1.to(tl.int64))[:, None] * P * D + offs, mask=mask & (n > 0), other=0.0).to(tl.float32)
    x2 = tl.load(V + (t0 + i2.to(tl.int64))[:, None] * P * D + offs, mask=mask & (n > 1), other=0.0).to(tl.float32)

    bad = nonfinite > 0
    if SHARED:
        g = tl.load(G + b * P * D + offs, mask=mask, other=0.0).to(tl.float32)
        Z = tl.zeros([BLOCK_P], tl.float32)
        for k in range(0, n):
            s = tl.load(SC + (t0 + k) * P + rows, mask=rmask, other=0.0)
            Z += tl.exp(s - m1)
        invz = tl.where(Z > 0, 1.0 / tl.where(Z > 0, Z, 1.0), 0.0)
        c = tl.zeros([BLOCK_P], tl.float32)  # g . (y - x_i1)
        for k in range(0, n):
            x = tl.load(V + (t0 + k) * P * D + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(SC + (t0 + k) * P + rows, mask=rmask, other=0.0)
            p = tl.sum(g * (x - x1), axis=1)
            tl.store(CWS + (t0 + k) * P + rows, p, mask=rmask)
            c += tl.exp(s - m1) * invz * p
        for k in range(0, n):
            s = tl.load(SC + (t0 + k) * P + rows, mask=rmask, other=0.0)
            p = tl.load(CWS + (t0 + k) * P + rows, mask=rmask, other=0.0)
            a = tl.exp(s - m1) * invz
            ds = tl.where(rmask, tl.where(bad, float("nan"), a * (p - c)), 0.0)
            _image_grads(DV, DS, t0 + k, P, D, rows, rmask, offs, mask, a[:, None] * g, ds, bad, VALUES_GRAD)
    else:
        # Pass 2: per output i, its normaliser (stored as 1/Z_i in CWS[., 1]) and
        # c_i = g_i . (y_i - ref_i), ref_i = x_i2 for i = i1 else x_i1.
        for i in range(0, n):
            g = tl.load(G + (t0 + i) * P * D + offs, mask=mask, other=0.0).to(tl.float32)
            mi = tl.where(i == i1, m2, m1)
            ref = tl.where((i == i1)[:, None], x2, x1)
            acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
            Z = tl.zeros([BLOCK_P], tl.float32)
            for m in range(0, n):
                if m != i:
                    x = tl.load(V + (t0 + m) * P * D + offs, mask=mask, other=0.0).to(tl.float32)
                    s = tl.load(SC + (t0 + m) * P + rows, mask=rmask, other=0.0)
                    e = tl.exp(s - mi)
                    acc += e[:, None] * (x - ref)
                    Z += e
            invz = tl.where(Z > 0, 1.0 / tl.where(Z > 0, Z, 1.0), 0.0)
            c = tl.sum(g * acc, axis=1) * invz
            tl.store(CWS + ((t0 + i) * P + rows) * 2, c, mask=rmask)
            tl.store(CWS + ((t0 + i) * P + rows) * 2 + 1, invz, mask=rmask)
        # Pass 3: per image k, ds_k = sum_{i != k} a_ik (g_i . (x_k - ref_i) - c_i) and
        # dV_k = sum_{i != k} a_ik g_i.
        for k in range(0, n):
            x = tl.load(V + (t0 + k) * P * D + offs, mask=mask, other=0.0).to(tl.float32)
            sk = tl.load(SC + (t0 + k) * P + rows, mask=rmask, other=0.0)
            gk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
            ds = tl.zeros([BLOCK_P], tl.float32)
            for i in range(0, n):
                if i != k:
                    g = tl.load(G + (t0 + i) * P * D + offs, mask=mask, other=0.0).to(tl.float32)
                    c = tl.load(CWS + ((t0 + i) * P + rows) * 2, mask=rmask, other=0.0)
                    invz = tl.load(CWS + ((t0 + i) * P + rows) * 2 + 1, mask=rmask, other=0.0)
                    a = tl.exp(sk - tl.where(i == i1, m2, m1)) * invz
                    ref = tl.where((i == i1)[:, None], x2, x1)
                    ds += a * (tl.sum(g * (x - ref), axis=1) - c)
                    gk += a[:, None] * g
            ds = tl.where(rmask, tl.where(bad, float("nan"), ds), 0.0)
            _image_grads(DV, DS, t0 + k, P, D, rows, rmask, offs, mask, gk, ds, bad, VALUES_GRAD)
