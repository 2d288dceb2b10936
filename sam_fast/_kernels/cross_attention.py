"""Fused multi-head attention for the Q-former (Triton): forward with the log-sum-exp saved, and
the two backward kernels (dK/dV by key block, dQ by query block), recomputing the probabilities.

Shapes (the launcher in `sam_fast/ops/cross_attention.py` passes every stride, so strided views
such as the K/V columns of the one-GEMM projection are read in place):

    q [N, H, Lq, d], bias [N, Lk] (key padding, optional), out [N, H, Lq, d], lse [N*H, Lq] fp32:
    ``out = softmax(q k^T * scale + bias) v`` per (n, h), where query rows n < split use k/v
    [split, H, Lk, d] row n and the rows n >= split use k2/v2 row n - split (or rows2[n - split]):
    the Q-stream and the W-stream (its K/V being the merged maps' K/V) in one launch.

    Mixed second stream (``HAS_MIX``, the leave_one_out W-stream): instead of reading a row of
    k2/v2, query row n >= split forms its K/V tiles on the fly as
    ``sum_s MixW[n - split, s, key] * k2[MixIdx[n - split, s], :, key]`` (same for v2), M slots
    per row (unused slots: weight 0). The merged maps' K/V are never materialised: each key block
    of each contextual image is read and weighted in registers. The backward kernels recompute
    the same tiles and return the gradient to the mixed K/V per query row (dK-hat, dV-hat); the
    launcher turns it into the gradients of k2/v2 and of the weights (hence of the scores).

In the Q-former: cross-attention, Lq = 32 query rows against Lk = 257 image tokens (both streams
of all images in one launch); self-attention, Lq = Lk = 32 + L_text with a padding bias.

Arithmetic is fp32: values are cast right after `tl.load` (bf16 is broken in the interpreter, and
fp16/bf16 values are exact in tf32, so half-precision inputs lose nothing in the dots).
``PRECISION`` is "ieee" for fp32 inputs (results equal to an fp32 reference) and "tf32" for
half-precision inputs (tensor cores).
"""

import triton
import triton.language as tl


@triton.jit
def _load_block(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scores(q, k, bias_ptr, offs_n, stride_bk, Lk, scale, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] scaled scores plus bias, -inf outside the keys."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n * stride_bk, mask=offs_n < Lk, other=0.0).to(tl.float32)
        s = s + b[None, :]
    return tl.where(offs_n[None, :] < Lk, s, float("-inf"))


@triton.jit
def _kv_base(K, V, K2, V2, Rows2, n, h, split,
             skn, skh, skm, skd, svn, svh, svm, svd,
             sk2n, sk2h, sk2m, sk2d, sv2n, sv2h, sv2m, sv2d,
             HAS_ROWS2: tl.constexpr):
    """K/V of query row n: rows below `split` read (K, V) row n; the others read (K2, V2) row
    ``n - split`` (or ``Rows2[n - split]``). Two streams, one launch."""
    zero = n * 0  # strides as tensors in both branches (an int argument equal to 1 is a constexpr)
    if n < split:
        kb = K + n * skn + h * skh
        vb = V + n * svn + h * svh
        km, kd, vm, vd = skm + zero, skd + zero, svm + zero, svd + zero
    else:
        r = n - split
        if HAS_ROWS2:
            r = tl.load(Rows2 + r)
        kb = K2 + r * sk2n + h * sk2h
        vb = V2 + r * sv2n + h * sv2h
        km, kd, vm, vd = sk2m + zero, sk2d + zero, sv2m + zero, sv2d + zero
    return kb, vb, km, kd, vm, vd


@triton.jit
def _attn_program(K, V, K2, V2, Rows2, split,
                  skn, skh, skm, skd, svn, svh, svm, svd,
                  sk2n, sk2h, sk2m, sk2d, sv2n, sv2h, sv2m, sv2d,
                  H, HAS_ROWS2: tl.constexpr, BLOCK_D: tl.constexpr):
    """The prologue of the three attention kernels (grid: block, N * H): (block pid, (n, h) pid,
    query row n, head h, the K/V bases and strides of row n (`_kv_base`), whether n is a mixed
    row (`mixed`, only read with HAS_MIX), its row of the mixing plan, the head-dim offsets)."""
    pid = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    kb, vb, km, kd, vm, vd = _kv_base(K, V, K2, V2, Rows2, n, h, split, skn, skh, skm, skd, svn, svh, svm, svd,
                                      sk2n, sk2h, sk2m, sk2d, sv2n, sv2h, sv2m, sv2d, HAS_ROWS2)
    mixed = n >= split
    mrow = tl.maximum(n - split, 0)
    return pid, pid_nh, n, h, kb, vb, km, kd, vm, vd, mixed, mrow, tl.arange(0, BLOCK_D)


@triton.jit
def _kv_tiles(kb, vb, km, kd, vm, vd, offs_n, offs_d, Lk, D, mixed, mrow,
              K2, V2, sk2n, sk2h, sv2n, sv2h, h, MixIdx, MixW, M,
              HAS_MIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [BLOCK_N, BLOCK_D] K and V tiles (fp32) of keys `offs_n` for one query row: loaded
    from (kb, vb), or for a mixed row (`mixed`) summed over its M weighted slots of (K2, V2)."""
    if HAS_MIX:
        if mixed:
            k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for slot in range(0, M):
                r = tl.load(MixIdx + mrow * M + slot)
                a = tl.load(MixW + (mrow * M + slot) * Lk + offs_n, mask=offs_n < Lk, other=0.0)
                k += a[:, None] * _load_block(K2 + r * sk2n + h * sk2h, offs_n, offs_d, km, kd, Lk, D)
                v += a[:, None] * _load_block(V2 + r * sv2n + h * sv2h, offs_n, offs_d, vm, vd, Lk, D)
        else:
            k = _load_block(kb, offs_n, offs_d, km, kd, Lk, D)
            v = _load_block(vb, offs_n, offs_d, vm, vd, Lk, D)
    else:
        k = _load_block(kb, offs_n, offs_d, km, kd, Lk, D)
        v = _load_block(vb, offs_n, offs_d, vm, vd, Lk, D)
    return k, v


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Bias, Out, Lse,
    sqn, sqh, sqm, sqd,
    skn, skh, skm, skd,
    svn, svh, svm, svd,
    K2, V2, Rows2, split, MixIdx, MixW, M,
    sk2n, sk2h, sk2m, sk2d,
    sv2n, sv2h, sv2m, sv2d,
    son, soh, som, sod,
    sbn, sbk,
    H, Lq, Lk, D, scale,
    HAS_BIAS: tl.constexpr, HAS_ROWS2: tl.constexpr, HAS_MIX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, pid_nh, n, h, kb, vb, km, kd, vm, vd, mixed, mrow, offs_d = _attn_program(
        K, V, K2, V2, Rows2, split, skn, skh, skm, skd, svn, svh, svm, svd,
        sk2n, sk2h, sk2m, sk2d, sv2n, sv2h, sv2m, sv2d, H, HAS_ROWS2, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_block(Q + n * sqn + h * sqh, offs_m, offs_d, sqm, sqd, Lq, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _kv_tiles(kb, vb, km, kd, vm, vd, offs_n, offs_d, Lk, D, mixed, mrow, K2, V2, sk2n, sk2h, sv2n, sv2h,
                         h, MixIdx, MixW, M, HAS_MIX, BLOCK_N, BLOCK_D)
        s = _scores(q, k, Bias + n * sbn, offs_n, sbk, Lk, scale, HAS_BIAS, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds at least one key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    tl.store(Out + n * son + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + pid_nh * Lq + offs_m, m_i + tl.log(l_i), mask=offs_m < Lq)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, Bias, dO, Lse, Delta, dK, dV,
    sqn, sqh, sqm, sqd,
    skn, skh, skm, skd,
    svn, svh, svm, svd,
    K2, V2, Rows2, split, MixIdx, MixW, M,
    sk2n, sk2h, sk2m, sk2d,
    sv2n, sv2h, sv2m, sv2d,
    sdon, sdoh, sdom, sdod,
    sbn, sbk,
    H, Lq, Lk, D, scale,
    HAS_BIAS: tl.constexpr, HAS_ROWS2: tl.constexpr, HAS_MIX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dV = P^T dO, dK = scale * dS^T Q with dS = P * (dO V^T - delta); one key block per program.
    dK/dV are written contiguous [N, H, Lk, d], one slice per *query* row (the launcher sums
    the slices of query rows that share a K/V row)."""
    pid_n, pid_nh, n, h, kb, vb, km, kd, vm, vd, mixed, mrow, offs_d = _attn_program(
        K, V, K2, V2, Rows2, split, skn, skh, skm, skd, svn, svh, svm, svd,
        sk2n, sk2h, sk2m, sk2d, sv2n, sv2h, sv2m, sv2d, H, HAS_ROWS2, BLOCK_D)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v = _kv_tiles(kb, vb, km, kd, vm, vd, offs_n, offs_d, Lk, D, mixed, mrow, K2, V2, sk2n, sk2h, sv2n, sv2h,
                     h, MixIdx, MixW, M, HAS_MIX, BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_block(Q + n * sqn + h * sqh, offs_m, offs_d, sqm, sqd, Lq, D)
        do = _load_block(dO + n * sdon + h * sdoh, offs_m, offs_d, sdom, sdod, Lq, D)
        lse = tl.load(Lse + pid_nh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        delta = tl.load(Delta + pid_nh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        s = _scores(q, k, Bias + n * sbn, offs_n, sbk, Lk, scale, HAS_BIAS, PRECISION)
        p = tl.exp(s - lse[:, None])
        p = tl.where(offs_m[:, None] < Lq, p, 0.0)
        dv += tl.dot(tl.trans(p), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
    mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
    base = pid_nh * Lk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dK + base, (dk * scale).to(dK.dtype.element_ty), mask=mask)
    tl.store(dV + base, dv.to(dV.dtype.element_ty), mask=mask)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, Bias, dO, Lse, Delta, dQ,
    sqn, sqh, sqm, sqd,
    skn, skh, skm, skd,
    svn, svh, svm, svd,
    K2, V2, Rows2, split, MixIdx, MixW, M,
    sk2n, sk2h, sk2m, sk2d,
    sv2n, sv2h, sv2m, sv2d,
    sdon, sdoh, sdom, sdod,
    sbn, sbk,
    H, Lq, Lk, D, scale,
    HAS_BIAS: tl.constexpr, HAS_ROWS2: tl.constexpr, HAS_MIX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ = scale * dS K; one query block per program. dQ is written contiguous [N, H, Lq, d]."""
    pid_m, pid_nh, n, h, kb, vb, km, kd, vm, vd, mixed, mrow, offs_d = _attn_program(
        K, V, K2, V2, Rows2, split, skn, skh, skm, skd, svn, svh, svm, svd,
        sk2n, sk2h, sk2m, sk2d, sv2n, sv2h, sv2m, sv2d, H, HAS_ROWS2, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_block(Q + n * sqn + h * sqh, offs_m, offs_d, sqm, sqd, Lq, D)
    do = _load_block(dO + n * sdon + h * sdoh, offs_m, offs_d, sdom, sdod, Lq, D)
    lse = tl.load(Lse + pid_nh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    delta = tl.load(Delta + pid_nh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _kv_tiles(kb, vb, km, kd, vm, vd, offs_n, offs_d, Lk, D, mixed, mrow, K2, V2, sk2n, sk2h, sv2n, sv2h,
                         h, MixIdx, MixW, M, HAS_MIX, BLOCK_N, BLOCK_D)
        s = _scores(q, k, Bias + n * sbn, offs_n, sbk, Lk, scale, HAS_BIAS, PRECISION)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision=PRECISION)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    tl.store(dQ + pid_nh * Lq * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty),
             mask=mask)


@triton.jit
def mix_weight_grad_kernel(
    dKh, dVh, K2, V2, MixIdx, dW,
    sk2n, sk2h, sk2m, sk2d, sv2n, sv2h, sv2m, sv2d,
    H, Lk, D, M,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient of the mixing weights: ``dW[j, s, key] = sum_{h, d} dKh[j, h, key, d] *
    K2[MixIdx[j, s], h, key, d] + (same for V)``, one (key block, mixed row) per program, no
    atomics. dKh/dVh are the mixed rows' K/V gradients, contiguous fp32 [R, H, Lk, d]; dW is
    contiguous fp32 [R, M, Lk]. Replaces a gather of every slot's K/V rows (M copies of [R, H,
    Lk, d] per layer) and two reductions by one pass over the rows the forward read."""
    pid_n = tl.program_id(0)
    j = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for slot in range(0, M):
        r = tl.load(MixIdx + j * M + slot)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for h in range(0, H):
            g_base = (j * H + h) * Lk * D
            dk = _load_block(dKh + g_base, offs_n, offs_d, D, 1, Lk, D)
            dv = _load_block(dVh + g_base, offs_n, offs_d, D, 1, Lk, D)
            k = _load_block(K2 + r * sk2n + h * sk2h, offs_n, offs_d, sk2m, sk2d, Lk, D)
            v = _load_block(V2 + r * sv2n + h * sv2h, offs_n, offs_d, sv2m, sv2d, Lk, D)
            acc += tl.sum(dk * k, 1) + tl.sum(dv * v, 1)
        tl.store(dW + (j * M + slot) * Lk + offs_n, acc, mask=offs_n < Lk)
