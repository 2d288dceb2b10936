// CPU implementation of sam_fast::context_reweight_fwd / _bwd: at::parallel_for over (sample,
// patch) columns; per column the rows F[t, j, :] are converted to fp32 once (kept in cache while
// the column is processed), and every step is an O(n D) sweep written as plain loops the compiler
// vectorises. The per-column algebra (top-2 maxima, prefix/suffix leave-one-out sums, the
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
#include <optional>
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

// Score of one row: the dot product accumulates in fp64 (16 independent partial sums, which the
// compiler vectorises) and is rounded to fp32 once. Scores of magnitude 1e4 lose ~1e-3 to an fp32
// accumulation, which moves near-tied softmax weights; this is one multiply-add per element, far
// below the memory traffic of the op.
inline float score(const float* __restrict__ x, const float* __restrict__ w, int64_t D, float bias) {
  constexpr int kLanes = 16;
  double part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += static_cast<double>(x[d + l]) * w[d + l];
  }
  double s = bias;
  for (; d < D; ++d) s += static_cast<double>(x[d]) * w[d];
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return static_cast<float>(s);
}

// fp32 dot product with 16 partial sums (a fixed order: results do not depend on threads).
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

// Up to 16 columns per score block, fewer when a block's rows (n images x D floats per column)
// would not stay well inside a 1 MB L2.
constexpr int64_t kMaxScoreBlock = 16;
inline int64_t score_block(int64_t max_n, int64_t D) {
  const int64_t bytes_per_column = std::max<int64_t>(1, max_n * D * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(1, std::min<int64_t>(kMaxScoreBlock, (int64_t{512} << 10) / bytes_per_column));
}

// The scores of a column's rows. For fp32 input they are computed for a block of `score_block`
// consecutive columns of one sample at a time, image by image, so each image's rows are read as
// one contiguous run: a column's own rows are P*D*4 bytes apart, and read column by column the
// loads wait on memory (40% of the forward in perf). The block's rows then stay in L2 for the
// sweeps. The same `score` on the same values: results are bitwise those of the per-column order.
template <typename scalar_t>
struct ColumnScores {
  static constexpr bool kBlock = std::is_same<scalar_t, float>::value;
  int64_t cols, begin = 0, end = 0;
  std::vector<float> s;
  ColumnScores(int64_t max_n, int64_t D) : cols(score_block(max_n, D)), s(kBlock ? max_n * cols : 0) {}

  // Scores of column `col` (sample b, patch j, rows t0 .. t0 + n) into out[0, n); a block never
  // extends to `limit` or past the sample. `x` holds the column's rows (used for non-fp32 input).
  // `given` [T, P] (or null): the caller's scores, read instead of computed.
  void get(const scalar_t* F, const float* w, float bias, const float* given, int64_t P, int64_t D,
           int64_t col, int64_t b, int64_t j, int64_t t0, int64_t n, int64_t limit,
           const Rows<scalar_t>& x, float* out) {
    if (given != nullptr) {
      for (int64_t k = 0; k < n; ++k) out[k] = given[(t0 + k) * P + j];
      return;
    }
    if constexpr (kBlock) {
      if (col < begin || col >= end) {
        begin = col;
        end = std::min(std::min(limit, col + cols), (b + 1) * P);
        for (int64_t k = 0; k < n; ++k) {
          const float* row = reinterpret_cast<const float*>(F) + ((t0 + k) * P + j) * D;
          for (int64_t c = 0; c < end - begin; ++c) s[k * cols + c] = score(row + c * D, w, D, bias);
        }
      }
      for (int64_t k = 0; k < n; ++k) out[k] = s[k * cols + (col - begin)];
    } else {
      for (int64_t k = 0; k < n; ++k) out[k] = score(x[k], w, D, bias);
    }
  }
};

template <typename scalar_t>
SAM_FAST_CPU_CLONES void fwd_columns(const scalar_t* F, const float* w, float bias, const float* given,
                                     const int64_t* cu, int64_t P, int64_t D, bool shared, scalar_t* out,
                                     int64_t max_n, int64_t begin, int64_t end) {
  Rows<scalar_t> x(max_n, D);
  std::vector<float> s(max_n), e(max_n), inv_z(max_n), e2(max_n), tmp(max_n);
  std::vector<float> pre(max_n * D), acc(D), acc2(D);
  ColumnScores<scalar_t> scores(max_n, D);

  for (int64_t col = begin; col < end; ++col) {
    const int64_t b = col / P, j = col % P;
    const int64_t t0 = cu[b], n = cu[b + 1] - t0;
    x.load(F + (t0 * P + j) * D, P * D, n, D);
    scores.get(F, w, bias, given, P, D, col, b, j, t0, n, end, x, s.data());
    if (!cr::column_finite(s.data(), n)) {  // NaN / inf in the column: all its outputs are NaN
      const int64_t rows = shared ? 1 : n;
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* dst = out + ((shared ? b : t0 + i) * P + j) * D;
        std::fill(dst, dst + D, static_cast<scalar_t>(cr::nan_value()));
      }
      continue;
    }
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
void context_reweight_fwd_kernel(const scalar_t* F, const float* w, float bias, const float* given,
                                 const int64_t* cu, int64_t B, int64_t P, int64_t D, bool shared,
                                 scalar_t* out) {
  if (B == 0 || P == 0 || D == 0) return;
  const int64_t max_n = max_images(cu, B);
  at::parallel_for(0, B * P, column_grain(cu, B, D), [&](int64_t begin, int64_t end) {
    fwd_columns<scalar_t>(F, w, bias, given, cu, P, D, shared, out, max_n, begin, end);
  });
}

// ----------------------------------------------------------------------------------- backward

// Columns of a reduction task for d(weight), d(bias): a fixed partition of the columns (not the
// thread count's), and the partial sums are added in task order, so the result is bitwise
// reproducible on any number of threads.
constexpr int64_t kColsPerTask = 8;

template <typename scalar_t>
SAM_FAST_CPU_CLONES void bwd_tasks(const scalar_t* G, const scalar_t* F, const float* w, float bias,
                                   const float* given, const int64_t* cu, int64_t P, int64_t D,
                                   bool shared, scalar_t* dF, float* partial, float* dS, int64_t cols,
                                   int64_t max_n, int64_t task_begin, int64_t task_end) {
  Rows<scalar_t> x(max_n, D), g(max_n, D);
  std::vector<float> s(max_n), e(max_n), inv_z(max_n), e2(max_n), tmp(max_n);
  std::vector<float> dp(max_n), xh(max_n), p1(max_n), c(max_n), ch(max_n), ds(max_n);
  std::vector<float> Gk(dF ? max_n * D : 0), acc(D), h(D);
  ColumnScores<scalar_t> scores(max_n, D);

  for (int64_t task = task_begin; task < task_end; ++task) {
    float* dw = partial != nullptr ? partial + task * (D + 1) : nullptr;  // null: given scores
    float db = 0.f;
    if (dw != nullptr) zero(dw, D);
    for (int64_t col = task * kColsPerTask; col < std::min(cols, (task + 1) * kColsPerTask); ++col) {
      const int64_t b = col / P, j = col % P;
      const int64_t t0 = cu[b], n = cu[b + 1] - t0;
      if (n == 0) continue;
      x.load(F + (t0 * P + j) * D, P * D, n, D);
      scores.get(F, w, bias, given, P, D, col, b, j, t0, n, std::min(cols, (task + 1) * kColsPerTask), x,
                 s.data());
      const cr::Top2 top = cr::top2_of(s.data(), n);

      if (!cr::column_finite(s.data(), n)) {  // NaN / inf in the column: NaN gradients
        std::fill(ds.begin(), ds.begin() + n, cr::nan_value());
        if (dF) {
          for (int64_t k = 0; k < n; ++k) {
            scalar_t* dst = dF + ((t0 + k) * P + j) * D;
            std::fill(dst, dst + D, static_cast<scalar_t>(cr::nan_value()));
          }
        }
      } else if (shared) {
        g.load(G + (b * P + j) * D, 0, 1, D);
        const float inv = cr::inv_or_zero(cr::weights(s.data(), n, -1, top.m1, e.data()));
        float cc = 0.f;  // g . (y - x_i1), from p_k = g . (x_k - x_i1) (exactly 0 at i1)
        for (int64_t k = 0; k < n; ++k) {
          e[k] *= inv;  // a_k
          dp[k] = dot_diff(g[0], x[k], x[top.i1], D);
          cc += e[k] * dp[k];
        }
        for (int64_t k = 0; k < n; ++k) {
          ds[k] = e[k] * (dp[k] - cc);
          if (dF) {
            scalar_t* dst = dF + ((t0 + k) * P + j) * D;
            const float* gr = g[0];
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(e[k] * gr[d] + ds[k] * w[d]);
          }
        }
      } else if (n == 1) {
        if (dF) {
          scalar_t* dst = dF + (t0 * P + j) * D;
          std::fill(dst, dst + D, static_cast<scalar_t>(0.f));
        }
        continue;  // ds = 0
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
          ds[k] = cr::loo_dscore(e[k], xh[k], ch[k], e2[k], p1[k], c1);
          if (dF) {
            scalar_t* dst = dF + ((t0 + k) * P + j) * D;
            const float* gk = Gk.data() + k * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(gk[d] + ds[k] * w[d]);
          }
        }
      }
      if (dS != nullptr) {  // given scores: their gradient (w is zeros, no d(weight))
        for (int64_t k = 0; k < n; ++k) dS[(t0 + k) * P + j] = ds[k];
        continue;
      }
      for (int64_t k = 0; k < n; ++k) {
        axpy(dw, ds[k], x[k], D);
        db += ds[k];
      }
    }
    if (dw != nullptr) dw[D] = db;
  }
}

template <typename scalar_t>
void context_reweight_bwd_kernel(const scalar_t* G, const scalar_t* F, const float* w, float bias,
                                 const float* given, const int64_t* cu, int64_t B, int64_t P,
                                 int64_t D, bool shared, scalar_t* dF,
                                 float* partial /* [tasks, D + 1], or null with dS */,
                                 float* dS /* [T, P] or null */) {
  const int64_t cols = B * P;
  const int64_t tasks = (cols + kColsPerTask - 1) / kColsPerTask;
  if (tasks == 0 || D == 0) return;
  const int64_t max_n = std::max<int64_t>(1, max_images(cu, B));
  const int64_t grain = std::max<int64_t>(1, column_grain(cu, B, D) / kColsPerTask);

  at::parallel_for(0, tasks, grain, [&](int64_t task_begin, int64_t task_end) {
    bwd_tasks<scalar_t>(G, F, w, bias, given, cu, P, D, shared, dF, partial, dS, cols, max_n, task_begin,
                        task_end);
  });
}

// ------------------------------------------------------------------------------------ bindings

at::Tensor context_reweight_fwd_cpu(const at::Tensor& features, const at::Tensor& weight,
                                    const at::Tensor& bias, const at::Tensor& cu_images,
                                    bool shared, const std::optional<at::Tensor>& scores) {
  check_context_reweight_inputs(features, weight, bias, cu_images, scores);
  TORCH_CHECK(features.is_cpu() && weight.is_cpu() && bias.is_cpu() && cu_images.is_cpu(),
              "sam_fast::context_reweight_fwd (CPU): all inputs must be CPU tensors, got features ",
              features.device(), ", weight ", weight.device(), ", bias ", bias.device(),
              ", cu_images ", cu_images.device());
  const at::Tensor F = features.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float b = bias.to(at::kFloat).reshape({}).item<float>();
  const at::Tensor given = scores.has_value() ? scores->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor cu = checked_offsets_cpu(cu_images, F.size(0));
  const int64_t rows = shared ? cu_images.size(0) - 1 : F.size(0);
  at::Tensor out = empty_huge({rows, F.size(1), F.size(2)}, F.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(),
                                  "context_reweight_fwd_cpu", [&] {
    context_reweight_fwd_kernel<scalar_t>(F.data_ptr<scalar_t>(), w.data_ptr<float>(), b,
                                          given.defined() ? given.data_ptr<float>() : nullptr,
                                          cu.data_ptr<int64_t>(), cu.size(0) - 1, F.size(1),
                                          F.size(2), shared, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> context_reweight_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& cu_images, bool shared, bool features_grad,
    const std::optional<at::Tensor>& scores) {
  check_context_reweight_inputs(features, weight, bias, cu_images, scores);
  check_context_reweight_grad(grad_out, features, cu_images, shared);
  TORCH_CHECK(features.is_cpu() && weight.is_cpu() && bias.is_cpu() && cu_images.is_cpu() &&
                  grad_out.is_cpu(),
              "sam_fast::context_reweight_bwd (CPU): all inputs must be CPU tensors");
  const at::Tensor F = features.contiguous();
  const at::Tensor G = grad_out.to(F.scalar_type()).contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float b = bias.to(at::kFloat).reshape({}).item<float>();
  const at::Tensor given = scores.has_value() ? scores->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor cu = checked_offsets_cpu(cu_images, F.size(0));
  const int64_t B = cu.size(0) - 1, P = F.size(1), D = F.size(2);
  at::Tensor dF = features_grad ? empty_huge(F.sizes(), F.options())
                               : empty_context_reweight_grad_features(F, false);
  const auto f32 = F.options().dtype(at::kFloat);
  at::Tensor dS = given.defined() ? at::zeros({F.size(0), P}, f32) : at::empty({0}, f32);
  const int64_t tasks = (B * P + kColsPerTask - 1) / kColsPerTask;
  // d(weight), d(bias) partial sums: none for given scores (their gradient is dS)
  at::Tensor partial = given.defined() ? at::Tensor() : at::zeros({tasks, D + 1}, f32);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(),
                                  "context_reweight_bwd_cpu", [&] {
    context_reweight_bwd_kernel<scalar_t>(
        G.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(), w.data_ptr<float>(), b,
        given.defined() ? given.data_ptr<float>() : nullptr, cu.data_ptr<int64_t>(), B, P, D,
        shared, features_grad ? dF.data_ptr<scalar_t>() : nullptr,
        partial.defined() ? partial.data_ptr<float>() : nullptr,
        given.defined() ? dS.data_ptr<float>() : nullptr);
  });
  if (given.defined()) return {dF, at::zeros({D}, f32), at::zeros({}, f32), dS};
  // Second, deterministic pass: partial sums added in task order (fp64), per element of D + 1.
  at::Tensor red = at::empty({D + 1}, partial.options().dtype(at::kDouble));
  {
    const float* p = partial.data_ptr<float>();
    double* r = red.data_ptr<double>();
    at::parallel_for(0, D + 1, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t d = lo; d < hi; ++d) {
        double acc = 0.0;
        for (int64_t t = 0; t < tasks; ++t) acc += p[t * (D + 1) + d];
        r[d] = acc;
      }
    });
  }
  at::Tensor red32 = red.to(at::kFloat);
  return {dF, red32.narrow(0, 0, D).clone(), red32.select(0, D).clone(), dS};
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) {
  m.impl("context_reweight_fwd", &context_reweight_fwd_cpu);
  m.impl("context_reweight_bwd", &context_reweight_bwd_cpu);
}

}  // namespace sam_fast
