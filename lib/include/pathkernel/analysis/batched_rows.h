#pragma once
/// A probe's gradient rows, one per output, by a single backward pass whose incoming gradient
/// carries every output's one-hot vector as a batch (ATen's vmap batched tensors: what PyTorch's
/// `torch.autograd.grad(..., is_grads_batched=True)` does), instead of one backward per output.
///
/// LibTorch 1.13 batches most backward operators through rules of its own; the ones a CNN, an
/// MLP or a transformer needs and it lacks (convolution, max pooling, layer norm, softmax and
/// log-softmax, BatchNorm in eval mode, tanh/GELU/SiLU/ELU/... activations) have rules here,
/// registered for the batch dimension of the incoming gradient only; mm and bmm get rules that
/// fold the batch into one product (LibTorch's own loop over tiny matrices in attention). Any
/// other operator runs in ATen's loop fallback (right, but slow): batched_output_rows reports
/// those, so that a caller can keep one backward per row for such models.

#include <ATen/Tensor.h>
#include <ATen/VmapMode.h>
#include <c10/util/Exception.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace pathkernel {

/// Thrown when a backward operator's arguments have a batch layout the rules here do not cover.
struct BatchedRowsUnsupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Writes into `rows` [C, n_params] (the parameters' order, flattened) the gradient of each
/// output `cols[j]` of `out` (one probe's outputs, flattened index) with respect to `params`
/// (zeros for parameters the output does not depend on). The graph of `out` is freed. With
/// `fallbacks`, the names of the operators that ran in ATen's loop fallback are appended to it.
/// Throws BatchedRowsUnsupported (see above); the rows are then left unspecified.
void batched_output_rows(const std::vector<at::Tensor>& params, const at::Tensor& out, const at::Tensor& cols,
                         at::Tensor rows, std::vector<std::string>* fallbacks = nullptr);

/// Writes C rows of gradients into `rows` [C, n_params]: grads[i] (C gradients of params[i],
/// [C, *shape], [B, C/B, *shape] (row b*C/B + j) or, for C = 1, [*shape]; undefined: zeros) at
/// params[i]'s columns, in order.
void gradients_into_rows(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, at::Tensor rows);

/// Replaces LibTorch's Batched kernels of mm and bmm by rules that fold the batch into one
/// product (once per process; batched_output_rows calls it).
void use_product_rules();

/// Installs, once per process, the rules for a forward-mode pass whose parameters' tangents carry
/// several directions as a batch (tangent_rules.cpp: convolution, mean, flatten, gather,
/// unsafe_split, the zeros a tangent of another layout is copied into), and mm's and bmm's.
void use_tangent_rules();

/// A tensor argument of a batching rule: its physical value with the batch dimension first and its
/// vmap level, or the tensor itself (level -1) when it is not batched or undefined.
struct BatchOperand {
  at::Tensor t;
  int64_t level = -1;
  bool batched() const { return level >= 0; }
};

/// `t` as a BatchOperand of operator `op`; throws BatchedRowsUnsupported for a tensor batched at
/// several levels (nested vmaps).
BatchOperand batch_operand(const at::Tensor& t, const std::string& op);

/// Passes on every warning but LibTorch's notice that a kernel replaced another, while alive (the
/// rules here replace some of LibTorch's own).
class QuietOverride : public c10::WarningHandler {
 public:
  QuietOverride() : prev_(c10::Warning::get_warning_handler()) { c10::Warning::set_warning_handler(this); }
  ~QuietOverride() override { c10::Warning::set_warning_handler(prev_); }
  QuietOverride(const QuietOverride&) = delete;
  QuietOverride& operator=(const QuietOverride&) = delete;
  void process(const c10::SourceLocation& where, const std::string& msg, const bool verbatim) override {
    if (msg.find("Overriding a previously registered kernel") == std::string::npos) prev_->process(where, msg, verbatim);
  }

 private:
  c10::WarningHandler* prev_;
};

/// One vmap level for the life of the object.
class VmapLevel {
 public:
  VmapLevel() : id_(at::impl::VmapMode::increment_nesting()) {}
  ~VmapLevel() { at::impl::VmapMode::decrement_nesting(); }
  VmapLevel(const VmapLevel&) = delete;
  VmapLevel& operator=(const VmapLevel&) = delete;
  int64_t id() const { return id_; }

 private:
  int64_t id_;
};

/// While alive (on this thread), layer_norm runs as differentiable operators (mean, variance,
/// rsqrt) rather than LibTorch's native kernel, whose double backward holds the saved mean and
/// 1/std constant and so gets the third derivative wrong (norm_rules.cpp). Outside such a scope
/// it runs ATen's own implementation, as before the first scope.
class DifferentiableLayerNorm {
 public:
  DifferentiableLayerNorm();
  ~DifferentiableLayerNorm();
  DifferentiableLayerNorm(const DifferentiableLayerNorm&) = delete;
  DifferentiableLayerNorm& operator=(const DifferentiableLayerNorm&) = delete;
};

}  // namespace pathkernel
