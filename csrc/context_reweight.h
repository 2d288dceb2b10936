// Torch-side declarations of sam_fast::context_reweight_fwd / _bwd shared by its CPU, CUDA and Meta
// implementations (the arithmetic itself is in context_reweight_common.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sam_fast {

// Shapes, dtypes and devices of the tensor arguments (no data access: safe for Meta). `scores`
// (optional) must be [T, P] on the features' device.
void check_context_reweight_inputs(const at::Tensor& features, const at::Tensor& weight,
                                   const at::Tensor& bias, const at::Tensor& cu_images,
                                   const std::optional<at::Tensor>& scores);

// cu_images as a contiguous int64 CPU tensor whose values were checked against T (reads data).
at::Tensor checked_offsets_cpu(const at::Tensor& cu_images, int64_t num_images);

// Uninitialised output: [B, P, D] when shared, else [T, P, D]; dtype and device of features.
at::Tensor empty_context_reweight_output(const at::Tensor& features, const at::Tensor& cu_images,
                                         bool shared);

// grad_out of the backward: the forward output's shape ([B, P, D] shared, else [T, P, D]).
void check_context_reweight_grad(const at::Tensor& grad_out, const at::Tensor& features,
                                 const at::Tensor& cu_images, bool shared);

// d(features) of the backward: like features ([T, P, D]) when requested, else an empty [0].
at::Tensor empty_context_reweight_grad_features(const at::Tensor& features, bool features_grad);

}  // namespace sam_fast
