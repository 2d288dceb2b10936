// CUDA kernels of context re-weighting, forward and backward. One block per (sample, patch)
// column: the column's given scores are gathered into a contiguous fp32 workspace, then threads
// stride over D. Forward: the softmax-weighted rows, the weights staged in shared memory one tile
// of images at a time. Backward: the per-column coefficients (top-2, leave-one-out normalisers,
// d score) come from context_reweight_common.h exactly as on the CPU; every block writes only its
// column's value and score gradients (no atomics, so the result is bitwise reproducible). The
// rows of a column are re-read from L1/L2 for every image pair (O(n^2 D) arithmetic on O(n D)
// bytes).
// Free of torch headers on purpose: CI compiles this file with plain nvcc on machines with no GPU
// and no CUDA torch. The per-column arithmetic is context_reweight_common.h, shared with the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "context_reweight_common.h"
#include "context_reweight_cuda.h"

namespace {

constexpr int kThreads = 256;  // also the image tile of the shared-memory weights
constexpr int kWarp = 32;

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 1. The scores of a column into s[0, n) from the given [T, P] scores S (a column's scores are P
//    apart there; the common arithmetic wants them contiguous). Ends with a barrier that makes the
//    block's global writes to s visible to all its threads.
__device__ __forceinline__ void column_scores(const float* __restrict__ S, int64_t t0, int64_t n,
                                              int64_t j, int64_t P, float* s) {
  for (int64_t k = threadIdx.x; k < n; k += kThreads) s[k] = S[(t0 + k) * P + j];
  __syncthreads();
}

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    context_reweight_fwd_kernel(const T* __restrict__ F, const float* __restrict__ S,
                                const Index* __restrict__ cu, int64_t num_images, int64_t P,
                                int64_t D, bool shared, float* __restrict__ scores,
                                T* __restrict__ out) {
  namespace cr = sam_fast::cr;
  const int64_t b = blockIdx.x / P, j = blockIdx.x % P;
  const int64_t t0 = cu[b], n = static_cast<int64_t>(cu[b + 1]) - t0;
  float* s = scores + j * num_images + t0;  // this column's scores, contiguous over images

  column_scores(S, t0, n, j, P, s);

  // NaN / inf in the column (context_reweight_common.h): every output of the column is NaN. The
  // same scores in every thread, so the whole block takes this branch or none.
  const int64_t n_out = shared ? 1 : n;
  if (!cr::column_finite(s, n)) {
    for (int64_t i = 0; i < n_out; ++i) {
      T* dst = out + ((shared ? b : t0 + i) * P + j) * D;
      for (int64_t d = threadIdx.x; d < D; d += kThreads) store_f(dst + d, cr::nan_value());
    }
    return;
  }

  // 2. Outputs: one for the sample (shared) or one per excluded image (leave-one-out).
  __shared__ float wts[kThreads];
  const cr::Top2 top = cr::top2_of(s, n);
  for (int64_t i = 0; i < n_out; ++i) {
    const int64_t excluded = shared ? -1 : i;
    const float m = cr::support_max(top, excluded);
    const float inv = cr::inv_or_zero(cr::normaliser(s, n, excluded, m));
    T* dst = out + ((shared ? b : t0 + i) * P + j) * D;
    for (int64_t d0 = 0; d0 < D; d0 += kThreads) {
      const int64_t d = d0 + threadIdx.x;
      float acc = 0.f;
      for (int64_t k0 = 0; k0 < n; k0 += kThreads) {
        __syncthreads();  // previous tile fully read
        if (k0 + threadIdx.x < n) {
          const int64_t k = k0 + threadIdx.x;
          wts[threadIdx.x] = cr::weight(s[k], k, excluded, m);
        }
        __syncthreads();
        if (d < D) {
          const int64_t kn = min(static_cast<int64_t>(kThreads), n - k0);
          for (int64_t q = 0; q < kn; ++q) {
            if (k0 + q == excluded) continue;
            acc += wts[q] * load_f(F + ((t0 + k0 + q) * P + j) * D + d);
          }
        }
      }
      if (d < D) store_f(dst + d, acc * inv);
    }
  }
}


// Sum of `v` over the block (all threads get it); `red` holds kThreads / kWarp floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // red is free (previous use finished)
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kThreads / kWarp; ++w) total += red[w];  // same order in every thread
  return total;
}

// Workspace planes of the backward, each [P, T] fp32 (column slice: plane + j * T + t0).
enum Plane { kS = 0, kE, kInvZ, kE2, kTmp, kDp, kXh, kP1, kC, kCh, kDs, kPlanes };

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    context_reweight_bwd_kernel(const T* __restrict__ G, const T* __restrict__ F,
                                const float* __restrict__ S, const Index* __restrict__ cu,
                                int64_t num_images, int64_t P, int64_t D, bool shared,
                                float* __restrict__ ws, T* __restrict__ dF,
                                float* __restrict__ dS) {
  namespace cr = sam_fast::cr;
  __shared__ float red[kThreads / kWarp];
  __shared__ cr::Top2 top_sh;
  const int64_t col = blockIdx.x;
  const int64_t b = col / P, j = col % P;
  const int64_t t0 = cu[b], n = static_cast<int64_t>(cu[b + 1]) - t0;
  float* plane[kPlanes];
  for (int q = 0; q < kPlanes; ++q) plane[q] = ws + (q * P + j) * num_images + t0;
  float* s = plane[kS];
  auto row = [&](const T* base, int64_t k) { return base + ((t0 + k) * P + j) * D; };

  if (n == 0) return;  // (shared mode, an empty sample): no support, no gradient

  // 1. Scores (as in the forward).
  column_scores(S, t0, n, j, P, s);

  // NaN / inf in the column (context_reweight_common.h): NaN value gradients and ds. Every thread
  // reads the same scores: the block branches as one.
  if (!cr::column_finite(s, n)) {
    for (int64_t k = threadIdx.x; k < n; k += kThreads) dS[(t0 + k) * P + j] = cr::nan_value();
    if (dF != nullptr)
      for (int64_t k = 0; k < n; ++k)
        for (int64_t d = threadIdx.x; d < D; d += kThreads) store_f(dF + ((t0 + k) * P + j) * D + d, cr::nan_value());
    return;
  }
  if (!shared && n == 1) {  // leave-one-out without a contextual image: zero gradients (dS: zeros)
    if (dF != nullptr)
      for (int64_t d = threadIdx.x; d < D; d += kThreads) store_f(dF + (t0 * P + j) * D + d, 0.f);
    return;
  }

  // 2. Coefficients, serially (O(n)), by one thread.
  if (threadIdx.x == 0) {
    top_sh = cr::top2_of(s, n);
    if (shared) {
      const float inv = cr::inv_or_zero(cr::weights(s, n, -1, top_sh.m1, plane[kE]));
      for (int64_t k = 0; k < n; ++k) plane[kE][k] *= inv;  // a_k
    } else {
      cr::loo_coefficients(s, n, top_sh, plane[kE], plane[kInvZ], plane[kE2], plane[kTmp]);
    }
  }
  __syncthreads();
  const cr::Top2 top = top_sh;
  const float* e = plane[kE];
  const float* inv_z = plane[kInvZ];
  const float* e2 = plane[kE2];
  const T* x1 = row(F, top.i1);
  const T* x2 = row(F, shared ? top.i1 : top.i2);
  const T* g1 = shared ? G + (b * P + j) * D : row(G, top.i1);

  // 3. Dot products, one block reduction per image (values shifted by x_i1 / x_i2, see
  //    context_reweight_common.h).
  for (int64_t k = 0; k < n; ++k) {
    const T* xk = row(F, k);
    float dp = 0.f, xh = 0.f, p1 = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      const float xs = load_f(xk + d) - load_f(x1 + d);
      if (shared) {
        dp += load_f(g1 + d) * xs;  // g . (x_k - x_i1)
        continue;
      }
      const float gk = load_f(row(G, k) + d);
      float ysum = 0.f, hsum = 0.f;
      for (int64_t m = 0; m < n; ++m) {
        if (m == k) continue;
        ysum += e[m] * (load_f(row(F, m) + d) - load_f(x1 + d));
        hsum += inv_z[m] * load_f(row(G, m) + d);
      }
      dp += gk * ysum;
      xh += xs * hsum;
      p1 += load_f(g1 + d) * (load_f(xk + d) - load_f(x2 + d));
    }
    dp = block_sum(dp, red);
    if (!shared) {
      xh = block_sum(xh, red);
      p1 = block_sum(p1, red);
    }
    if (threadIdx.x == 0) {
      plane[kDp][k] = dp;
      plane[kXh][k] = xh;
      plane[kP1][k] = p1;
    }
  }
  __syncthreads();

  // 4. d scores (serial, O(n)).
  if (threadIdx.x == 0) {
    float* ds = plane[kDs];
    if (shared) {
      float c = 0.f;
      for (int64_t k = 0; k < n; ++k) c += e[k] * plane[kDp][k];
      for (int64_t k = 0; k < n; ++k) ds[k] = e[k] * (plane[kDp][k] - c);
    } else {
      float c1 = 0.f;
      for (int64_t k = 0; k < n; ++k) c1 += e2[k] * plane[kP1][k];
      for (int64_t k = 0; k < n; ++k) plane[kC][k] = plane[kDp][k] * inv_z[k] * inv_z[k];
      cr::sums_but_one(plane[kC], n, plane[kCh]);
      for (int64_t k = 0; k < n; ++k)
        ds[k] = cr::loo_dscore(e[k], plane[kXh][k], plane[kCh][k], e2[k], plane[kP1][k], c1);
    }
    for (int64_t k = 0; k < n; ++k) dS[(t0 + k) * P + j] = ds[k];
  }

  // 5. d values (optional; they need none of step 4's results, so no barrier).
  if (dF == nullptr) return;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    for (int64_t k = 0; k < n; ++k) {
      float gk;
      if (shared) {
        gk = e[k] * load_f(g1 + d);
      } else {
        float hsum = 0.f;
        for (int64_t i = 0; i < n; ++i)
          if (i != k) hsum += inv_z[i] * load_f(row(G, i) + d);
        gk = e[k] * hsum + e2[k] * load_f(g1 + d);
      }
      store_f(dF + ((t0 + k) * P + j) * D + d, gk);
    }
  }
}

template <typename T>
cudaError_t launch(const void* values, const float* scores, const void* cu_images,
                   bool cu_is_int64, int64_t B, int64_t num_images, int64_t P, int64_t D,
                   bool shared, float* scores_workspace, void* out, cudaStream_t stream) {
  const int64_t blocks = B * P;
  if (blocks == 0 || D == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const T* F = static_cast<const T*>(values);
  T* o = static_cast<T*>(out);
  if (cu_is_int64) {
    context_reweight_fwd_kernel<T, int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        F, scores, static_cast<const int64_t*>(cu_images), num_images, P, D, shared,
        scores_workspace, o);
  } else {
    context_reweight_fwd_kernel<T, int32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        F, scores, static_cast<const int32_t*>(cu_images), num_images, P, D, shared,
        scores_workspace, o);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* grad_out, const void* values, const float* scores,
                       const void* cu_images, bool cu_is_int64, int64_t B, int64_t num_images,
                       int64_t P, int64_t D, bool shared, float* workspace, void* d_values,
                       float* d_scores, cudaStream_t stream) {
  const int64_t blocks = B * P;
  if (blocks == 0 || D == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const T* Gp = static_cast<const T*>(grad_out);
  const T* F = static_cast<const T*>(values);
  T* dF = static_cast<T*>(d_values);
  if (cu_is_int64) {
    context_reweight_bwd_kernel<T, int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        Gp, F, scores, static_cast<const int64_t*>(cu_images), num_images, P, D, shared, workspace,
        dF, d_scores);
  } else {
    context_reweight_bwd_kernel<T, int32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        Gp, F, scores, static_cast<const int32_t*>(cu_images), num_images, P, D, shared, workspace,
        dF, d_scores);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" int64_t sam_fast_context_reweight_bwd_workspace_floats(int64_t num_images, int64_t P) {
  return static_cast<int64_t>(kPlanes) * P * num_images;
}

extern "C" int sam_fast_context_reweight_bwd_cuda(
    const void* grad_out, const void* values, int dtype, const float* scores,
    const void* cu_images, int cu_images_is_int64, int64_t num_samples, int64_t num_images,
    int64_t P, int64_t D, int shared, float* workspace, void* d_values, float* d_scores,
    cudaStream_t stream) {
  const bool cu64 = cu_images_is_int64 != 0, sh = shared != 0;
  switch (dtype) {
    case SAM_FAST_F32:
      return launch_bwd<float>(grad_out, values, scores, cu_images, cu64, num_samples, num_images, P,
                               D, sh, workspace, d_values, d_scores, stream);
    case SAM_FAST_F16:
      return launch_bwd<__half>(grad_out, values, scores, cu_images, cu64, num_samples, num_images,
                                P, D, sh, workspace, d_values, d_scores, stream);
    case SAM_FAST_BF16:
      return launch_bwd<__nv_bfloat16>(grad_out, values, scores, cu_images, cu64, num_samples,
                                       num_images, P, D, sh, workspace, d_values, d_scores, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int sam_fast_context_reweight_fwd_cuda(const void* values, int dtype, const float* scores,
                                                  const void* cu_images, int cu_images_is_int64,
                                                  int64_t num_samples, int64_t num_images,
                                                  int64_t P, int64_t D, int shared,
                                                  float* scores_workspace, void* out,
                                                  cudaStream_t stream) {
  const bool cu64 = cu_images_is_int64 != 0, sh = shared != 0;
  switch (dtype) {
    case SAM_FAST_F32:
      return launch<float>(values, scores, cu_images, cu64, num_samples, num_images, P, D, sh,
                           scores_workspace, out, stream);
    case SAM_FAST_F16:
      return launch<__half>(values, scores, cu_images, cu64, num_samples, num_images, P, D, sh,
                            scores_workspace, out, stream);
    case SAM_FAST_BF16:
      return launch<__nv_bfloat16>(values, scores, cu_images, cu64, num_samples, num_images, P, D,
                                   sh, scores_workspace, out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" const char* sam_fast_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
