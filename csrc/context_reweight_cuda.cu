// CUDA kernels of context re-weighting, forward and backward, designed from the roofline: the op
// moves one read and one write of the values (forward; the backward two reads and a write) for a
// few flops per element, so each kernel is one streaming pass over [T, P, D]. The same design as
// the Triton kernels (sam_fast/_kernels/context_reweight.py, whose docstring has the formulas):
//
// 1. coef_kernel, a thread per (sample, patch) column: from the scores the per-(image, patch)
//    coefficients COEF [T, P, 4] (shared: a_k; leave-one-out: e_k = exp(s_k - m1), 1/Z_k (0 at
//    the argmax i1), a_{i1,k}) and the column's argmax and runner-up IDX [B, P, 2]. A column with
//    a non-finite score gets NaN coefficients: its outputs and gradients are NaN by arithmetic.
// 2. fwd_kernel / bwd_kernel, a block per (sample, patch) column x a channel block of
//    kThreads * R channels (R per thread, strided by kThreads: coalesced). The sample's images come
//    in chunks of NB (a template parameter the launcher sizes to the batch); a sample of up to NB
//    images is loaded once into registers and every output row formed from them. The coefficients
//    are read straight from global memory (the same address in every thread: one broadcast, no
//    shared-memory staging, no barrier). The backward writes dV and the block's partial channel
//    sums of the score gradient's dot products to PART [NCB, T, P, 4], reduced across the block
//    by warp shuffles and one shared-memory step between two barriers.
// 3. dscore_kernel, a thread per column: sums PART over the channel blocks in block order and
//    forms the score gradients with the common header's loo_dscore (prefix + suffix "all but one"
//    sums, kept in the column's own d-score slots: written and re-read by the same thread).
// No atomics: bitwise reproducible. Free of torch headers on purpose: CI compiles this file with
// plain nvcc on machines with no GPU and no CUDA torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "context_reweight_common.h"
#include "context_reweight_cuda.h"

namespace {

namespace cr = sam_fast::cr;

constexpr int kThreads = 128;
constexpr int kWarp = 32;
constexpr int kCoef = 4;  // floats per (image, patch) in COEF and PART (the fourth is padding)

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Channels per thread: NB x R values of each tile per thread (16 forward, 8 backward, which also
// holds the gradient tile), so a block keeps NB * R loads in flight per thread.
__host__ __device__ constexpr int fwd_lanes(int nb) { return nb >= 16 ? 1 : 16 / nb; }
__host__ __device__ constexpr int bwd_lanes(int nb) { return nb >= 8 ? 1 : 8 / nb; }

int images_per_chunk(int64_t T, int64_t B) {  // next power of two >= the mean sample, 2..16
  const int64_t mean = B > 0 ? (T + B - 1) / B : 1;
  int nb = 2;
  while (nb < 16 && nb < mean) nb *= 2;
  return nb;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Workspace {  // views of the launcher's fp32 workspace
  float* coef;      // [T, P, 4]
  int* idx;         // [B, P, 2]
  float* part;      // [NCB, T, P, 4] (backward)
};

Workspace split(float* ws, int64_t B, int64_t T, int64_t P) {
  Workspace w;
  w.coef = ws;
  w.idx = reinterpret_cast<int*>(ws + T * P * kCoef);
  w.part = ws + T * P * kCoef + B * P * 2;
  return w;
}

struct Column {  // a block's (sample, patch) column
  int64_t b, j, t0, n;
};

template <typename Index>
__device__ __forceinline__ Column column_of(int64_t col, int64_t P, const Index* cu) {
  Column c;
  c.b = col / P;
  c.j = col % P;
  c.t0 = cu[c.b];
  c.n = static_cast<int64_t>(cu[c.b + 1]) - c.t0;
  return c;
}

// 1. Coefficients, a thread per column (grid: ceil(P / kThreads) x B flattened).
template <typename Index>
__global__ void __launch_bounds__(kThreads)
    coef_kernel(const float* __restrict__ S, const Index* __restrict__ cu, int64_t P, bool shared,
                float* __restrict__ coef, int* __restrict__ idx) {
  const int64_t per_sample = (P + kThreads - 1) / kThreads;
  const int64_t b = blockIdx.x / per_sample;
  const int64_t j = (blockIdx.x % per_sample) * kThreads + threadIdx.x;
  if (j >= P) return;
  const int64_t t0 = cu[b], n = static_cast<int64_t>(cu[b + 1]) - t0;
  auto score = [&](int64_t k) { return S[(t0 + k) * P + j]; };
  cr::Top2 top = cr::top2_init();
  bool finite = true;
  for (int64_t k = 0; k < n; ++k) {
    finite = finite && cr::is_finite(score(k));
    cr::top2_push(top, score(k), k);
  }
  if (top.i1 < 0) top.i1 = 0;  // valid rows whatever the scores (context_reweight_common.h)
  if (top.i2 < 0) top.i2 = (top.i1 == 0 && n > 1) ? 1 : 0;
  float z = 0.f, z2 = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    z += cr::weight(score(k), k, -1, top.m1);
    z2 += cr::weight(score(k), k, top.i1, top.m2);
  }
  const float inv = cr::inv_or_zero(z), inv2 = cr::inv_or_zero(z2);
  for (int64_t k = 0; k < n; ++k) {
    const float e = cr::weight(score(k), k, -1, top.m1);
    float* c = coef + ((t0 + k) * P + j) * kCoef;
    // 1/Z_k = 1/(Z - e_k): for k != i1, e_k <= 1 = e_i1 <= Z - e_k, so nothing cancels
    c[0] = finite ? (shared ? e * inv : e) : cr::nan_value();
    c[1] = finite ? (shared || k == top.i1 ? 0.f : 1.f / (z - e)) : cr::nan_value();
    c[2] = finite ? (shared ? 0.f : cr::weight(score(k), k, top.i1, top.m2) * inv2) : cr::nan_value();
    c[3] = 0.f;
  }
  idx[(b * P + j) * 2] = static_cast<int>(top.i1);
  idx[(b * P + j) * 2 + 1] = static_cast<int>(top.i2);
}

// The coefficient `slot` of local image k of column c (0 for the padding images k >= n).
__device__ __forceinline__ float coef_of(const float* coef, const Column& c, int64_t P, int64_t k,
                                         int slot) {
  return k < c.n ? coef[((c.t0 + k) * P + c.j) * kCoef + slot] : 0.f;
}

// Loads images c0 .. c0+NB-1 of column c, R channels per thread from d0 (stride kThreads), into
// x (zeros outside the sample and past D).
template <int NB, int R, typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ X, const Column& c, int64_t c0,
                                           int64_t P, int64_t D, int64_t d0, float (&x)[NB][R]) {
#pragma unroll
  for (int q = 0; q < NB; ++q) {
    const T* row = X + ((c.t0 + c0 + q) * P + c.j) * D;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t d = d0 + r * kThreads;
      x[q][r] = (c0 + q < c.n && d < D) ? load_f(row + d) : 0.f;
    }
  }
}

// The column's image row k (local), R channels per thread (zeros past D).
template <int R, typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ X, int64_t row, int64_t D, int64_t d0,
                                         float (&x)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t d = d0 + r * kThreads;
    x[r] = d < D ? load_f(X + row * D + d) : 0.f;
  }
}

// 2a. Forward: a block per (column, channel block of kThreads * fwd_lanes(NB) channels).
template <typename T, typename Index, int NB>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const T* __restrict__ F, const float* __restrict__ coef, const int* __restrict__ idx,
               const Index* __restrict__ cu, int64_t P, int64_t D, bool shared, T* __restrict__ out) {
  constexpr int R = fwd_lanes(NB);
  const int64_t col = blockIdx.x;
  const Column c = column_of(col, P, cu);
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kThreads * R + threadIdx.x;
  float S[R] = {}, S1[R] = {}, x[NB][R];
  for (int64_t c0 = 0; c0 < c.n; c0 += NB) {
    load_chunk<NB, R>(F, c, c0, P, D, d0, x);
#pragma unroll
    for (int q = 0; q < NB; ++q) {
      const float w = coef_of(coef, c, P, c0 + q, 0), w1 = shared ? 0.f : coef_of(coef, c, P, c0 + q, 2);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        S[r] += w * x[q][r];
        S1[r] += w1 * x[q][r];
      }
    }
  }
  if (shared) {
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (d0 + r * kThreads < D) store_f(out + col * D + d0 + r * kThreads, S[r]);
    return;
  }
  const int64_t i1 = idx[col * 2];
  for (int64_t c0 = 0; c0 < c.n; c0 += NB) {
    if (c.n > NB) load_chunk<NB, R>(F, c, c0, P, D, d0, x);  // else x holds the only chunk
#pragma unroll
    for (int q = 0; q < NB; ++q) {
      const int64_t k = c0 + q;
      if (k >= c.n) break;
      const float e = coef_of(coef, c, P, k, 0), inv_z = coef_of(coef, c, P, k, 1);
      T* dst = out + ((c.t0 + k) * P + c.j) * D;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t d = d0 + r * kThreads;
        if (d < D) store_f(dst + d, k == i1 ? S1[r] : (S[r] - e * x[q][r]) * inv_z);
      }
    }
  }
}

// Sums each of v[NB * SLOTS] over the block (fixed order) and writes the total of v[q * SLOTS + s]
// to dst[q * stride + s] for the rows q < rows_left (from thread q * SLOTS + s). `red` holds
// kThreads / kWarp * NB * SLOTS floats; a barrier before it is written and one before it is read,
// so consecutive calls may reuse it.
template <int NB, int SLOTS>
__device__ __forceinline__ void block_sums(float (&v)[NB * SLOTS], float* red, float* dst, int64_t stride,
                                           int64_t rows_left) {
  constexpr int M = NB * SLOTS;
  static_assert(M <= kThreads, "one thread per sum");
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int m = 0; m < M; ++m)
    for (int off = kWarp / 2; off > 0; off /= 2) v[m] += __shfl_xor_sync(0xffffffffu, v[m], off);
  __syncthreads();  // red is free: the previous call's readers are done
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) red[warp * M + m] = v[m];
  }
  __syncthreads();
  const int m = threadIdx.x;
  if (m < M && m / SLOTS < rows_left) {
    float total = 0.f;
    for (int w = 0; w < kThreads / kWarp; ++w) total += red[w * M + m];
    dst[(m / SLOTS) * stride + m % SLOTS] = total;
  }
}

// 2b. Backward, shared mode: dV_k = a_k g, partial p_k = g . (x_k - x_i1).
template <typename T, typename Index, int NB>
__device__ __forceinline__ void bwd_shared(const T* __restrict__ G, const T* __restrict__ F,
                                           const float* __restrict__ coef, const Column& c, int64_t col,
                                           int64_t i1, int64_t P, int64_t D, int64_t d0, float* part,
                                           float* red, T* __restrict__ dF) {
  constexpr int R = bwd_lanes(NB);
  float g[R], x1[R], x[NB][R];
  load_row<R>(G, col, D, d0, g);
  load_row<R>(F, (c.t0 + i1) * P + c.j, D, d0, x1);
  for (int64_t c0 = 0; c0 < c.n; c0 += NB) {
    load_chunk<NB, R>(F, c, c0, P, D, d0, x);
    float p[NB];
#pragma unroll
    for (int q = 0; q < NB; ++q) {
      p[q] = 0.f;
      const float a = coef_of(coef, c, P, c0 + q, 0);
      T* dst = dF == nullptr ? nullptr : dF + ((c.t0 + c0 + q) * P + c.j) * D;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        p[q] += g[r] * (x[q][r] - x1[r]);
        const int64_t d = d0 + r * kThreads;
        if (dst != nullptr && c0 + q < c.n && d < D) store_f(dst + d, a * g[r]);
      }
    }
    block_sums<NB, 1>(p, red, part + ((c.t0 + c0) * P + c.j) * kCoef, P * kCoef, c.n - c0);
  }
}

// 2c. Backward, leave-one-out: dV_k = e_k (H - g_k / Z_k) + a_{i1,k} g_i1 and the partials
// q_k = (x_k - x_i1) . (H - g_k / Z_k), c_k = g_k . (y_k - x_i1), p1_k = g_i1 . (x_k - x_i2).
template <typename T, typename Index, int NB>
__device__ __forceinline__ void bwd_loo(const T* __restrict__ G, const T* __restrict__ F,
                                        const float* __restrict__ coef, const Column& c, int64_t i1,
                                        int64_t i2, int64_t P, int64_t D, int64_t d0, float* part,
                                        float* red, T* __restrict__ dF) {
  constexpr int R = bwd_lanes(NB);
  float x1[R], x2[R], g1[R], H[R] = {}, Ssh[R] = {}, x[NB][R], g[NB][R];
  load_row<R>(F, (c.t0 + i1) * P + c.j, D, d0, x1);
  load_row<R>(F, (c.t0 + i2) * P + c.j, D, d0, x2);
  load_row<R>(G, (c.t0 + i1) * P + c.j, D, d0, g1);
  for (int64_t c0 = 0; c0 < c.n; c0 += NB) {
    load_chunk<NB, R>(F, c, c0, P, D, d0, x);
    load_chunk<NB, R>(G, c, c0, P, D, d0, g);
#pragma unroll
    for (int q = 0; q < NB; ++q) {
      const float e = coef_of(coef, c, P, c0 + q, 0), inv_z = coef_of(coef, c, P, c0 + q, 1);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        H[r] += inv_z * g[q][r];
        Ssh[r] += e * (x[q][r] - x1[r]);
      }
    }
  }
  for (int64_t c0 = 0; c0 < c.n; c0 += NB) {
    if (c.n > NB) {  // else x and g hold the only chunk
      load_chunk<NB, R>(F, c, c0, P, D, d0, x);
      load_chunk<NB, R>(G, c, c0, P, D, d0, g);
    }
    float v[NB * 3];
#pragma unroll
    for (int q = 0; q < NB; ++q) {
      const float e = coef_of(coef, c, P, c0 + q, 0), inv_z = coef_of(coef, c, P, c0 + q, 1),
                  a1 = coef_of(coef, c, P, c0 + q, 2);
      T* dst = dF == nullptr ? nullptr : dF + ((c.t0 + c0 + q) * P + c.j) * D;
      v[q * 3] = v[q * 3 + 1] = v[q * 3 + 2] = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float xs = x[q][r] - x1[r], h = H[r] - inv_z * g[q][r];
        v[q * 3] += xs * h;
        v[q * 3 + 1] += g[q][r] * (Ssh[r] - e * xs) * inv_z;
        v[q * 3 + 2] += g1[r] * (x[q][r] - x2[r]);
        const int64_t d = d0 + r * kThreads;
        if (dst != nullptr && c0 + q < c.n && d < D) store_f(dst + d, e * h + a1 * g1[r]);
      }
    }
    block_sums<NB, 3>(v, red, part + ((c.t0 + c0) * P + c.j) * kCoef, P * kCoef, c.n - c0);
  }
}

template <typename T, typename Index, int NB>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const T* __restrict__ G, const T* __restrict__ F, const float* __restrict__ coef,
               const int* __restrict__ idx, const Index* __restrict__ cu, int64_t num_images, int64_t P,
               int64_t D, bool shared, float* __restrict__ part, T* __restrict__ dF) {
  __shared__ float red[kThreads / kWarp * NB * 3];
  const int64_t col = blockIdx.x;
  const Column c = column_of(col, P, cu);
  if (c.n == 0) return;  // (shared mode, an empty sample): no row to read, no gradient
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kThreads * bwd_lanes(NB) + threadIdx.x;
  float* block_part = part + static_cast<int64_t>(blockIdx.y) * num_images * P * kCoef;
  const int64_t i1 = idx[col * 2], i2 = idx[col * 2 + 1];
  if (shared) {
    bwd_shared<T, Index, NB>(G, F, coef, c, col, i1, P, D, d0, block_part, red, dF);
  } else {
    bwd_loo<T, Index, NB>(G, F, coef, c, i1, i2, P, D, d0, block_part, red, dF);
  }
}

// 3. Score gradients, a thread per column (grid as coef_kernel's).
__device__ __forceinline__ float part_sum(const float* part, int64_t row, int slot, int64_t ncb,
                                          int64_t stride) {
  float acc = 0.f;
  for (int64_t cb = 0; cb < ncb; ++cb) acc += part[cb * stride + row * kCoef + slot];
  return acc;
}

template <typename Index>
__global__ void __launch_bounds__(kThreads)
    dscore_kernel(const float* __restrict__ coef, const float* __restrict__ part,
                  const Index* __restrict__ cu, int64_t num_images, int64_t P, int64_t ncb, bool shared,
                  float* __restrict__ dS) {
  const int64_t per_sample = (P + kThreads - 1) / kThreads;
  const int64_t b = blockIdx.x / per_sample;
  const int64_t j = (blockIdx.x % per_sample) * kThreads + threadIdx.x;
  if (j >= P) return;
  const int64_t t0 = cu[b], n = static_cast<int64_t>(cu[b + 1]) - t0, stride = num_images * P * kCoef;
  auto row = [&](int64_t k) { return (t0 + k) * P + j; };
  auto cf = [&](int64_t k, int slot) { return coef[row(k) * kCoef + slot]; };
  if (shared) {
    float total = 0.f;  // sum_m a_m p_m
    for (int64_t k = 0; k < n; ++k) total += cf(k, 0) * part_sum(part, row(k), 0, ncb, stride);
    for (int64_t k = 0; k < n; ++k) dS[row(k)] = cf(k, 0) * (part_sum(part, row(k), 0, ncb, stride) - total);
    return;
  }
  // Leave-one-out: dS[k] first holds the suffix sum_{i > k} c_i / Z_i (this thread's own slots).
  float suffix = 0.f, c1 = 0.f;  // c1 = sum_m a_{i1,m} p1_m
  for (int64_t k = n - 1; k >= 0; --k) {
    dS[row(k)] = suffix;
    suffix += cf(k, 1) * part_sum(part, row(k), 1, ncb, stride);
    c1 += cf(k, 2) * part_sum(part, row(k), 2, ncb, stride);
  }
  float prefix = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    const float but_k = prefix + dS[row(k)];
    prefix += cf(k, 1) * part_sum(part, row(k), 1, ncb, stride);
    dS[row(k)] = cr::loo_dscore(cf(k, 0), part_sum(part, row(k), 0, ncb, stride), but_k, cf(k, 2),
                                part_sum(part, row(k), 2, ncb, stride), c1);
  }
}

// -- launchers -------------------------------------------------------------------------------------

int64_t fwd_block_channels(int nb) { return static_cast<int64_t>(kThreads) * fwd_lanes(nb); }
int64_t bwd_block_channels(int nb) { return static_cast<int64_t>(kThreads) * bwd_lanes(nb); }

template <typename Index>
cudaError_t launch_coef(const float* S, const Index* cu, int64_t B, int64_t P, bool shared, Workspace w,
                        cudaStream_t stream) {
  const int64_t blocks = B * cdiv(P, kThreads);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  coef_kernel<Index><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(S, cu, P, shared, w.coef, w.idx);
  return cudaGetLastError();
}

// The kernel's grid: (B * P columns, channel blocks); false when it exceeds CUDA's limits.
bool column_grid(int64_t B, int64_t P, int64_t D, int64_t channels, dim3* grid) {
  const int64_t cols = B * P, ncb = cdiv(D, channels);
  if (cols > 0x7fffffffLL || ncb > 65535) return false;
  *grid = dim3(static_cast<unsigned>(cols), static_cast<unsigned>(ncb));
  return true;
}

template <typename T, typename Index, int NB>
cudaError_t launch_fwd_nb(const T* F, const Index* cu, int64_t B, int64_t P, int64_t D, bool shared,
                          Workspace w, T* out, cudaStream_t stream) {
  dim3 grid;
  if (!column_grid(B, P, D, fwd_block_channels(NB), &grid)) return cudaErrorInvalidConfiguration;
  fwd_kernel<T, Index, NB><<<grid, kThreads, 0, stream>>>(F, w.coef, w.idx, cu, P, D, shared, out);
  return cudaGetLastError();
}

template <typename T, typename Index>
cudaError_t launch_fwd(const void* values, const float* S, const Index* cu, int64_t B, int64_t T_,
                       int64_t P, int64_t D, bool shared, float* ws, void* out, cudaStream_t stream) {
  if (B * P == 0 || D == 0) return cudaSuccess;
  const Workspace w = split(ws, B, T_, P);
  cudaError_t err = launch_coef(S, cu, B, P, shared, w, stream);
  if (err != cudaSuccess) return err;
  const T* F = static_cast<const T*>(values);
  T* o = static_cast<T*>(out);
  switch (images_per_chunk(T_, B)) {
    case 2: return launch_fwd_nb<T, Index, 2>(F, cu, B, P, D, shared, w, o, stream);
    case 4: return launch_fwd_nb<T, Index, 4>(F, cu, B, P, D, shared, w, o, stream);
    case 8: return launch_fwd_nb<T, Index, 8>(F, cu, B, P, D, shared, w, o, stream);
    default: return launch_fwd_nb<T, Index, 16>(F, cu, B, P, D, shared, w, o, stream);
  }
}

template <typename T, typename Index, int NB>
cudaError_t launch_bwd_nb(const T* G, const T* F, const Index* cu, int64_t B, int64_t T_, int64_t P,
                          int64_t D, bool shared, Workspace w, T* dF, float* dS, cudaStream_t stream) {
  dim3 grid;
  if (!column_grid(B, P, D, bwd_block_channels(NB), &grid)) return cudaErrorInvalidConfiguration;
  bwd_kernel<T, Index, NB><<<grid, kThreads, 0, stream>>>(G, F, w.coef, w.idx, cu, T_, P, D, shared, w.part, dF);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t blocks = B * cdiv(P, kThreads);
  dscore_kernel<Index><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      w.coef, w.part, cu, T_, P, static_cast<int64_t>(grid.y), shared, dS);
  return cudaGetLastError();
}

template <typename T, typename Index>
cudaError_t launch_bwd(const void* grad_out, const void* values, const float* S, const Index* cu, int64_t B,
                       int64_t T_, int64_t P, int64_t D, bool shared, float* ws, void* d_values, float* dS,
                       cudaStream_t stream) {
  if (B * P == 0 || D == 0) return cudaSuccess;  // (dS: zero-filled by the caller)
  const Workspace w = split(ws, B, T_, P);
  cudaError_t err = launch_coef(S, cu, B, P, shared, w, stream);
  if (err != cudaSuccess) return err;
  const T* G = static_cast<const T*>(grad_out);
  const T* F = static_cast<const T*>(values);
  T* dF = static_cast<T*>(d_values);
  switch (images_per_chunk(T_, B)) {
    case 2: return launch_bwd_nb<T, Index, 2>(G, F, cu, B, T_, P, D, shared, w, dF, dS, stream);
    case 4: return launch_bwd_nb<T, Index, 4>(G, F, cu, B, T_, P, D, shared, w, dF, dS, stream);
    case 8: return launch_bwd_nb<T, Index, 8>(G, F, cu, B, T_, P, D, shared, w, dF, dS, stream);
    default: return launch_bwd_nb<T, Index, 16>(G, F, cu, B, T_, P, D, shared, w, dF, dS, stream);
  }
}

template <typename T>
cudaError_t fwd_typed(const void* values, const float* S, const void* cu, bool cu64, int64_t B, int64_t T_,
                      int64_t P, int64_t D, bool shared, float* ws, void* out, cudaStream_t stream) {
  if (cu64)
    return launch_fwd<T, int64_t>(values, S, static_cast<const int64_t*>(cu), B, T_, P, D, shared, ws, out, stream);
  return launch_fwd<T, int32_t>(values, S, static_cast<const int32_t*>(cu), B, T_, P, D, shared, ws, out, stream);
}

template <typename T>
cudaError_t bwd_typed(const void* grad_out, const void* values, const float* S, const void* cu, bool cu64,
                      int64_t B, int64_t T_, int64_t P, int64_t D, bool shared, float* ws, void* d_values,
                      float* dS, cudaStream_t stream) {
  if (cu64)
    return launch_bwd<T, int64_t>(grad_out, values, S, static_cast<const int64_t*>(cu), B, T_, P, D, shared, ws,
                                  d_values, dS, stream);
  return launch_bwd<T, int32_t>(grad_out, values, S, static_cast<const int32_t*>(cu), B, T_, P, D, shared, ws,
                                d_values, dS, stream);
}

}  // namespace

extern "C" int64_t sam_fast_context_reweight_workspace_floats(int64_t num_samples, int64_t num_images,
                                                              int64_t P, int64_t D, int backward) {
  const int64_t fixed = num_images * P * kCoef + num_samples * P * 2;  // COEF, IDX
  if (!backward) return fixed;
  const int nb = images_per_chunk(num_images, num_samples);
  return fixed + cdiv(D, bwd_block_channels(nb)) * num_images * P * kCoef;  // PART
}

extern "C" int sam_fast_context_reweight_fwd_cuda(const void* values, int dtype, const float* scores,
                                                  const void* cu_images, int cu_images_is_int64,
                                                  int64_t num_samples, int64_t num_images, int64_t P,
                                                  int64_t D, int shared, float* workspace, void* out,
                                                  cudaStream_t stream) {
  const bool cu64 = cu_images_is_int64 != 0, sh = shared != 0;
  switch (dtype) {
    case SAM_FAST_F32:
      return fwd_typed<float>(values, scores, cu_images, cu64, num_samples, num_images, P, D, sh, workspace,
                              out, stream);
    case SAM_FAST_F16:
      return fwd_typed<__half>(values, scores, cu_images, cu64, num_samples, num_images, P, D, sh, workspace,
                               out, stream);
    case SAM_FAST_BF16:
      return fwd_typed<__nv_bfloat16>(values, scores, cu_images, cu64, num_samples, num_images, P, D, sh,
                                      workspace, out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int sam_fast_context_reweight_bwd_cuda(
    const void* grad_out, const void* values, int dtype, const float* scores, const void* cu_images,
    int cu_images_is_int64, int64_t num_samples, int64_t num_images, int64_t P, int64_t D, int shared,
    float* workspace, void* d_values, float* d_scores, cudaStream_t stream) {
  const bool cu64 = cu_images_is_int64 != 0, sh = shared != 0;
  switch (dtype) {
    case SAM_FAST_F32:
      return bwd_typed<float>(grad_out, values, scores, cu_images, cu64, num_samples, num_images, P, D, sh,
                              workspace, d_values, d_scores, stream);
    case SAM_FAST_F16:
      return bwd_typed<__half>(grad_out, values, scores, cu_images, cu64, num_samples, num_images, P, D, sh,
                               workspace, d_values, d_scores, stream);
    case SAM_FAST_BF16:
      return bwd_typed<__nv_bfloat16>(grad_out, values, scores, cu_images, cu64, num_samples, num_images, P, D,
                                      sh, workspace, d_values, d_scores, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" const char* sam_fast_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
