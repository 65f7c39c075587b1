#include "pathkernel/per_example.h"

#include <ATen/ATen.h>

namespace pathkernel {

at::Tensor conv_per_example_weight_grad(const models::Tap& tap) {
  const auto& c = tap.conv;
  const at::Tensor u = at::im2col(tap.input, {c.kernel_h, c.kernel_w}, /*dilation=*/{1, 1},
                                  {c.pad_h, c.pad_w}, {c.stride_h, c.stride_w});  // [N, Cin*k*k, L]
  const int64_t n = tap.grad_output.size(0), cout = tap.grad_output.size(1);
  const at::Tensor g = tap.grad_output.reshape({n, cout, -1});  // [N, Cout, L]
  return at::bmm(g, u.transpose(1, 2));
}

at::Tensor per_example_grad_sq_norms(const std::vector<models::Tap>& taps, double scale) {
  at::Tensor total;
  for (const auto& tap : taps) {
    if (!tap.grad_output.defined()) continue;
    const at::Tensor g = tap.grad_output.to(at::kDouble) * scale;
    const int64_t n = g.size(0);
    at::Tensor sq;
    if (tap.kind == models::LayerKind::kLinear) {
      const at::Tensor a_sq = tap.input.to(at::kDouble).pow(2).sum(1);
      sq = g.pow(2).sum(1) * (tap.bias.defined() ? a_sq + 1.0 : a_sq);
    } else {
      models::Tap scaled = tap;
      scaled.input = tap.input.to(at::kDouble);
      scaled.grad_output = g;
      sq = conv_per_example_weight_grad(scaled).pow(2).reshape({n, -1}).sum(1);
      if (tap.bias.defined()) sq = sq + g.reshape({n, g.size(1), -1}).sum(2).pow(2).sum(1);
    }
    total = total.defined() ? total + sq : sq;
  }
  return total;
}

}  // namespace pathkernel
