// Per-(sample, patch) arithmetic of context re-weighting, shared by the CPU kernel
// (context_reweight_cpu.cpp) and the CUDA kernel (context_reweight_cuda.cu): the CPU tests then
// exercise the very code the GPU runs. No torch headers here, so plain nvcc compiles it.
//
// For one sample (n images) and one patch j, with scores s[k] = F[k, j, :] . w + b:
//   support(excluded) = all k              when excluded < 0   (mode "shared")
//                     = all k != excluded  otherwise            (mode "leave_one_out")
//   out = sum_{k in support} exp(s[k] - m) F[k, j, :] / sum_{k in support} exp(s[k] - m)
// where m is the max over the support. That max is the largest score, or the second largest when
// the largest is the excluded image, so one pass keeping the top two serves every output and no
// exp() overflows or underflows to an all-zero denominator, whatever the score magnitude.
// An empty support (a one-image sample in leave-one-out) gives zeros.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define SAM_FAST_HD __host__ __device__ __forceinline__
#else
#define SAM_FAST_HD inline
#endif

namespace sam_fast {
namespace cr {

// Largest score m1 (at index i1, the first one on ties) and second-largest m2 of one column.
struct Top2 {
  float m1;
  float m2;
  int64_t i1;
};

SAM_FAST_HD Top2 top2_init() {
  Top2 t;
  t.m1 = -INFINITY;
  t.m2 = -INFINITY;
  t.i1 = -1;
  return t;
}

SAM_FAST_HD void top2_push(Top2& t, float s, int64_t k) {
  if (s > t.m1) {
    t.m2 = t.m1;
    t.m1 = s;
    t.i1 = k;
  } else if (s > t.m2) {  // a tie with m1 lands here, so m2 == m1 and the excluded max stays right
    t.m2 = s;
  }
}

SAM_FAST_HD Top2 top2_of(const float* s, int64_t n) {
  Top2 t = top2_init();
  for (int64_t k = 0; k < n; ++k) top2_push(t, s[k], k);
  return t;
}

// Max of the softmax support; -inf when the support is empty.
SAM_FAST_HD float support_max(const Top2& t, int64_t excluded) {
  return excluded == t.i1 ? t.m2 : t.m1;
}

// Unnormalised softmax weight of image k; exactly 0 for the excluded image.
SAM_FAST_HD float weight(float s_k, int64_t k, int64_t excluded, float m) {
  return k == excluded ? 0.f : expf(s_k - m);
}

// Denominator of the softmax: >= 1 for a non-empty support (the max contributes exp(0)), else 0.
SAM_FAST_HD float normaliser(const float* s, int64_t n, int64_t excluded, float m) {
  float z = 0.f;
  for (int64_t k = 0; k < n; ++k) z += weight(s[k], k, excluded, m);
  return z;
}

// Same as `normaliser`, also writing every weight to w[0..n) (CPU: reused across the D loop).
SAM_FAST_HD float weights(const float* s, int64_t n, int64_t excluded, float m, float* w) {
  float z = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    w[k] = weight(s[k], k, excluded, m);
    z += w[k];
  }
  return z;
}

// 1/z, or 0 for an empty support so that its output is zeros rather than 0/0.
SAM_FAST_HD float inv_or_zero(float z) { return z > 0.f ? 1.f / z : 0.f; }

}  // namespace cr
}  // namespace sam_fast
