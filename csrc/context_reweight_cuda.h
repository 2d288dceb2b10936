// C ABI of the CUDA launcher of context re-weighting. No torch and no CUDA headers are needed to
// include this, so the torch binding (context_reweight_cuda_binding.cpp) and the kernel
// (context_reweight_cuda.cu, compiled by plain nvcc) meet only through raw pointers.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The same typedef as CUDA's driver_types.h (repeating an identical typedef is allowed).
typedef struct CUstream_st* cudaStream_t;

enum sam_fast_dtype { SAM_FAST_F32 = 0, SAM_FAST_F16 = 1, SAM_FAST_BF16 = 2 };

// fp32 workspace of either direction (`backward` != 0: the backward's), in floats: the
// per-(image, patch) softmax coefficients, the per-column argmax rows and, backward, the partial
// channel sums of the score gradients (context_reweight_cuda.cu).
int64_t sam_fast_context_reweight_workspace_floats(int64_t num_samples, int64_t num_images, int64_t P,
                                                   int64_t D, int backward);

// values [T, P, D] contiguous of `dtype`; scores [T, P] fp32 (device); cu_images [B + 1] int32 or
// int64 (device); workspace of sam_fast_context_reweight_workspace_floats(B, T, P, D, 0) fp32; out
// [B, P, D] when shared else [T, P, D], of `dtype`. Returns a cudaError_t (0 = success).
int sam_fast_context_reweight_fwd_cuda(const void* values, int dtype, const float* scores,
                                       const void* cu_images, int cu_images_is_int64,
                                       int64_t num_samples, int64_t num_images, int64_t P,
                                       int64_t D, int shared, float* workspace, void* out,
                                       cudaStream_t stream);

// Backward. grad_out shaped like the forward output, of `dtype`; workspace of
// sam_fast_context_reweight_workspace_floats(B, T, P, D, 1) fp32; d_values [T, P, D] of `dtype`, or
// NULL when not wanted; d_scores [T, P] fp32, zero-filled by the caller, receives the score
// gradients.
int sam_fast_context_reweight_bwd_cuda(const void* grad_out, const void* values, int dtype,
                                       const float* scores, const void* cu_images,
                                       int cu_images_is_int64, int64_t num_samples,
                                       int64_t num_images, int64_t P, int64_t D, int shared,
                                       float* workspace, void* d_values, float* d_scores,
                                       cudaStream_t stream);

const char* sam_fast_cuda_error_string(int error);

#ifdef __cplusplus
}
#endif
