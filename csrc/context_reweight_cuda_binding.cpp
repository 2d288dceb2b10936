// Binds the raw-pointer CUDA launcher (context_reweight_cuda.cu) to sam_fast::context_reweight_fwd
// for CUDA tensors. Compiled only in CUDA builds; it uses the device-generic c10 stream and guard
// API, so it needs no CUDA or c10/cuda header.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

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
                                     bool shared) {
  check_context_reweight_inputs(features, weight, bias, cu_images);
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
  at::Tensor scores = at::empty({F.size(1), F.size(0)}, F.options().dtype(at::kFloat));

  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(features.device());
  const int err = sam_fast_context_reweight_fwd_cuda(
      F.data_ptr(), dtype_code(F.scalar_type()), w.data_ptr<float>(), b.data_ptr<float>(),
      cu.data_ptr(), cu.scalar_type() == at::kLong, cu.size(0) - 1, F.size(0), F.size(1),
      F.size(2), shared, scores.data_ptr<float>(), out.data_ptr(),
      static_cast<cudaStream_t>(stream.native_handle()));
  TORCH_CHECK(err == 0, "sam_fast::context_reweight_fwd (CUDA): kernel launch failed: ",
              sam_fast_cuda_error_string(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_fast, CUDA, m) {
  m.impl("context_reweight_fwd", &context_reweight_fwd_cuda);
}

}  // namespace sam_fast
