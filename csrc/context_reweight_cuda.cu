// CUDA kernel of context re-weighting. One block per (sample, patch) column: warps compute the
// column's scores into a global fp32 workspace, then threads stride over D and accumulate the
// softmax-weighted rows, the weights staged in shared memory one tile of images at a time.
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

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    context_reweight_fwd_kernel(const T* __restrict__ F, const float* __restrict__ w,
                                const float* __restrict__ bias, const Index* __restrict__ cu,
                                int64_t num_images, int64_t P, int64_t D, bool shared,
                                float* __restrict__ scores, T* __restrict__ out) {
  namespace cr = sam_fast::cr;
  const int64_t b = blockIdx.x / P, j = blockIdx.x % P;
  const int64_t t0 = cu[b], n = static_cast<int64_t>(cu[b + 1]) - t0;
  float* s = scores + j * num_images + t0;  // this column's scores, contiguous over images

  // 1. Scores: one warp per image row, fp64 accumulation (as on the CPU: scores of magnitude 1e4
  //    would lose ~1e-3 in fp32), butterfly reduction, rounded to fp32 once.
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t k = warp; k < n; k += kThreads / kWarp) {
    const T* row = F + ((t0 + k) * P + j) * D;
    double acc = 0.0;
    for (int64_t d = lane; d < D; d += kWarp) acc += static_cast<double>(load_f(row + d)) * w[d];
    for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) s[k] = static_cast<float>(acc + bias[0]);
  }
  __syncthreads();  // makes the block's global writes to s visible to all its threads

  // 2. Outputs: one for the sample (shared) or one per excluded image (leave-one-out).
  __shared__ float wts[kThreads];
  const cr::Top2 top = cr::top2_of(s, n);
  const int64_t n_out = shared ? 1 : n;
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

template <typename T>
cudaError_t launch(const void* features, const float* weight, const float* bias,
                   const void* cu_images, bool cu_is_int64, int64_t B, int64_t num_images,
                   int64_t P, int64_t D, bool shared, float* scores, void* out,
                   cudaStream_t stream) {
  const int64_t blocks = B * P;
  if (blocks == 0 || D == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const T* F = static_cast<const T*>(features);
  T* o = static_cast<T*>(out);
  if (cu_is_int64) {
    context_reweight_fwd_kernel<T, int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        F, weight, bias, static_cast<const int64_t*>(cu_images), num_images, P, D, shared, scores,
        o);
  } else {
    context_reweight_fwd_kernel<T, int32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        F, weight, bias, static_cast<const int32_t*>(cu_images), num_images, P, D, shared, scores,
        o);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" int sam_fast_context_reweight_fwd_cuda(const void* features, int dtype,
                                                  const float* weight, const float* bias,
                                                  const void* cu_images, int cu_images_is_int64,
                                                  int64_t num_samples, int64_t num_images,
                                                  int64_t P, int64_t D, int shared,
                                                  float* scores_workspace, void* out,
                                                  cudaStream_t stream) {
  switch (dtype) {
    case SAM_FAST_F32:
      return launch<float>(features, weight, bias, cu_images, cu_images_is_int64 != 0,
                           num_samples, num_images, P, D, shared != 0, scores_workspace, out,
                           stream);
    case SAM_FAST_F16:
      return launch<__half>(features, weight, bias, cu_images, cu_images_is_int64 != 0,
                            num_samples, num_images, P, D, shared != 0, scores_workspace, out,
                            stream);
    case SAM_FAST_BF16:
      return launch<__nv_bfloat16>(features, weight, bias, cu_images, cu_images_is_int64 != 0,
                                   num_samples, num_images, P, D, shared != 0, scores_workspace,
                                   out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" const char* sam_fast_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
