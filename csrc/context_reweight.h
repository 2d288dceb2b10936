// Torch-side declarations of sam_fast::context_reweight_fwd / _bwd shared by its CPU, CUDA and Meta
// implementations (the arithmetic itself is in context_reweight_common.h).
#pragma once

#include <ATen/ATen.h>

namespace sam_fast {

// Shapes, dtypes and devices of the tensor arguments (no data access: safe for Meta): values
// [T, P, D], scores [T, P] on the values' device, cu_images [B + 1].
void check_context_reweight_inputs(const at::Tensor& values, const at::Tensor& scores,
                                   const at::Tensor& cu_images);

// cu_images as a contiguous int64 CPU tensor whose values were checked against T (reads data).
at::Tensor checked_offsets_cpu(const at::Tensor& cu_images, int64_t num_images);

// Uninitialised output: [B, P, D] when shared, else [T, P, D]; dtype and device of values.
at::Tensor empty_context_reweight_output(const at::Tensor& values, const at::Tensor& cu_images,
                                         bool shared);

// grad_out of the backward: the forward output's shape ([B, P, D] shared, else [T, P, D]).
void check_context_reweight_grad(const at::Tensor& grad_out, const at::Tensor& values,
                                 const at::Tensor& cu_images, bool shared);

// d(values) of the backward: like values ([T, P, D]) when requested, else an empty [0].
at::Tensor empty_context_reweight_grad_values(const at::Tensor& values, bool values_grad);

}  // namespace sam_fast
