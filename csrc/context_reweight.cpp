// Schemas, input checks and shape-only (Meta) implementations of sam_fast::context_reweight_fwd
// and sam_fast::context_reweight_bwd. The Meta kernels give FakeTensor / torch.compile the output
// shapes without running anything. Autograd is registered from Python
// (sam_fast/ops/context_reweight.py, torch.library.register_autograd): the backward is _bwd.
#include "context_reweight.h"

#include <torch/library.h>

#include <tuple>

namespace sam_fast {

namespace {
constexpr const char* kOp = "sam_fast::context_reweight_fwd: ";

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

void check_context_reweight_inputs(const at::Tensor& values, const at::Tensor& scores,
                                   const at::Tensor& cu_images) {
  TORCH_CHECK(values.dim() == 3, kOp, "values must be [T, P, D], got shape ", values.sizes());
  TORCH_CHECK(is_supported_float(values.scalar_type()), kOp,
              "values dtype must be float32, float16 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == values.size(0) &&
                  scores.size(1) == values.size(1),
              kOp, "scores must be [T, P] = [", values.size(0), ", ", values.size(1),
              "] for values of shape ", values.sizes(), ", got shape ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), kOp, "scores must be floating point, got ",
              scores.scalar_type());
  TORCH_CHECK(scores.device() == values.device(), kOp, "scores is on ", scores.device(),
              " but values are on ", values.device());
  TORCH_CHECK(cu_images.dim() == 1 && cu_images.size(0) >= 1, kOp,
              "cu_images must be [B + 1] sample offsets, got shape ", cu_images.sizes());
  TORCH_CHECK(cu_images.scalar_type() == at::kInt || cu_images.scalar_type() == at::kLong, kOp,
              "cu_images dtype must be int32 or int64, got ", cu_images.scalar_type());
}

at::Tensor checked_offsets_cpu(const at::Tensor& cu_images, int64_t num_images) {
  at::Tensor cu = cu_images.to(at::kCPU, at::kLong).contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t B = cu.size(0) - 1;
  TORCH_CHECK(c[0] == 0, kOp, "cu_images[0] must be 0, got ", c[0]);
  TORCH_CHECK(c[B] == num_images, kOp, "cu_images[-1] must equal T = values.size(0) = ",
              num_images, ", got ", c[B]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(c[b + 1] >= c[b], kOp, "cu_images must be non-decreasing, but cu_images[", b,
                "] = ", c[b], " > cu_images[", b + 1, "] = ", c[b + 1]);
  }
  return cu;
}

at::Tensor empty_context_reweight_output(const at::Tensor& values, const at::Tensor& cu_images,
                                         bool shared) {
  const int64_t rows = shared ? cu_images.size(0) - 1 : values.size(0);
  return at::empty({rows, values.size(1), values.size(2)}, values.options());
}

void check_context_reweight_grad(const at::Tensor& grad_out, const at::Tensor& values,
                                 const at::Tensor& cu_images, bool shared) {
  const int64_t rows = shared ? cu_images.size(0) - 1 : values.size(0);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == rows &&
                  grad_out.size(1) == values.size(1) && grad_out.size(2) == values.size(2),
              "sam_fast::context_reweight_bwd: grad_out must be [", rows, ", ", values.size(1),
              ", ", values.size(2), "] (the forward output), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.device() == values.device(), "sam_fast::context_reweight_bwd: grad_out is on ",
              grad_out.device(), " but values are on ", values.device());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()),
              "sam_fast::context_reweight_bwd: grad_out must be floating point, got ",
              grad_out.scalar_type());
}

at::Tensor empty_context_reweight_grad_values(const at::Tensor& values, bool values_grad) {
  return values_grad ? at::empty(values.sizes(), values.options())
                     : at::empty({0}, values.options());
}

namespace {
at::Tensor context_reweight_fwd_meta(const at::Tensor& values, const at::Tensor& scores,
                                     const at::Tensor& cu_images, bool shared) {
  check_context_reweight_inputs(values, scores, cu_images);
  return empty_context_reweight_output(values, cu_images, shared);
}

std::tuple<at::Tensor, at::Tensor> context_reweight_bwd_meta(const at::Tensor& grad_out,
                                                             const at::Tensor& values,
                                                             const at::Tensor& scores,
                                                             const at::Tensor& cu_images,
                                                             bool shared, bool values_grad) {
  check_context_reweight_inputs(values, scores, cu_images);
  check_context_reweight_grad(grad_out, values, cu_images, shared);
  return {empty_context_reweight_grad_values(values, values_grad),
          at::empty({values.size(0), values.size(1)}, values.options().dtype(at::kFloat))};
}
}  // namespace

TORCH_LIBRARY(sam_fast, m) {
  m.def("context_reweight_fwd(Tensor values, Tensor scores, Tensor cu_images, bool shared) -> Tensor");
  // (d values, or an empty [0] unless values_grad; d scores [T, P] fp32)
  m.def(
      "context_reweight_bwd(Tensor grad_out, Tensor values, Tensor scores, Tensor cu_images, "
      "bool shared, bool values_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sam_fast, Meta, m) {
  m.impl("context_reweight_fwd", &context_reweight_fwd_meta);
  m.impl("context_reweight_bwd", &context_reweight_bwd_meta);
}

}  // namespace sam_fast
