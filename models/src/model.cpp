#include "pathkernel/models/model.h"

#include <ATen/ATen.h>

#include <stdexcept>

namespace pathkernel::models {

void Model::clear_captures() {
  for (auto& t : taps_) {
    t.input = torch::Tensor();
    t.grad_output = torch::Tensor();
    t.output = torch::Tensor();
  }
}

size_t Model::add_tap(const std::string& name, LayerKind kind, torch::Tensor weight,
                      torch::Tensor bias, ConvGeometry conv) {
  Tap t;
  t.name = name;
  t.kind = kind;
  t.conv = conv;
  t.weight = std::move(weight);
  t.bias = std::move(bias);
  taps_.push_back(std::move(t));
  return taps_.size() - 1;
}

void Model::record_input(size_t tap, const torch::Tensor& input) {
  if (!capture_) return;
  taps_[tap].input = input.detach();
  taps_[tap].grad_output = torch::Tensor();
}

void Model::record_output(size_t tap, const torch::Tensor& output) {
  if (!capture_ || !output.requires_grad()) return;
  taps_[tap].output = output;
  // The hook only stores the signal; it never changes the gradient flowing on.
  output.register_hook([this, tap](torch::Tensor g) { taps_[tap].grad_output = g; });
}

torch::Tensor apply_activation(const std::string& name, const torch::Tensor& x) {
  if (name == "tanh") return at::tanh(x);
  if (name == "relu") return at::relu(x);
  if (name == "softplus") return at::softplus(x, /*beta=*/1, /*threshold=*/20);
  if (name == "gelu") return at::gelu(x);
  if (name == "none") return x;
  throw std::invalid_argument("unknown activation '" + name + "'");
}

}  // namespace pathkernel::models
