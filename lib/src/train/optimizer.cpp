#include "pathkernel/train/optimizer.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>

#include "pathkernel/io/errors.h"
#include "adaptive_optimizers.h"

namespace pathkernel {

double squared_norm(const at::Tensor& t) {
  const at::Tensor flat = t.reshape({-1});
  return at::dot(flat, flat).item<double>();
}

namespace {

/// torch.optim.SGD: d = g + lc w; b = mu b + (1 - tau) d (b = d at the first step);
/// d = d + mu b (Nesterov) or b; w -= lr d.
class SgdOptimizer final : public Optimizer {
 public:
  SgdOptimizer(OptimizerOptions o, std::vector<std::string> names, std::vector<at::Tensor> params)
      : Optimizer(o, std::move(names), std::move(params)) {
    buffers_.resize(params_.size());
    weights_changed();
  }

  UpdateOutcome step(const std::vector<at::Tensor>& grads, const std::vector<double>& grad_sq,
                     double lr) override {
    double g_sq = 0;
    for (double v : grad_sq) g_sq += v;
    if (!in_place_is_safe(lr, std::sqrt(g_sq))) return step_out_of_place(grads, lr);
    const auto& o = options_;
    double update_sq = 0, buffer_sq = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor d = grads[i];
      if (o.weight_decay != 0) d = d.add(params_[i], o.weight_decay);
      if (o.momentum != 0) {
        if (buffers_[i].defined()) {
          buffers_[i].mul_(o.momentum).add_(d, 1 - o.dampening);
        } else {
          buffers_[i] = d.clone();
        }
        if (o.nesterov) {
          buffer_sq += squared_norm(buffers_[i]);
          d = d.add(buffers_[i], o.momentum);
        } else {
          d = buffers_[i];
        }
      }
      // Without decay or momentum d is the gradient itself: its norm is known.
      update_sq += d.data_ptr() == grads[i].data_ptr() ? grad_sq[i] : squared_norm(d);
      params_[i].add_(d, -lr);
    }
    ++steps_;
    UpdateOutcome out;
    out.update_norm = lr * std::sqrt(update_sq);
    // Running upper bounds instead of a pass over the weights every step.
    buffer_norm_ = o.momentum == 0 ? 0.0 : o.nesterov ? std::sqrt(buffer_sq) : std::sqrt(update_sq);
    weight_norm_ += out.update_norm;
    return out;
  }

  OptimizerState state() const override {
    if (options_.momentum == 0 || !buffers_[0].defined()) return {};
    NamedTensors b = named(buffers_);
    for (auto& [n, t] : b) t = t.clone();
    return {{"momentum_buffer", b}};
  }

  void load_state(const OptimizerState& state, int64_t steps, const std::string& source) override {
    for (auto& b : buffers_) b = at::Tensor();
    read_slot(state, "momentum_buffer", buffers_, source, /*required=*/options_.momentum != 0 && steps > 0);
    if (options_.momentum == 0 && !state.empty()) {
      throw InputError(source + ": holds momentum buffers, but the run's optimizer has no momentum");
    }
    steps_ = steps;
    weights_changed();
  }

  void weights_changed() override {
    double w = 0, v = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      w += squared_norm(params_[i].detach());
      if (buffers_[i].defined()) v += squared_norm(buffers_[i]);
    }
    weight_norm_ = std::sqrt(w);
    buffer_norm_ = std::sqrt(v);
  }

 private:
  /// Triangle inequality: |w_{k+1}| <= |w_k| + lr |d| with |d| bounded by the norms of the parts.
  /// Far below the dtype's largest value no weight can overflow and the update is made in place
  /// (as torch.optim does); otherwise it goes the careful way. |w_k| and |b_{k-1}| are running
  /// bounds, made exact again when they grow too large.
  double bound(double lr, double g_norm) const {
    const auto& o = options_;
    const double dn = g_norm + o.weight_decay * weight_norm_;
    const double buffer = o.momentum * buffer_norm_ + dn;
    const double d = o.momentum == 0 ? dn : o.nesterov ? dn + o.momentum * buffer : buffer;
    const double b = weight_norm_ + lr * d;
    return std::isfinite(b) ? b : HUGE_VAL;
  }
  double limit() const { return params_.empty() || params_[0].scalar_type() == at::kDouble ? 1e300 : 1e36; }
  bool in_place_is_safe(double lr, double g_norm) {
    if (!(bound(lr, g_norm) < limit())) weights_changed();
    return bound(lr, g_norm) < limit();
  }

  /// The update formed out of place and committed only when every new weight is finite, so a
  /// diverging step leaves w_k and the buffers intact.
  UpdateOutcome step_out_of_place(const std::vector<at::Tensor>& grads, double lr) {
    const auto& o = options_;
    std::vector<at::Tensor> next(params_.size()), next_buffers(params_.size());
    UpdateOutcome out;
    double update_sq = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor d = grads[i];
      if (o.weight_decay != 0) d = d.add(params_[i], o.weight_decay);
      if (o.momentum != 0) {
        next_buffers[i] = buffers_[i].defined() ? buffers_[i].mul(o.momentum).add_(d, 1 - o.dampening) : d.clone();
        d = o.nesterov ? d.add(next_buffers[i], o.momentum) : next_buffers[i];
      }
      next[i] = at::add(params_[i], d, -lr);
      if (!accept_update(i, next[i], update_sq, out)) return out;
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      params_[i].copy_(next[i]);
      if (o.momentum != 0) buffers_[i] = next_buffers[i];
    }
    ++steps_;
    weights_changed();
    out.update_norm = std::sqrt(update_sq);
    return out;
  }

  std::vector<at::Tensor> buffers_;
  double weight_norm_ = 0, buffer_norm_ = 0;
};

}  // namespace

Optimizer::Optimizer(OptimizerOptions options, std::vector<std::string> names, std::vector<at::Tensor> params)
    : options_(options), names_(std::move(names)), params_(std::move(params)) {
  options_.validate();
}

LinearUpdate Optimizer::linear_update(int64_t k) const { return pathkernel::linear_update(options_, k); }

LinearUpdate linear_update(const OptimizerOptions& o, int64_t k) {
  LinearUpdate u;
  if (o.kind == OptimizerKind::kSgd) {
    u.lc = o.weight_decay;
    if (o.momentum == 0) return u;
    u.beta = o.momentum;
    u.s = k == 0 ? 1.0 : 1.0 - o.dampening;
    if (o.nesterov) {
      u.alpha = o.momentum;
      u.nu = 1;
    }
    return u;
  }
  if (o.kind == OptimizerKind::kRmsprop || o.kind == OptimizerKind::kAdagrad || o.kind == OptimizerKind::kAdadelta) {
    u.lc = o.weight_decay;
    if (o.kind == OptimizerKind::kAdagrad) u.alpha = 1.0 / (1.0 + static_cast<double>(k) * o.lr_decay);
    if (o.kind == OptimizerKind::kRmsprop && o.momentum > 0) {
      u.beta = o.momentum;  // b_k = mu b_{k-1} + P_k (.) gtilde_k
      u.inner = true;
    }
    return u;
  }
  u.beta = o.beta1;
  u.s = 1 - o.beta1;
  u.alpha = 1.0 / (1.0 - std::pow(o.beta1, static_cast<double>(k + 1)));
  if (o.kind == OptimizerKind::kAdam) u.lc = o.weight_decay;
  if (o.kind == OptimizerKind::kAdamW) u.ld = o.weight_decay;
  return u;
}

void Optimizer::read_slot(const OptimizerState& state, const std::string& slot, std::vector<at::Tensor>& out,
                          const std::string& source, bool required) const {
  auto it = std::find_if(state.begin(), state.end(), [&](const auto& s) { return s.first == slot; });
  if (it == state.end()) {
    if (required) throw InputError(source + ": optimizer state has no '" + slot + "'");
    return;
  }
  const std::vector<std::string> known = state_slots(options_.kind);
  for (const auto& s : state) {
    if (std::find(known.begin(), known.end(), s.first) == known.end()) {
      throw InputError(source + ": unknown optimizer state slot '" + s.first + "' for " + optimizer_name(options_.kind));
    }
  }
  if (it->second.size() != params_.size()) {
    throw InputError(source + ": optimizer state '" + slot + "' has " + std::to_string(it->second.size()) +
                     " tensors, the model has " + std::to_string(params_.size()) + " parameters");
  }
  for (const auto& [name, t] : it->second) {
    auto pos = std::find(names_.begin(), names_.end(), name);
    if (pos == names_.end()) throw InputError(source + ": optimizer state '" + slot + "." + name + "' matches no parameter");
    const size_t i = static_cast<size_t>(pos - names_.begin());
    if (t.sizes() != params_[i].sizes() || !t.is_floating_point()) {
      throw InputError(source + ": optimizer state '" + slot + "." + name + "' has shape " + c10::str(t.sizes()) +
                       " (" + std::string(c10::toString(t.scalar_type())) + "), expected " +
                       c10::str(params_[i].sizes()));
    }
    out[i] = t.to(params_[i].scalar_type()).clone();
  }
}

bool Optimizer::accept_update(size_t i, const at::Tensor& next, double& update_sq, UpdateOutcome& out) const {
  // w_i is finite, so the new weight is finite exactly when the change is.
  const double sq = squared_norm(next - params_[i]);
  if (!std::isfinite(sq)) {
    out.finite = false;
    out.nonfinite = "weights (" + names_[i] + ")";
    return false;
  }
  update_sq += sq;
  return true;
}

NamedTensors Optimizer::named(const std::vector<at::Tensor>& tensors) const {
  NamedTensors out;
  for (size_t i = 0; i < tensors.size(); ++i) out.emplace_back(names_[i], tensors[i]);
  return out;
}

ParamMap Optimizer::preconditioner(const at::Tensor& before) const {
  ParamMap p;
  const at::Tensor st = preconditioner_state();
  if (!st.defined() || steps_ == 0) return p;
  // In float64 from the state as the optimizer holds it (SPEC: P_k after step k); the float32
  // route's own rounding of this expression ends up in Uopt_round.
  at::Tensor flat;
  preconditioner_from(st, steps_, flat, before);
  int64_t off = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t m = params_[i].numel();
    p[names_[i]] = flat.narrow(0, off, m).view(params_[i].sizes());
    off += m;
  }
  return p;
}

std::vector<std::string> state_slots(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kSgd: return {"momentum_buffer"};
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW: return {"exp_avg", "exp_avg_sq"};
    case OptimizerKind::kRmsprop: return {"square_avg", "momentum_buffer", "grad_avg"};
    case OptimizerKind::kAdagrad: return {"sum"};
    case OptimizerKind::kAdadelta: return {"square_avg", "acc_delta"};
  }
  return {};
}

std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& options, std::vector<std::string> names,
                                          std::vector<at::Tensor> params) {
  switch (options.kind) {
    case OptimizerKind::kSgd: return std::make_unique<SgdOptimizer>(options, std::move(names), std::move(params));
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
    case OptimizerKind::kRmsprop:
    case OptimizerKind::kAdagrad:
    case OptimizerKind::kAdadelta: return make_adaptive_optimizer(options, std::move(names), std::move(params));
  }
  throw InputError("unknown optimizer");
}

}  // namespace pathkernel
