// Schemas, input checks and shape-only (Meta) implementations of sam_fast::context_reweight_fwd
// and sam_fast::context_reweight_bwd. The Meta kernels give FakeTensor / torch.compile the output
// shapes without running anything. Autograd is registered from Python
// (sam_fast/ops/context_reweight.py, torch.library.register_autograd): the backward is _bwd.
#include "context_reweight.h"

#include <torch/library.h>

#include <optional>
#include <tuple>

namespace sam_fast {

namespace {
constexpr const char* kOp = "sam_fast::context_reweight_fwd: ";

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

void check_context_reweight_inputs(const at::Tensor& features, const at::Tensor& weight,
                                   const at::Tensor& bias, const at::Tensor& cu_images,
                                   const std::optional<at::Tensor>& scores) {
  TORCH_CHECK(features.dim() == 3, kOp, "features must be [T, P, D], got shape ",
              features.sizes());
  TORCH_CHECK(is_supported_float(features.scalar_type()), kOp,
              "features dtype must be float32, float16 or bfloat16, got ",
              features.scalar_type());
  const int64_t D = features.size(2);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, kOp, "weight must be [D] = [", D,
              "] for features of shape ", features.sizes(), ", got shape ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), kOp,
              "weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == features.device(), kOp, "weight is on ", weight.device(),
              " but features are on ", features.device());
  TORCH_CHECK(bias.dim() <= 1 && bias.numel() == 1, kOp,
              "bias must be a 0-d or [1] tensor, got shape ", bias.sizes());
  TORCH_CHECK(at::isFloatingType(bias.scalar_type()), kOp, "bias must be floating point, got ",
              bias.scalar_type());
  TORCH_CHECK(cu_images.dim() == 1 && cu_images.size(0) >= 1, kOp,
              "cu_images must be [B + 1] sample offsets, got shape ", cu_images.sizes());
  TORCH_CHECK(cu_images.scalar_type() == at::kInt || cu_images.scalar_type() == at::kLong, kOp,
              "cu_images dtype must be int32 or int64, got ", cu_images.scalar_type());
  if (scores.has_value()) {
    TORCH_CHECK(scores->dim() == 2 && scores->size(0) == features.size(0) &&
                    scores->size(1) == features.size(1),
                kOp, "scores must be [T, P] = [", features.size(0), ", ", features.size(1),
                "] for features of shape ", features.sizes(), ", got shape ", scores->sizes());
    TORCH_CHECK(at::isFloatingType(scores->scalar_type()), kOp,
                "scores must be floating point, got ", scores->scalar_type());
    TORCH_CHECK(scores->device() == features.device(), kOp, "scores is on ", scores->device(),
                " but features are on ", features.device());
  }
}

at::Tensor checked_offsets_cpu(const at::Tensor& cu_images, int64_t num_images) {
  at::Tensor cu = cu_images.to(at::kCPU, at::kLong).contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t B = cu.size(0) - 1;
  TORCH_CHECK(c[0] == 0, kOp, "cu_images[0] must be 0, got ", c[0]);
  TORCH_CHECK(c[B] == num_images, kOp, "cu_images[-1] must equal T = features.size(0) = ",
              num_images, ", got ", c[B]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(c[b + 1] >= c[b], kOp, "cu_images must be non-decreasing, but cu_images[", b,
                "] = ", c[b], " > cu_images[", b + 1, "] = ", c[b + 1]);
  }
  return cu;
}

at::Tensor empty_context_reweight_output(const at::Tensor& features, const at::Tensor& cu_images,
                                         bool shared) {
  const int64_t rows = shared ? cu_images.size(0) - 1 : features.size(0);
  return at::empty({rows, features.size(1), features.size(2)}, features.options());
}

void check_context_reweight_grad(const at::Tensor& grad_out, const at::Tensor& features,
                                 const at::Tensor& cu_images, bool shared) {
  const int64_t rows = shared ? cu_images.size(0) - 1 : features.size(0);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == rows &&
                  grad_out.size(1) == features.size(1) && grad_out.size(2) == features.size(2),
              "sam_fast::context_reweight_bwd: grad_out must be [", rows, ", ", features.size(1),
              ", ", features.size(2), "] (the forward output), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.device() == features.device(), "sam_fast::context_reweight_bwd: grad_out is on ",
              grad_out.device(), " but features are on ", features.device());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()),
              "sam_fast::context_reweight_bwd: grad_out must be floating point, got ",
              grad_out.scalar_type());
}

at::Tensor empty_context_reweight_grad_features(const at::Tensor& features, bool features_grad) {
  return features_grad ? at::empty(features.sizes(), features.options())
                       : at::empty({0}, features.options());
}

namespace {
at::Tensor context_reweight_fwd_meta(const at::Tensor& features, const at::Tensor& weight,
                                     const at::Tensor& bias, const at::Tensor& cu_images,
                                     bool shared, const std::optional<at::Tensor>& scores) {
  check_context_reweight_inputs(features, weight, bias, cu_images, scores);
  return empty_context_reweight_output(features, cu_images, shared);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> context_reweight_bwd_meta(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& cu_images, bool shared, bool features_grad,
    const std::optional<at::Tensor>& scores) {
  check_context_reweight_inputs(features, weight, bias, cu_images, scores);
  check_context_reweight_grad(grad_out, features, cu_images, shared);
  const auto f32 = features.options().dtype(at::kFloat);
  return {empty_context_reweight_grad_features(features, features_grad),
          at::empty({features.size(2)}, f32), at::empty({}, f32),
          scores.has_value() ? at::empty({features.size(0), features.size(1)}, f32)
                             : at::empty({0}, f32)};
}
}  // namespace

TORCH_LIBRARY(sam_fast, m) {
  // scores [T, P] (optional): used instead of features . weight + bias (weight and bias are then
  // zeros), and the backward returns their gradient instead of d(weight), d(bias).
  m.def(
      "context_reweight_fwd(Tensor features, Tensor weight, Tensor bias, Tensor cu_images, "
      "bool shared, Tensor? scores=None) -> Tensor");
  // (d features or an empty [0] unless features_grad, d weight [D] fp32, d bias [] fp32,
  //  d scores [T, P] fp32 when scores were given, else an empty [0])
  m.def(
      "context_reweight_bwd(Tensor grad_out, Tensor features, Tensor weight, Tensor bias, "
      "Tensor cu_images, bool shared, bool features_grad, Tensor? scores=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sam_fast, Meta, m) {
  m.impl("context_reweight_fwd", &context_reweight_fwd_meta);
  m.impl("context_reweight_bwd", &context_reweight_bwd_meta);
}

}  // namespace sam_fast
