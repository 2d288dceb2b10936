// Per-(sample, patch) arithmetic of context re-weighting, shared by the CPU kernels
// (context_reweight_cpu.cpp) and the CUDA kernels (context_reweight_cuda.cu): the CPU tests then
// exercise the very code the GPU runs. No torch headers here, so plain nvcc compiles it.
//
// For one sample (n images) and one patch j, with the given scores s[k] and values F[k, j, :]:
//   support(i) = all k           (mode "shared", written i = -1)
//              = all k != i      (mode "leave_one_out", output of image i)
//   y_i = sum_{k in support(i)} a_ik F[k, j, :],   a_ik = exp(s[k] - M_i) / Z_i
// where M_i is the max over the support: the largest score m1, or the second largest m2 when the
// excluded image is the argmax i1. One pass keeping the top two serves every output, and no exp()
// overflows or underflows to an all-zero denominator, whatever the score magnitude. An empty
// support (a one-image sample in leave-one-out) gives zeros.
//
// O(n D) leave-one-out without cancellation. Relative to m1, e_k = exp(s[k] - m1) <= 1 and
// e_i1 = 1, so for every i != i1 the support of i contains i1 and Z_i >= 1:
//   y_i = (Pre_i + Suf_i) / Z_i,  Pre_i = sum_{k < i} e_k F_k,  Suf_i = sum_{k > i} e_k F_k,
// a re-association of the direct sum (never "total minus self", which cancels catastrophically
// when e_i F_i dominates). Only y_i1 is special: relative to m1 all other weights may underflow,
// so it is summed directly with weights exp(s[k] - m2).
//
// Backward (g_i = dL/dy_i; p_ik = g_i . F_k; c_i = g_i . y_i):
//   ds_k = sum_{i : k in support(i)} a_ik (p_ik - c_i)
//   dF_k = sum_{i : k in support(i)} a_ik g_i
// In leave-one-out, a_ik = e_k / Z_i for i != i1, so with h_i = g_i / Z_i (h_i1 = 0):
//   G_k = sum_{i != k} a_ik g_i = e_k * sum_{i != k} h_i + [k != i1] a_{i1,k} g_i1
// and the "sum over all but k" is again a prefix plus a suffix.
// ds is invariant to shifting every F_k of the column by one vector (softmax weights sum to 1), so
// the backward uses F_k - F_i1 for the i != i1 terms and F_k - F_i2 (i2: the argmax of i1's
// support) for the i1 term: the dominant image's own difference is then exactly 0, and a
// saturated softmax (one image dominating) yields its tiny ds accurately instead of as the
// difference of two large, nearly equal dot products.
//
// Non-finite input. A column (sample, patch) with any non-finite score has no defined softmax,
// so every output of the column is NaN, and so are its value gradients and its ds; this covers a
// NaN score, +inf (inf - inf) and -inf scores alike, and a one-image leave-one-out column too.
// `column_finite` decides it, and the kernels take that branch before any other arithmetic of
// the column. Independently, Top2's indices are always valid rows (in [0, n) for n >= 1) whatever
// the scores: comparisons with NaN are false, and an index left at -1 would be read out of bounds.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define SAM_FAST_HD __host__ __device__ __forceinline__
#else
#define SAM_FAST_HD inline
#endif

namespace sam_fast {
namespace cr {

// Largest score m1 (at index i1, the first one on ties) and second-largest m2 (at i2).
struct Top2 {
  float m1;
  float m2;
  int64_t i1;
  int64_t i2;
};

SAM_FAST_HD Top2 top2_init() {
  Top2 t;
  t.m1 = -INFINITY;
  t.m2 = -INFINITY;
  t.i1 = -1;
  t.i2 = -1;
  return t;
}

SAM_FAST_HD void top2_push(Top2& t, float s, int64_t k) {
  if (s > t.m1) {
    t.m2 = t.m1;
    t.i2 = t.i1;
    t.m1 = s;
    t.i1 = k;
  } else if (s > t.m2) {  // a tie with m1 lands here, so m2 == m1 and the excluded max stays right
    t.m2 = s;
    t.i2 = k;
  }
}

// Top two of s[0..n). The indices are rows of the column even when no comparison succeeds (NaN
// or -inf scores): i1 defaults to 0 and i2 to another row (or 0 when n == 1). Such a column is
// not finite (`column_finite`) and its values are not used, only its indices must be safe.
SAM_FAST_HD Top2 top2_of(const float* s, int64_t n) {
  Top2 t = top2_init();
  for (int64_t k = 0; k < n; ++k) top2_push(t, s[k], k);
  if (t.i1 < 0) t.i1 = 0;
  if (t.i2 < 0) t.i2 = (t.i1 == 0 && n > 1) ? 1 : 0;
  return t;
}

// A finite float (false for NaN and +-inf), without isfinite(): a comparison that also holds
// on the device and under any floating-point flags.
SAM_FAST_HD bool is_finite(float v) { return fabsf(v) <= FLT_MAX; }

// Whether every score of the column is finite (see "Non-finite input" above); false -> all
// outputs and gradients of the column are NaN.
SAM_FAST_HD bool column_finite(const float* s, int64_t n) {
  bool ok = true;
  for (int64_t k = 0; k < n; ++k) ok = ok && is_finite(s[k]);
  return ok;
}

// The NaN written for a column that is not finite.
SAM_FAST_HD float nan_value() { return NAN; }

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

// out[i] = sum_{k != i} v[k] as a prefix plus a suffix: no "total minus v[i]" cancellation.
SAM_FAST_HD void sums_but_one(const float* v, int64_t n, float* out) {
  float pre = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = pre;
    pre += v[i];
  }
  float suf = 0.f;
  for (int64_t i = n - 1; i >= 0; --i) {
    out[i] += suf;
    suf += v[i];
  }
}

// Leave-one-out coefficients of one column relative to m1 (see the header comment):
// e[k] = exp(s[k] - m1); inv_z[i] = 1 / Z_i for i != i1 and 0 for i1; e2[k] = exp(s[k] - m2) / Z_i1
// for k != i1 (the weights a_{i1,k} of the argmax's own output) and 0 at i1. `tmp` holds n floats.
SAM_FAST_HD void loo_coefficients(const float* s, int64_t n, const Top2& t, float* e, float* inv_z,
                                  float* e2, float* tmp) {
  for (int64_t k = 0; k < n; ++k) e[k] = expf(s[k] - t.m1);
  sums_but_one(e, n, tmp);
  for (int64_t i = 0; i < n; ++i) inv_z[i] = i == t.i1 ? 0.f : inv_or_zero(tmp[i]);
  const float inv2 = inv_or_zero(weights(s, n, t.i1, t.m2, e2));
  for (int64_t k = 0; k < n; ++k) e2[k] *= inv2;
}

// d(loss)/d(score k) in leave-one-out from its pieces (header comment):
//   ds_k = x_k . G_k - sum_{i != k} a_ik c_i
//        = e_k (xh_k - ch_k) + a_{i1,k} (p_{i1,k} - c_i1)   with  xh_k = x_k . sum_{i != k} h_i,
// ch_k = sum_{i != k} c_i / Z_i (c_i1 / Z_i1 excluded: h_i1 = 0), and the a_{i1,k} term only for
// k != i1 (a_{i1,i1} = 0 already).
SAM_FAST_HD float loo_dscore(float e_k, float xh_k, float ch_k, float a_i1k, float p_i1k, float c_i1) {
  return e_k * (xh_k - ch_k) + a_i1k * (p_i1k - c_i1);
}

}  // namespace cr
}  // namespace sam_fast
