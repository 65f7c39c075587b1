#pragma once
/// \file stepper.h
/// One training step: forward, loss, backward, the diagnostics of steps.jsonl, and the update by
/// the run's Optimizer (optimizer.h: SGD with momentum, Nesterov and dampening, Adam, AdamW, as
/// torch.optim defines them). Training and replay both go through Stepper::step, which is what
/// makes a replay reproduce the stored checkpoints bit for bit.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "pathkernel/models/model.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/optimizer.h"

namespace pathkernel {

/// The per-example loss l(y*, f).
struct LossKind {
  enum class Kind {
    kCrossEntropy,  ///< -(1 - e) log softmax(f)_y - e mean_c log softmax(f)_c, e the label smoothing
    kMse            ///< |f - y|^2 / 2, y = onehot(label) or a float target row
  };
  Kind kind = Kind::kCrossEntropy;
  /// Cross-entropy only: the label smoothing e in [0, 1), as torch.nn.CrossEntropyLoss's.
  double label_smoothing = 0;

  static const LossKind kCrossEntropy, kMse;
  bool operator==(const LossKind& o) const { return kind == o.kind && label_smoothing == o.label_smoothing; }
  bool operator!=(const LossKind& o) const { return !(*this == o); }
};
inline const LossKind LossKind::kCrossEntropy{LossKind::Kind::kCrossEntropy, 0};
inline const LossKind LossKind::kMse{LossKind::Kind::kMse, 0};

/// "ce" or "mse" (no label smoothing). Throws InputError otherwise.
LossKind parse_loss(const std::string& name);
struct TrainConfig;
/// A training config's loss with its label smoothing (throws InputError for an unknown --loss).
LossKind config_loss(const TrainConfig& config);
/// "ce", "mse", or "ce" with its smoothing: "ce (label smoothing 0.1)".
std::string loss_name(LossKind kind);

/// L(f) = mean over the batch of l(y*, f) (SPEC's step loss). logits [B, C]; labels int64 [B],
/// or for kMse float targets [B, C] (a recorded run's).
at::Tensor batch_loss(const at::Tensor& logits, const at::Tensor& labels, LossKind kind);

/// What one step did; becomes one line of steps.jsonl.
struct StepRecord {
  int64_t step = 0;
  double lr = 0;
  double loss = 0;         ///< L_k(w_k)
  double accuracy = 0;     ///< share of the batch classified right at w_k
  double grad_norm = 0;    ///< |grad L_k(w_k)|
  double update_norm = 0;  ///< |w_{k+1} - w_k| as computed, before rounding into w
  std::vector<std::pair<std::string, double>> layer_grad_norms;  ///< by layer prefix
  double pe_grad_min = 0, pe_grad_median = 0, pe_grad_max = 0;   ///< |grad l(x_m)| over the batch
                                                                 ///< (NaN for models without taps)
  bool finite = true;      ///< false: loss, gradient or new weights not finite; no update made
  std::string nonfinite;   ///< what was not finite
};

class Stepper {
 public:
  /// Steps `model` with an optimizer of `options`. Throws InputError for invalid options.
  Stepper(models::Model& model, const OptimizerOptions& options, LossKind loss);

  /// One step on inputs x [B, ...] and labels y [B] at rate lr. With `per_example`, the model's
  /// taps capture signals and the record gets per-example gradient norms. When anything is not
  /// finite the weights and the optimizer state are left as they were and record.finite is false.
  StepRecord step(const at::Tensor& x, const at::Tensor& y, double lr, bool per_example);

  /// The batch gradient grad L_k(w_k) of the last step, flattened in state_dict order (float32).
  at::Tensor flat_gradient() const;

  /// The optimizer: its state (saved beside each checkpoint), settings and update rule.
  Optimizer& optimizer() { return *optimizer_; }
  const Optimizer& optimizer() const { return *optimizer_; }

  /// Number of parameters (entries of the flattened gradient).
  int64_t num_parameters() const;

  /// Call after changing the weights from outside (load_weights does not know the stepper).
  void sync_norms() { optimizer_->weights_changed(); }

 private:
  models::Model& model_;
  LossKind loss_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> grads_;
  std::vector<double> grad_sq_;  ///< |grads_[i]|^2 of the last step
  std::unique_ptr<Optimizer> optimizer_;
};

/// The model's state_dict as torch.nn orders it (each module's parameters, then its buffers:
/// a BatchNorm's running statistics and batch count), name -> tensor (detached views, not copies).
/// What a checkpoint holds.
NamedTensors state_dict_of(models::Model& model);
/// The parameters alone, in state_dict order; the buffers alone.
NamedTensors named_parameters_of(models::Model& model);
NamedTensors named_buffers_of(models::Model& model);
/// Copies `weights` (a state_dict: parameters and buffers) into the model. Throws InputError
/// naming `source` on a missing name, an extra name, or a shape or dtype mismatch.
void load_weights(models::Model& model, const NamedTensors& weights, const std::string& source);

}  // namespace pathkernel
