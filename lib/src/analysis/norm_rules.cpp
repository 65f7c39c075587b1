// layer_norm written out in differentiable operators while S of every row is formed at once
// (directional.cpp): that route differentiates the backward of the backward, and LibTorch 1.13's
// double backward of layer_norm holds the saved mean and 1/std constant, so its third derivative
// is wrong (S off by 30-50% on a LayerNorm block). group_norm needs nothing: its backward is
// differentiable to every order in 1.13. Outside a DifferentiableLayerNorm scope the kernel runs
// ATen's own composite layer_norm, unchanged.
#include <ATen/ATen.h>
#include <ATen/ops/layer_norm_native.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "pathkernel/analysis/batched_rows.h"

namespace pathkernel {
namespace {

thread_local int differentiable_layer_norm_depth = 0;

// Outside a scope: ATen's composite implementation itself, run where it ran before. (A redispatch
// below the autograd key would step past functorch's grad transform, whose layer is processed
// here: rows by functorch's transforms lose the norm's input gradient.)
at::Tensor layer_norm_kernel(const at::Tensor& input, at::IntArrayRef normalized_shape,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                             double eps, bool cudnn_enable) {
  if (differentiable_layer_norm_depth == 0) {
    return at::native::layer_norm(input, normalized_shape, weight, bias, eps, cudnn_enable);
  }
  const auto k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1 && k <= input.dim() && input.sizes().slice(input.dim() - k).equals(normalized_shape),
              "layer_norm: normalized_shape ", normalized_shape, " does not end the input's shape ", input.sizes());
  std::vector<int64_t> dims;
  for (int64_t d = input.dim() - k; d < input.dim(); ++d) dims.push_back(d);
  const at::Tensor centred = input - input.mean(dims, /*keepdim=*/true);
  at::Tensor y = centred * (centred * centred).mean(dims, /*keepdim=*/true).add(eps).rsqrt();
  if (weight && weight->defined()) y = y * *weight;
  if (bias && bias->defined()) y = y + *bias;
  return y;
}

}  // namespace

DifferentiableLayerNorm::DifferentiableLayerNorm() {
  // Registered once per process, for CPU tensors' autograd key, ahead of ATen's composite kernel.
  static const std::unique_ptr<torch::Library> lib = [] {
    auto l = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::AutogradCPU, __FILE__,
                                              static_cast<uint32_t>(__LINE__));
    l->impl("layer_norm", TORCH_FN(layer_norm_kernel));
    return l;
  }();
  ++differentiable_layer_norm_depth;
}

DifferentiableLayerNorm::~DifferentiableLayerNorm() { --differentiable_layer_norm_depth; }

}  // namespace pathkernel
