// Binds the raw-pointer CUDA launchers (context_reweight_cuda.cu) to sam_fast::context_reweight_fwd
// and sam_fast::context_reweight_bwd for CUDA tensors. Compiled only in CUDA builds; it uses the device-generic c10 stream and guard
// API, so it needs no CUDA or c10/cuda header.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

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

at::Tensor device_offsets(const at::Tensor& cu_images, const at::Tensor& F) {
  if (cu_images.is_cpu()) {  // host offsets: check their values for free, then copy over
    return checked_offsets_cpu(cu_images, F.size(0)).to(F.device(), /*non_blocking=*/true);
  }
  // device offsets are trusted: checking them would synchronise the stream
  TORCH_CHECK(cu_images.device() == F.device(), "sam_fast::context_reweight (CUDA): cu_images is on ",
              cu_images.device(), " but values are on ", F.device());
  return cu_images.contiguous();
}

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
  return static_cast<cudaStream_t>(stream.native_handle());
}

at::Tensor context_reweight_fwd_cuda(const at::Tensor& values, const at::Tensor& scores,
                                     const at::Tensor& cu_images, bool shared) {
  check_context_reweight_inputs(values, scores, cu_images);
  TORCH_CHECK(values.is_cuda(), "sam_fast::context_reweight_fwd (CUDA): values must be a "
              "CUDA tensor, got ", values.device());
  const c10::DeviceGuard guard(values.device());
  const at::Tensor F = values.contiguous();
  const at::Tensor S = scores.to(at::kFloat).contiguous();
  const at::Tensor cu = device_offsets(cu_images, F);
  at::Tensor out = empty_context_reweight_output(F, cu_images, shared);
  const int64_t B = cu_images.size(0) - 1;
  at::Tensor ws = at::empty({sam_fast_context_reweight_workspace_floats(B, F.size(0), F.size(1), F.size(2), 0)},
                            F.options().dtype(at::kFloat));
  const int err = sam_fast_context_reweight_fwd_cuda(
      F.data_ptr(), dtype_code(F.scalar_type()), S.data_ptr<float>(), cu.data_ptr(),
      cu.scalar_type() == at::kLong, B, F.size(0), F.size(1), F.size(2), shared,
      ws.data_ptr<float>(), out.data_ptr(), current_stream(F));
  TORCH_CHECK(err == 0, "sam_fast::context_reweight_fwd (CUDA): kernel launch failed: ",
              sam_fast_cuda_error_string(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor> context_reweight_bwd_cuda(const at::Tensor& grad_out,
                                                             const at::Tensor& values,
                                                             const at::Tensor& scores,
                                                             const at::Tensor& cu_images,
                                                             bool shared, bool values_grad) {
  check_context_reweight_inputs(values, scores, cu_images);
  check_context_reweight_grad(grad_out, values, cu_images, shared);
  TORCH_CHECK(values.is_cuda(), "sam_fast::context_reweight_bwd (CUDA): values must be a "
              "CUDA tensor, got ", values.device());
  const c10::DeviceGuard guard(values.device());
  const at::Tensor F = values.contiguous();
  const at::Tensor G = grad_out.to(F.scalar_type()).contiguous();
  const at::Tensor S = scores.to(at::kFloat).contiguous();
  const at::Tensor cu = device_offsets(cu_images, F);
  const int64_t B = cu_images.size(0) - 1, T = F.size(0), P = F.size(1), D = F.size(2);
  at::Tensor dF = empty_context_reweight_grad_values(F, values_grad);
  const auto f32 = F.options().dtype(at::kFloat);
  at::Tensor ws = at::empty({sam_fast_context_reweight_workspace_floats(B, T, P, D, 1)}, f32);
  at::Tensor dS = at::zeros({T, P}, f32);
  const int err = sam_fast_context_reweight_bwd_cuda(
      G.data_ptr(), F.data_ptr(), dtype_code(F.scalar_type()), S.data_ptr<float>(), cu.data_ptr(),
      cu.scalar_type() == at::kLong, B, T, P, D, shared, ws.data_ptr<float>(),
      values_grad ? dF.data_ptr() : nullptr, dS.data_ptr<float>(), current_stream(F));
  TORCH_CHECK(err == 0, "sam_fast::context_reweight_bwd (CUDA): kernel launch failed: ",
              sam_fast_cuda_error_string(err));
  return {dF, dS};
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_fast, CUDA, m) {
  m.impl("context_reweight_fwd", &context_reweight_fwd_cuda);
  m.impl("context_reweight_bwd", &context_reweight_bwd_cuda);
}

}  // namespace sam_fast
