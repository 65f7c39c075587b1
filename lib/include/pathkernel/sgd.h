#pragma once
/// \file sgd.h
/// One minibatch SGD step exactly as PyTorch's torch.optim.SGD defines it (no dampening, no
/// Nesterov): v_k = mu v_{k-1} + grad L_k(w_k) + lambda w_k, w_{k+1} = w_k - a_k v_k (SPEC,
/// "sources of U"). Training and replay both go through SgdStepper::step, which is what makes a
/// replay reproduce the stored checkpoints bit for bit.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "pathkernel/checkpoint.h"
#include "pathkernel/models/model.h"

namespace pathkernel {

/// The per-example loss l(y*, f).
enum class LossKind {
  kCrossEntropy,  ///< -log softmax(f)_y
  kMse            ///< |f - onehot(y)|^2 / 2
};

/// "ce" or "mse". Throws InputError otherwise.
LossKind parse_loss(const std::string& name);
std::string loss_name(LossKind kind);

/// L(f) = mean over the batch of l(y*, f) (SPEC's step loss). logits [B, C], labels int64 [B].
at::Tensor batch_loss(const at::Tensor& logits, const at::Tensor& labels, LossKind kind);

struct SgdOptions {
  double momentum = 0.0;      ///< mu
  double weight_decay = 0.0;  ///< lambda
};

/// What one step did; becomes one line of steps.jsonl.
struct StepRecord {
  int64_t step = 0;
  double lr = 0;
  double loss = 0;         ///< L_k(w_k)
  double accuracy = 0;     ///< share of the batch classified right at w_k
  double grad_norm = 0;    ///< |grad L_k(w_k)|
  double update_norm = 0;  ///< a_k |v_k|: the update as computed, before rounding into w
  std::vector<std::pair<std::string, double>> layer_grad_norms;  ///< by layer prefix
  double pe_grad_min = 0, pe_grad_median = 0, pe_grad_max = 0;   ///< |grad l(x_m)| over the batch
                                                                 ///< (NaN for models without taps)
  bool finite = true;      ///< false: loss, gradient or new weights not finite; no update made
  std::string nonfinite;   ///< what was not finite
};

class SgdStepper {
 public:
  SgdStepper(models::Model& model, SgdOptions options, LossKind loss);

  /// One step on inputs x [B, ...] and labels y [B] at rate lr. With `per_example`, the model's
  /// taps capture signals and the record gets per-example gradient norms. When anything is not
  /// finite the weights and buffers are left as they were and record.finite is false.
  StepRecord step(const at::Tensor& x, const at::Tensor& y, double lr, bool per_example);

  /// The batch gradient grad L_k(w_k) of the last step, flattened in state_dict order (float32).
  at::Tensor flat_gradient() const;

  /// Momentum buffers v_{k-1} by parameter name (empty before the first step or without momentum).
  NamedTensors momentum_buffers() const;
  /// Restores buffers saved by momentum_buffers(). Throws InputError on a name or shape mismatch.
  void set_momentum_buffers(const NamedTensors& buffers);

  /// Number of parameters (entries of the flattened gradient).
  int64_t num_parameters() const;

  /// Recomputes the cached weight and buffer norms; call after changing the weights from outside
  /// (load_weights does not know the stepper).
  void sync_norms();

 private:
  models::Model& model_;
  SgdOptions options_;
  LossKind loss_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> buffers_;
  std::vector<at::Tensor> grads_;
  std::vector<double> grad_sq_;
  /// Upper bounds of |w_k| and |v_{k-1}|, to bound the next update (update_in_place_is_safe).
  double weight_norm_ = 0, buffer_norm_ = 0;

  bool update_in_place_is_safe(double lr);
  double upper_bound(double lr) const;
  double safe_limit() const;
  StepRecord update_out_of_place(StepRecord rec, double lr);
};

/// The model's parameters as name -> tensor in state_dict order (detached views, not copies).
NamedTensors state_dict_of(models::Model& model);
/// Copies `weights` into the model's parameters. Throws InputError naming `source` on a missing
/// name, an extra name, or a shape mismatch.
void load_weights(models::Model& model, const NamedTensors& weights, const std::string& source);

}  // namespace pathkernel
