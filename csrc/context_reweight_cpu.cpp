// CPU implementation of sam_fast::context_reweight_fwd / _bwd: at::parallel_for over (sample,
// patch) columns; per column the value rows F[t, j, :] are converted to fp32 once (kept in cache
// while the column is processed) and its scores gathered from the given [T, P], and every step is
// an O(n D) sweep written as plain loops the compiler vectorises. The per-column algebra (top-2 maxima, prefix/suffix leave-one-out sums, the
// score-gradient formula) lives in context_reweight_common.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "context_reweight.h"
#include "context_reweight_common.h"

// The column loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time
// (the wheel must run on any x86-64; the helpers below inline into each clone).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SAM_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAM_FAST_CPU_CLONES
#endif

namespace sam_fast {
namespace {

// fp32 dot product with 16 running sums (a fixed order: results do not depend on threads).
inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t D) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += a[d + l] * b[d + l];
  }
  float s = 0.f;
  for (; d < D; ++d) s += a[d] * b[d];
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// sum_d a[d] * (x[d] - y[d]): the difference is taken first, so x == y gives exactly 0.
inline float dot_diff(const float* __restrict__ a, const float* __restrict__ x,
                      const float* __restrict__ y, int64_t D) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += a[d + l] * (x[d + l] - y[d + l]);
  }
  float s = 0.f;
  for (; d < D; ++d) s += a[d] * (x[d] - y[d]);
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// y += a * (x - z)
inline void axpy_diff(float* __restrict__ y, float a, const float* __restrict__ x,
                      const float* __restrict__ z, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * (x[d] - z[d]);
}

inline void axpy(float* __restrict__ y, float a, const float* __restrict__ x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

inline void zero(float* y, int64_t D) { std::fill(y, y + D, 0.f); }

template <typename scalar_t>
inline void store(scalar_t* __restrict__ dst, const float* __restrict__ src, float scale, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d] * scale);
}

// Rows of one column as fp32 pointers: float inputs are used in place, others converted once.
template <typename scalar_t>
struct Rows {
  static constexpr bool kIsFloat = std::is_same<scalar_t, float>::value;
  std::vector<float> buf;
  std::vector<const float*> ptr;
  Rows(int64_t max_n, int64_t D) : buf(kIsFloat ? 0 : max_n * D), ptr(max_n) {}
  // Row k of the column is src + k * stride.
  void load(const scalar_t* src, int64_t stride, int64_t n, int64_t D) {
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t* row = src + k * stride;
      if constexpr (kIsFloat) {
        ptr[k] = reinterpret_cast<const float*>(row);
      } else {
        float* dst = buf.data() + k * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(row[d]);
        ptr[k] = dst;
      }
    }
  }
  const float* operator[](int64_t k) const { return ptr[k]; }
};

int64_t max_images(const int64_t* cu, int64_t B) {
  int64_t max_n = 0;
  for (int64_t b = 0; b < B; ++b) max_n = std::max(max_n, cu[b + 1] - cu[b]);
  return max_n;
}

// Columns per parallel task: enough work (~GRAIN_SIZE element-operations) per task.
int64_t column_grain(const int64_t* cu, int64_t B, int64_t D) {
  const int64_t avg_n = std::max<int64_t>(1, cu[B] / std::max<int64_t>(1, B));
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, 4 * avg_n * D));
}

// A fresh output of tens of MB costs more in first-touch page faults than the kernel itself
// (measured: allocating and filling a 46 MB tensor takes ~3x a copy into an existing buffer).
// Asking for transparent huge pages before the first touch makes that 512x fewer faults; a no-op
// where THP is off or the pages are already mapped.
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t hi = lo + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t a = (lo + kHuge - 1) & ~(kHuge - 1), z = hi & ~(kHuge - 1);
  if (z > a) madvise(reinterpret_cast<void*>(a), z - a, MADV_HUGEPAGE);  // advisory: ignore errors
#endif
  return t;
}

// ------------------------------------------------------------------------------------ forward

// The scores of a column (sample b's images t0 .. t0 + n at patch j) from the given [T, P] fp32.
inline void column_scores(const float* S, int64_t P, int64_t j, int64_t t0, int64_t n, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = S[(t0 + k) * P + j];
}

template <typename scalar_t>
SAM_FAST_CPU_CLONES void fwd_columns(const scalar_t* F, const float* S, const int64_t* cu, int64_t P,
                                     int64_t D, bool shared, scalar_t* out, int64_t max_n, int64_t begin,
                                     int64_t end) {
  Rows<scalar_t> x(max_n, D);
  std::vector<float> s(max_n), e(max_n), inv_z(max_n), e2(max_n), tmp(max_n);
  std::vector<float> pre(max_n * D), acc(D), acc2(D);

  for (int64_t col = begin; col < end; ++col) {
    const int64_t b = col / P, j = col % P;
    const int64_t t0 = cu[b], n = cu[b + 1] - t0;
    column_scores(S, P, j, t0, n, s.data());
    if (!cr::column_finite(s.data(), n)) {  // NaN / inf in the column: all its outputs are NaN
      const int64_t rows = shared ? 1 : n;
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* dst = out + ((shared ? b : t0 + i) * P + j) * D;
        std::fill(dst, dst + D, static_cast<scalar_t>(cr::nan_value()));
      }
      continue;
    }
    x.load(F + (t0 * P + j) * D, P * D, n, D);
    const cr::Top2 top = cr::top2_of(s.data(), n);

    if (shared) {
      scalar_t* dst = out + (b * P + j) * D;
      if (n == 0) {
        std::fill(dst, dst + D, static_cast<scalar_t>(0.f));
        continue;
      }
      const float inv = cr::inv_or_zero(cr::weights(s.data(), n, -1, top.m1, e.data()));
      zero(acc.data(), D);
      for (int64_t k = 0; k < n; ++k) axpy(acc.data(), e[k], x[k], D);
      store(dst, acc.data(), inv, D);
      continue;
    }
    if (n == 1) {  // no contextual image
      scalar_t* dst = out + (t0 * P + j) * D;
      std::fill(dst, dst + D, static_cast<scalar_t>(0.f));
      continue;
    }
    cr::loo_coefficients(s.data(), n, top, e.data(), inv_z.data(), e2.data(), tmp.data());
    // One sweep: prefix sums (relative to m1) and the argmax's own output (relative to m2).
    float* __restrict__ a = acc.data();
    float* __restrict__ a2 = acc2.data();
    zero(a, D);
    zero(a2, D);
    for (int64_t k = 0; k < n; ++k) {
      const float* __restrict__ xk = x[k];
      float* __restrict__ pk = pre.data() + k * D;
      const float ek = e[k], e2k = e2[k];
      for (int64_t d = 0; d < D; ++d) {
        pk[d] = a[d];
        a[d] += ek * xk[d];
        a2[d] += e2k * xk[d];
      }
    }
    // Suffix sums, backwards (acc becomes the suffix); y_i = (prefix + suffix) / Z_i.
    zero(a, D);
    for (int64_t i = n - 1; i >= 0; --i) {
      scalar_t* __restrict__ dst = out + ((t0 + i) * P + j) * D;
      const float* __restrict__ xi = x[i];
      const float ei = e[i];
      if (i == top.i1) {
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<scalar_t>(a2[d]);
          a[d] += ei * xi[d];
        }
      } else {
        const float* __restrict__ pi = pre.data() + i * D;
        const float inv = inv_z[i];
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<scalar_t>((pi[d] + a[d]) * inv);
          a[d] += ei * xi[d];
        }
      }
    }
  }
}

template <typename scalar_t>
void context_reweight_fwd_kernel(const scalar_t* F, const float* S, const int64_t* cu, int64_t B,
                                 int64_t P, int64_t D, bool shared, scalar_t* out) {
  if (B == 0 || P == 0 || D == 0) return;
  const int64_t max_n = max_images(cu, B);
  at::parallel_for(0, B * P, column_grain(cu, B, D), [&](int64_t begin, int64_t end) {
    fwd_columns<scalar_t>(F, S, cu, P, D, shared, out, max_n, begin, end);
  });
}

// ----------------------------------------------------------------------------------- backward

// Every column writes only its own rows of dF and entries of dS (no reduction across columns), so
// the result is bitwise the same on any number of threads.
template <typename scalar_t>
SAM_FAST_CPU_CLONES void bwd_columns(const scalar_t* G, const scalar_t* F, const float* S,
                                     const int64_t* cu, int64_t P, int64_t D, bool shared, scalar_t* dF,
                                     float* dS, int64_t max_n, int64_t begin, int64_t end) {
  Rows<scalar_t> x(max_n, D), g(max_n, D);
  std::vector<float> s(max_n), e(max_n), inv_z(max_n), e2(max_n), tmp(max_n);
  std::vector<float> dp(max_n), xh(max_n), p1(max_n), c(max_n), ch(max_n);
  std::vector<float> Gk(dF ? max_n * D : 0), acc(D), h(D);

  for (int64_t col = begin; col < end; ++col) {
    const int64_t b = col / P, j = col % P;
    const int64_t t0 = cu[b], n = cu[b + 1] - t0;
    if (n == 0) continue;
    column_scores(S, P, j, t0, n, s.data());
    float* ds = dS + t0 * P + j;  // ds[k * P]: the score gradient of image t0 + k

    if (!cr::column_finite(s.data(), n)) {  // NaN / inf in the column: NaN gradients
      for (int64_t k = 0; k < n; ++k) ds[k * P] = cr::nan_value();
      if (dF) {
        for (int64_t k = 0; k < n; ++k) {
          scalar_t* dst = dF + ((t0 + k) * P + j) * D;
          std::fill(dst, dst + D, static_cast<scalar_t>(cr::nan_value()));
        }
      }
      continue;
    }
    x.load(F + (t0 * P + j) * D, P * D, n, D);
    const cr::Top2 top = cr::top2_of(s.data(), n);

    if (shared) {
      g.load(G + (b * P + j) * D, 0, 1, D);
      const float inv = cr::inv_or_zero(cr::weights(s.data(), n, -1, top.m1, e.data()));
      float cc = 0.f;  // g . (y - x_i1), from p_k = g . (x_k - x_i1) (exactly 0 at i1)
      for (int64_t k = 0; k < n; ++k) {
        e[k] *= inv;  // a_k
        dp[k] = dot_diff(g[0], x[k], x[top.i1], D);
        cc += e[k] * dp[k];
      }
      for (int64_t k = 0; k < n; ++k) {
        ds[k * P] = e[k] * (dp[k] - cc);
        if (dF) store(dF + ((t0 + k) * P + j) * D, g[0], e[k], D);
      }
    } else if (n == 1) {
      ds[0] = 0.f;
      if (dF) {
        scalar_t* dst = dF + (t0 * P + j) * D;
        std::fill(dst, dst + D, static_cast<scalar_t>(0.f));
      }
    } else {
      g.load(G + (t0 * P + j) * D, P * D, n, D);
      cr::loo_coefficients(s.data(), n, top, e.data(), inv_z.data(), e2.data(), tmp.data());
      const float* g1 = g[top.i1];
      const float* x1 = x[top.i1];  // shift of the i != i1 terms
      const float* x2 = x[top.i2];  // shift of the i1 term
      // Forward sweep: acc = sum_{k'<k} e (x - x1) (prefix of y - x1), h = sum_{i<k} g_i / Z_i.
      zero(acc.data(), D);
      zero(h.data(), D);
      for (int64_t k = 0; k < n; ++k) {
        dp[k] = dot(g[k], acc.data(), D);
        xh[k] = dot_diff(h.data(), x[k], x1, D);
        p1[k] = dot_diff(g1, x[k], x2, D);
        if (dF) std::copy(h.data(), h.data() + D, Gk.data() + k * D);
        axpy_diff(acc.data(), e[k], x[k], x1, D);
        axpy(h.data(), inv_z[k], g[k], D);
      }
      // Backward sweep: the suffixes; G_k = e_k (prefix + suffix of h) + a_{i1,k} g_i1.
      zero(acc.data(), D);
      zero(h.data(), D);
      for (int64_t k = n - 1; k >= 0; --k) {
        dp[k] += dot(g[k], acc.data(), D);
        xh[k] += dot_diff(h.data(), x[k], x1, D);
        if (dF) {
          float* gk = Gk.data() + k * D;
          const float ek = e[k], ak = e2[k];
          for (int64_t d = 0; d < D; ++d) gk[d] = ek * (gk[d] + h[d]) + ak * g1[d];
        }
        axpy_diff(acc.data(), e[k], x[k], x1, D);
        axpy(h.data(), inv_z[k], g[k], D);
      }
      float c1 = 0.f;  // g_i1 . (y_i1 - x_i2)
      for (int64_t k = 0; k < n; ++k) c1 += e2[k] * p1[k];
      for (int64_t k = 0; k < n; ++k) c[k] = dp[k] * inv_z[k] * inv_z[k];  // c_k / Z_k (0 at i1)
      cr::sums_but_one(c.data(), n, ch.data());
      for (int64_t k = 0; k < n; ++k) {
        ds[k * P] = cr::loo_dscore(e[k], xh[k], ch[k], e2[k], p1[k], c1);
        if (dF) store(dF + ((t0 + k) * P + j) * D, Gk.data() + k * D, 1.f, D);
      }
    }
  }
}

template <typename scalar_t>
void context_reweight_bwd_kernel(const scalar_t* G, const scalar_t* F, const float* S,
                                 const int64_t* cu, int64_t B, int64_t P, int64_t D, bool shared,
                                 scalar_t* dF /* [T, P, D] or null */, float* dS /* [T, P] */) {
  if (B == 0 || P == 0 || D == 0) return;  // (dS is zero-filled by the caller)
  const int64_t max_n = std::max<int64_t>(1, max_images(cu, B));
  at::parallel_for(0, B * P, column_grain(cu, B, D), [&](int64_t begin, int64_t end) {
    bwd_columns<scalar_t>(G, F, S, cu, P, D, shared, dF, dS, max_n, begin, end);
  });
}

// ------------------------------------------------------------------------------------ bindings

at::Tensor context_reweight_fwd_cpu(const at::Tensor& values, const at::Tensor& scores,
                                    const at::Tensor& cu_images, bool shared) {
  check_context_reweight_inputs(values, scores, cu_images);
  TORCH_CHECK(values.is_cpu() && scores.is_cpu() && cu_images.is_cpu(),
              "sam_fast::context_reweight_fwd (CPU): all inputs must be CPU tensors, got values ",
              values.device(), ", scores ", scores.device(), ", cu_images ", cu_images.device());
  const at::Tensor F = values.contiguous();
  const at::Tensor S = scores.to(at::kFloat).contiguous();
  const at::Tensor cu = checked_offsets_cpu(cu_images, F.size(0));
  const int64_t rows = shared ? cu_images.size(0) - 1 : F.size(0);
  at::Tensor out = empty_huge({rows, F.size(1), F.size(2)}, F.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(),
                                  "context_reweight_fwd_cpu", [&] {
    context_reweight_fwd_kernel<scalar_t>(F.data_ptr<scalar_t>(), S.data_ptr<float>(),
                                          cu.data_ptr<int64_t>(), cu.size(0) - 1, F.size(1),
                                          F.size(2), shared, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> context_reweight_bwd_cpu(const at::Tensor& grad_out,
                                                            const at::Tensor& values,
                                                            const at::Tensor& scores,
                                                            const at::Tensor& cu_images,
                                                            bool shared, bool values_grad) {
  check_context_reweight_inputs(values, scores, cu_images);
  check_context_reweight_grad(grad_out, values, cu_images, shared);
  TORCH_CHECK(values.is_cpu() && scores.is_cpu() && cu_images.is_cpu() && grad_out.is_cpu(),
              "sam_fast::context_reweight_bwd (CPU): all inputs must be CPU tensors");
  const at::Tensor F = values.contiguous();
  const at::Tensor G = grad_out.to(F.scalar_type()).contiguous();
  const at::Tensor S = scores.to(at::kFloat).contiguous();
  const at::Tensor cu = checked_offsets_cpu(cu_images, F.size(0));
  const int64_t B = cu.size(0) - 1, P = F.size(1), D = F.size(2);
  at::Tensor dF = values_grad ? empty_huge(F.sizes(), F.options())
                              : empty_context_reweight_grad_values(F, false);
  // zeros: the entries of no column (D == 0) and of empty shared samples stay 0
  at::Tensor dS = at::zeros({F.size(0), P}, F.options().dtype(at::kFloat));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(),
                                  "context_reweight_bwd_cpu", [&] {
    context_reweight_bwd_kernel<scalar_t>(
        G.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(), S.data_ptr<float>(), cu.data_ptr<int64_t>(),
        B, P, D, shared, values_grad ? dF.data_ptr<scalar_t>() : nullptr, dS.data_ptr<float>());
  });
  return {dF, dS};
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) {
  m.impl("context_reweight_fwd", &context_reweight_fwd_cpu);
  m.impl("context_reweight_bwd", &context_reweight_bwd_cpu);
}

}  // namespace sam_fast
