// Binds the raw-pointer CUDA launchers (context_reweight_cuda.cu) to sam_fast::context_reweight_fwd
// and sam_fast::context_reweight_bwd for CUDA tensors. Compiled only in CUDA builds; it uses the device-generic c10 stream and guard
// API, so it needs no CUDA or c10/cuda header.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "context_reweight.h"
#include "context_reweight_cuda.h"

namespace sam_fast {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return SAM_FAST_F32;
    case at::kHalf: return SAM_FAST_F16;
    case at::kBFloat16: return SAM_FAST_BF16;
    default: TORCH_CHECK(false, "sam_fast::context_reweight_fwd (CUDA): unsupported dtype ", t);
  }
}

at::Tensor context_reweight_fwd_cuda(const at::Tensor& features, const at::Tensor& weight,
                                     const at::Tensor& bias, const at::Tensor& cu_images,
                                     bool shared, const std::optional<at::Tensor>& scores) {
  check_context_reweight_inputs(features, weight, bias, cu_images, scores);
  TORCH_CHECK(features.is_cuda(), "sam_fast::context_reweight_fwd (CUDA): features must be a "
              "CUDA tensor, got ", features.device());
  const c10::DeviceGuard guard(features.device());
  const at::Tensor F = features.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor b = bias.to(features.device(), at::kFloat).reshape({1}).contiguous();
  at::Tensor cu;
  if (cu_images.is_cpu()) {  // host offsets: check their values for free, then copy over
    cu = checked_offsets_cpu(cu_images, F.size(0)).to(features.device(), /*non_blocking=*/true);
  } else {  // device offsets are trusted: checking them would synchronise the stream
    TORCH_CHECK(cu_images.device() == features.device(), "sam_fast::context_reweight_fwd (CUDA): "
                "cu_images is on ", cu_images.device(), " but features are on ", features.device());
    cu = cu_images.contiguous();
  }
  at::Tensor out = empty_context_reweight_output(F, cu_images, shared);
  at::Tensor ws = at::empty({F.size(1), F.size(0)}, F.options().dtype(at::kFloat));
  const at::Tensor given = scores.has_value() ? scores->to(at::kFloat).contiguous() : at::Tensor();

  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(features.device());
  const int err = sam_fast_context_reweight_fwd_cuda(
      F.data_ptr(), dtype_code(F.scalar_type()), w.data_ptr<float>(), b.data_ptr<float>(),
      cu.data_ptr(), cu.scalar_type() == at::kLong, cu.size(0) - 1, F.size(0), F.size(1),
      F.size(2), shared, given.defined() ? given.data_ptr<float>() : nullptr,
      ws.data_ptr<float>(), out.data_ptr(),
      static_cast<cudaStream_t>(stream.native_handle()));
  TORCH_CHECK(err == 0, "sam_fast::context_reweight_fwd (CUDA): kernel launch failed: ",
              sam_fast_cuda_error_string(err));
  return out;
}

at::Tensor device_offsets(const at::Tensor& cu_images, const at::Tensor& F) {
  if (cu_images.is_cpu()) return checked_offsets_cpu(cu_images, F.size(0)).to(F.device(), true);
  TORCH_CHECK(cu_images.device() == F.device(), "sam_fast::context_reweight (CUDA): cu_images is on ",
              cu_images.device(), " but features are on ", F.device());
  return cu_images.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> context_reweight_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& cu_images, bool shared, bool features_grad,
    const std::optional<at::Tensor>& scores) {
  check_context_reweight_inputs(features, weight, bias, cu_images, scores);
  check_context_reweight_grad(grad_out, features, cu_images, shared);
  TORCH_CHECK(features.is_cuda(), "sam_fast::context_reweight_bwd (CUDA): features must be a "
              "CUDA tensor, got ", features.device());
  const c10::DeviceGuard guard(features.device());
  const at::Tensor F = features.contiguous();
  const at::Tensor G = grad_out.to(F.scalar_type()).contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor b = bias.to(features.device(), at::kFloat).reshape({1}).contiguous();
  const at::Tensor cu = device_offsets(cu_images, F);
  const int64_t B = cu_images.size(0) - 1, T = F.size(0), P = F.size(1), D = F.size(2);
  at::Tensor dF = empty_context_reweight_grad_features(F, features_grad);
  const auto f32 = F.options().dtype(at::kFloat);
  at::Tensor ws = at::empty({sam_fast_context_reweight_bwd_workspace_floats(T, P)}, f32);
  at::Tensor partial;  // d(weight), d(bias) partial sums, placed below (none for given scores)
  at::Tensor dwb = at::zeros({D + 1}, f32);
  const at::Tensor given = scores.has_value() ? scores->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor dS = given.defined() ? at::zeros({T, P}, f32) : at::empty({0}, f32);
  if (!given.defined()) partial = at::empty({B * P, D + 1}, f32);
  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(features.device());
  const int err = sam_fast_context_reweight_bwd_cuda(
      G.data_ptr(), F.data_ptr(), dtype_code(F.scalar_type()), w.data_ptr<float>(),
      b.data_ptr<float>(), cu.data_ptr(), cu.scalar_type() == at::kLong, B, T, P, D, shared,
      given.defined() ? given.data_ptr<float>() : nullptr, ws.data_ptr<float>(),
      features_grad ? dF.data_ptr() : nullptr, partial.defined() ? partial.data_ptr<float>() : nullptr,
      dwb.data_ptr<float>(),
      given.defined() ? dS.data_ptr<float>() : nullptr,
      static_cast<cudaStream_t>(stream.native_handle()));
  TORCH_CHECK(err == 0, "sam_fast::context_reweight_bwd (CUDA): kernel launch failed: ",
              sam_fast_cuda_error_string(err));
  return {dF, dwb.narrow(0, 0, D).clone(), dwb.select(0, D).clone(), dS};
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_fast, CUDA, m) {
  m.impl("context_reweight_fwd", &context_reweight_fwd_cuda);
  m.impl("context_reweight_bwd", &context_reweight_bwd_cuda);
}

}  // namespace sam_fast
