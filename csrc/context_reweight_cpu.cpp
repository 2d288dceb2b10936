// CPU implementation of sam_fast::context_reweight_fwd: at::parallel_for over (sample, patch)
// columns; per column the rows F[t, j, :] are converted to fp32 once, then every output is a
// weighted sum over D written as plain loops the compiler vectorises. Arithmetic shared with the
// CUDA kernel lives in context_reweight_common.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "context_reweight.h"
#include "context_reweight_common.h"

namespace sam_fast {
namespace {

// Score of one row: the dot product accumulates in fp64 (16 independent partial sums, which the
// compiler vectorises) and is rounded to fp32 once. Scores of magnitude 1e4 lose ~1e-3 to an fp32
// accumulation, which moves near-tied softmax weights; this pass is O(n D) against the O(n^2 D)
// weighted sums, so the extra precision costs nothing measurable.
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

template <typename scalar_t>
void context_reweight_cpu_kernel(const scalar_t* F, const float* w, float bias, const int64_t* cu,
                                 int64_t B, int64_t P, int64_t D, bool shared, scalar_t* out) {
  int64_t max_n = 0;
  for (int64_t b = 0; b < B; ++b) max_n = std::max(max_n, cu[b + 1] - cu[b]);
  if (B == 0 || P == 0 || D == 0) return;

  // Work per column ~ (n + outputs * n) * D; parallelise only when there is enough of it.
  const int64_t T = cu[B];
  const int64_t avg_n = std::max<int64_t>(1, T / B);
  const int64_t work = (shared ? 2 : avg_n + 1) * avg_n * D;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));

  at::parallel_for(0, B * P, grain, [&](int64_t begin, int64_t end) {
    constexpr bool kIsFloat = std::is_same<scalar_t, float>::value;
    std::vector<float> rows_buf(kIsFloat ? 0 : max_n * D);
    std::vector<const float*> rows(max_n);
    std::vector<float> scores(max_n), wts(max_n), acc(D);

    for (int64_t col = begin; col < end; ++col) {
      const int64_t b = col / P, j = col % P;
      const int64_t t0 = cu[b], n = cu[b + 1] - t0;

      for (int64_t k = 0; k < n; ++k) {
        const scalar_t* src = F + ((t0 + k) * P + j) * D;
        if constexpr (kIsFloat) {
          rows[k] = reinterpret_cast<const float*>(src);
        } else {
          float* dst = rows_buf.data() + k * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
          rows[k] = dst;
        }
        scores[k] = score(rows[k], w, D, bias);
      }
      const cr::Top2 top = cr::top2_of(scores.data(), n);

      // One output row: softmax over the support (all images, or all but `excluded`).
      auto emit = [&](int64_t excluded, scalar_t* __restrict__ dst) {
        const float m = cr::support_max(top, excluded);
        const float inv = cr::inv_or_zero(cr::weights(scores.data(), n, excluded, m, wts.data()));
        float* __restrict__ a = acc.data();
        std::fill(a, a + D, 0.f);
        for (int64_t k = 0; k < n; ++k) {
          if (k == excluded) continue;
          const float wk = wts[k];
          const float* __restrict__ x = rows[k];
          for (int64_t d = 0; d < D; ++d) a[d] += wk * x[d];
        }
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(a[d] * inv);
      };

      if (shared) {
        emit(-1, out + (b * P + j) * D);
      } else {
        for (int64_t i = 0; i < n; ++i) emit(i, out + ((t0 + i) * P + j) * D);
      }
    }
  });
}

at::Tensor context_reweight_fwd_cpu(const at::Tensor& features, const at::Tensor& weight,
                                    const at::Tensor& bias, const at::Tensor& cu_images,
                                    bool shared) {
  check_context_reweight_inputs(features, weight, bias, cu_images);
  TORCH_CHECK(features.is_cpu() && weight.is_cpu() && bias.is_cpu() && cu_images.is_cpu(),
              "sam_fast::context_reweight_fwd (CPU): all inputs must be CPU tensors, got features ",
              features.device(), ", weight ", weight.device(), ", bias ", bias.device(),
              ", cu_images ", cu_images.device());
  const at::Tensor F = features.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float b = bias.to(at::kFloat).reshape({}).item<float>();
  const at::Tensor cu = checked_offsets_cpu(cu_images, F.size(0));
  at::Tensor out = empty_context_reweight_output(F, cu_images, shared);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(),
                                  "context_reweight_fwd_cpu", [&] {
    context_reweight_cpu_kernel<scalar_t>(F.data_ptr<scalar_t>(), w.data_ptr<float>(), b,
                                          cu.data_ptr<int64_t>(), cu.size(0) - 1, F.size(1),
                                          F.size(2), shared, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_fast, CPU, m) {
  m.impl("context_reweight_fwd", &context_reweight_fwd_cpu);
}

}  // namespace sam_fast
