#pragma once
/// \file optimizer.h
/// The optimizer seam. Training, replay and analysis reach the update rule only through
/// `Optimizer`: its step, its named state (save, load, compare bit for bit), its settings (the
/// manifest) and the linear form of its update that the analyzer needs (SPEC, "Optimizers with
/// memory or a preconditioner"):
///
///     dw_k = -a_k * ( P_k (.) sum_{j<=k} c_{k,j} gtilde_j  +  ld * w_k ),   gtilde_j = grad L_j(w_j) + lc w_j
///
/// Every optimizer here has c_{k,j} = alpha_k * beta^(k-j) * s_j + nu * [j == k]: a buffer
/// B_k = beta B_{k-1} + s_k gtilde_k (B_{-1} = 0) and the update direction alpha_k B_k + nu gtilde_k.
///   SGD (momentum mu, dampening tau): beta = mu, s_0 = 1, s_k = 1 - tau, alpha = 1, nu = 0;
///     Nesterov: alpha = mu, nu = 1; without momentum: beta = 0, s = 1, alpha = 1.
///   Adam / AdamW: beta = b1, s = 1 - b1, alpha_k = 1 / (1 - b1^(k+1)), nu = 0, and
///     P_k = 1 / (sqrt(v_k / (1 - b2^(k+1))) + eps) from the second moment after step k.
///   RMSprop (smoothing a, centered or not): P_k = 1 / (sqrt(v_k [- m_k^2]) + eps); without
///     momentum beta = 0; with momentum mu the buffer holds preconditioned gradients,
///     B_k = mu B_{k-1} + P_k (.) gtilde_k (`inner`: P enters with each step, not at the end).
///   Adagrad (lr_decay d): beta = 0, alpha_k = 1 / (1 + k d), P_k = 1 / (sqrt(sum_k) + eps).
///   Adadelta (rho, eps): beta = 0, P_k = sqrt(acc_{k-1} + eps) / sqrt(v_k + eps), from the
///     state before step k (acc_delta) and after it (square_avg).

#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace pathkernel {

/// Ordered name -> tensor pairs (state_dict order).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
/// Parameter-shaped tensors by state_dict name.
using ParamMap = std::map<std::string, at::Tensor>;

enum class OptimizerKind { kSgd, kAdam, kAdamW, kRmsprop, kAdagrad, kAdadelta };

/// "sgd", "adam", "adamw", "rmsprop", "adagrad" or "adadelta"; throws InputError naming
/// --optimizer otherwise.
OptimizerKind parse_optimizer(const std::string& name);
std::string optimizer_name(OptimizerKind kind);

/// |t|^2 as one BLAS dot product (no temporary). Accumulates in t's dtype: the norms it gives
/// are diagnostics and bounds, good to about 1e-6 relative in float32, not results.
double squared_norm(const at::Tensor& t);

/// The settings of an optimizer, as torch.optim names them. Only those of the chosen kind apply.
struct OptimizerOptions {
  OptimizerKind kind = OptimizerKind::kSgd;
  double weight_decay = 0;  ///< SGD and Adam: L2 (lc); AdamW: decoupled (ld)
  double momentum = 0;      ///< SGD: mu in [0, 1)
  double dampening = 0;     ///< SGD: tau in [0, 1]
  bool nesterov = false;    ///< SGD: needs momentum > 0 and dampening 0 (as torch.optim)
  double beta1 = 0.9, beta2 = 0.999;  ///< Adam/AdamW: in [0, 1)
  double eps = 1e-8;                  ///< Adam/AdamW, RMSprop, Adagrad, Adadelta: > 0
  double alpha = 0.99;                ///< RMSprop: smoothing of the squared gradient, in [0, 1)
  bool centered = false;              ///< RMSprop: divide by the gradient's variance estimate
  double rho = 0.9;                   ///< Adadelta: in [0, 1]
  double lr_decay = 0;                ///< Adagrad: >= 0
  double initial_accumulator = 0;     ///< Adagrad: >= 0 (torch's initial_accumulator_value)

  /// Throws InputError naming the flag (--momentum, --betas, --eps, ...).
  void validate() const;
  /// The manifest's "optimizer" entry (without the learning rate).
  nlohmann::json to_json() const;
};

/// The coefficients of step k's update in the linear form above.
struct LinearUpdate {
  double beta = 0;   ///< decay of the buffer
  double s = 1;      ///< weight of gtilde_k entering the buffer
  double alpha = 1;  ///< weight of the buffer B_k in the update
  double nu = 0;     ///< weight of gtilde_k added directly (Nesterov)
  double lc = 0;     ///< coupled (L2) weight decay, inside gtilde
  double ld = 0;     ///< decoupled weight decay (AdamW), outside the preconditioner
  /// P_k multiplies gtilde_k as it enters the buffer (RMSprop with momentum), not the buffer.
  bool inner = false;
  /// True when some earlier gradient enters the update (c_{k,j} != 0 for some j < k).
  bool has_memory() const { return beta != 0; }
};

/// The coefficients of step k's update for the given settings (k 0-based: the optimizer's count
/// t = k + 1). Settings may differ from step to step (a recorded scheduler's momentum or betas):
/// the buffer then decays by each step's own beta.
LinearUpdate linear_update(const OptimizerOptions& options, int64_t k);

/// What one step's update used, as far as it differs from step to step or from parameter to
/// parameter: the settings at this step (a recorded run's OneCycleLR momentum or beta1; for a
/// `pathkernel train` run the run's own) and parameter groups' rates and weight decay. The update
/// of parameter p is the optimizer's with rate lr * rate_scale[p] and decay weight_decay[p].
struct StepSettings {
  OptimizerOptions options;                      ///< the first group's settings at this step
  std::map<std::string, double> rate_scale;      ///< by parameter: its group's lr / the step's lr; empty: all 1
  std::map<std::string, double> weight_decay;    ///< by parameter; empty: options.weight_decay for all
  double rate_of(const std::string& p) const {
    auto it = rate_scale.find(p);
    return it == rate_scale.end() ? 1.0 : it->second;
  }
  double decay_of(const std::string& p) const {
    auto it = weight_decay.find(p);
    return it == weight_decay.end() ? options.weight_decay : it->second;
  }
};

/// Named optimizer state: slot ("momentum_buffer", "exp_avg", "exp_avg_sq") -> tensors by
/// parameter name. A slot's tensors have their parameters' shapes and dtype.
using OptimizerState = std::vector<std::pair<std::string, NamedTensors>>;

/// What one update did.
struct UpdateOutcome {
  bool finite = true;      ///< false: the new weights would not be finite; nothing was changed
  std::string nonfinite;   ///< which parameter
  double update_norm = 0;  ///< |w_{k+1} - w_k| as computed (before rounding into w)
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  /// One update of the parameters (in place) from their gradients `grads` at rate lr;
  /// `grad_sq` holds |grads[i]|^2 (the caller has them already). When the new weights would not
  /// be finite nothing changes (weights and state) and outcome.finite is false.
  virtual UpdateOutcome step(const std::vector<at::Tensor>& grads, const std::vector<double>& grad_sq,
                             double lr) = 0;

  /// The state after the last step, copied (empty slots are left out).
  virtual OptimizerState state() const = 0;
  /// Restores a state saved by state() after `steps` updates. Throws InputError naming `source`
  /// on a missing slot, an unknown parameter or a wrong shape.
  virtual void load_state(const OptimizerState& state, int64_t steps, const std::string& source) = 0;
  /// Call after the weights were changed from outside (they bound the in-place update).
  virtual void weights_changed() {}

  /// The preconditioner P_k of the last step, in float64 by parameter name; empty when it is
  /// the identity (SGD). `before`: preconditioner_state() before that step, for the optimizers
  /// whose P needs it (preconditioner_needs_before(); undefined: the state before step 0).
  ParamMap preconditioner(const at::Tensor& before = {}) const;
  /// A compact copy of the state that determines P (Adam: v flattened in state_dict order, in
  /// the parameters' dtype); undefined when P is the identity. For keeping P of many steps.
  virtual at::Tensor preconditioner_state() const { return {}; }
  /// P, flattened in state_dict order in float64, from a preconditioner_state() taken after
  /// `steps` updates (and, for Adadelta, the one taken before; undefined at step 0), written
  /// into `out` [n_params] (float64).
  virtual void preconditioner_from(const at::Tensor& /*state*/, int64_t /*steps*/, at::Tensor& /*out*/,
                                   const at::Tensor& /*before*/ = {}) const {}
  /// The linear form of the update of step k (0-based; the optimizer's count t = k + 1).
  LinearUpdate linear_update(int64_t k) const;

  const OptimizerOptions& options() const { return options_; }
  /// Number of updates made (torch.optim's "step").
  int64_t steps() const { return steps_; }
  const std::vector<std::string>& names() const { return names_; }

 protected:
  Optimizer(OptimizerOptions options, std::vector<std::string> names, std::vector<at::Tensor> params);
  /// Reads one slot of `state` into `out` (parameter order), checking names and shapes.
  void read_slot(const OptimizerState& state, const std::string& slot, std::vector<at::Tensor>& out,
                 const std::string& source, bool required) const;
  NamedTensors named(const std::vector<at::Tensor>& tensors) const;
  /// Adds |next - w_i|^2 to update_sq; false, with `out` naming the parameter, when the new
  /// weight would not be finite (the caller then commits nothing).
  bool accept_update(size_t i, const at::Tensor& next, double& update_sq, UpdateOutcome& out) const;

  OptimizerOptions options_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_;
  int64_t steps_ = 0;
};

/// True when P_k needs the state before step k as well as after it (Adadelta).
inline bool preconditioner_needs_before(OptimizerKind kind) { return kind == OptimizerKind::kAdadelta; }

/// The state slots of an optimizer kind, as torch.optim names them in its state_dict.
std::vector<std::string> state_slots(OptimizerKind kind);

/// The default eps of a kind, as torch.optim's (Adam, RMSprop 1e-8; Adagrad 1e-10; Adadelta 1e-6).
double default_eps(OptimizerKind kind);

/// An optimizer of `options.kind` over the given parameters (state_dict names and tensors).
std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& options, std::vector<std::string> names,
                                          std::vector<at::Tensor> params);

}  // namespace pathkernel
