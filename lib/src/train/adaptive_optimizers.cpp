#include "adaptive_optimizers.h"

#include <ATen/ATen.h>

#include <cmath>

#include "pathkernel/io/errors.h"

namespace pathkernel {
namespace {

/// What the optimizers with per-parameter state slots share. A step forms the new weights and
/// slots out of place and commits them only when every new weight is finite (accept_update), so
/// a diverging step leaves w_k and the state intact.
class SlotOptimizer : public Optimizer {
 protected:
  using Optimizer::Optimizer;
  using Slot = std::vector<at::Tensor>;

  /// Commits the new weights and, for each (slot, its new values), the slot (a slot the settings
  /// do not keep is empty and skipped); one more step done.
  void commit(const Slot& w, std::initializer_list<std::pair<Slot*, const Slot*>> slots, double update_sq,
              UpdateOutcome& out) {
    for (size_t i = 0; i < params_.size(); ++i) {
      params_[i].detach().copy_(w[i]);
      for (const auto& [slot, next] : slots) {
        if (!slot->empty()) (*slot)[i] = (*next)[i];
      }
    }
    ++steps_;
    out.update_norm = std::sqrt(update_sq);
  }

  /// A slot's tensors, cloned, named as the parameters.
  NamedTensors cloned(const Slot& ts) const {
    NamedTensors out = named(ts);
    for (auto& [name, t] : out) t = t.clone();
    return out;
  }

  /// Parameter i's value of a slot read from a state file (`read`; undefined: `fill` everywhere),
  /// refused naming the file when `nonnegative` and some entry is below 0.
  at::Tensor loaded(const Slot& read, size_t i, double fill, const char* slot, const std::string& source,
                    bool nonnegative) const {
    at::Tensor t = read[i].defined() ? read[i] : at::full_like(params_[i], fill);
    if (nonnegative && t.lt(0).any().item<bool>()) {
      throw InputError(source + ": " + slot + " of '" + names_[i] + "' has negative entries");
    }
    return t;
  }
};

/// Flattens tensors (state_dict order) into one vector.
at::Tensor flat_of(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> flat;
  for (const auto& t : ts) flat.push_back(t.reshape({-1}));
  return at::cat(flat);
}

/// torch.optim.Adam / AdamW (amsgrad off): m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
/// w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps); Adam adds lc w to g, AdamW first
/// scales w by 1 - lr ld. The new state is formed out of place and committed when finite.
class AdamOptimizer final : public SlotOptimizer {
 public:
  AdamOptimizer(OptimizerOptions o, std::vector<std::string> names, std::vector<at::Tensor> params)
      : SlotOptimizer(o, std::move(names), std::move(params)) {
    for (const auto& p : params_) {
      exp_avg_.push_back(at::zeros_like(p));
      exp_avg_sq_.push_back(at::zeros_like(p));
    }
  }

  UpdateOutcome step(const std::vector<at::Tensor>& grads, const std::vector<double>& /*grad_sq*/,
                     double lr) override {
    const auto& o = options_;
    const bool decoupled = o.kind == OptimizerKind::kAdamW;
    const double t = static_cast<double>(steps_ + 1);
    const double bc1 = 1 - std::pow(o.beta1, t), bc2 = 1 - std::pow(o.beta2, t);
    const double step_size = lr / bc1, bc2_sqrt = std::sqrt(bc2);
    std::vector<at::Tensor> m(params_.size()), v(params_.size()), w(params_.size());
    UpdateOutcome out;
    double update_sq = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      at::Tensor g = grads[i];
      at::Tensor p = params_[i].detach();
      if (decoupled && o.weight_decay != 0) p = p.mul(1 - lr * o.weight_decay);
      if (!decoupled && o.weight_decay != 0) g = g.add(params_[i], o.weight_decay);
      m[i] = exp_avg_[i].mul(o.beta1).add_(g, 1 - o.beta1);
      v[i] = exp_avg_sq_[i].mul(o.beta2).addcmul_(g, g, 1 - o.beta2);
      const at::Tensor denom = (v[i].sqrt() / bc2_sqrt).add_(o.eps);
      w[i] = p.addcdiv(m[i], denom, -step_size);
      if (!accept_update(i, w[i], update_sq, out)) return out;
    }
    commit(w, {{&exp_avg_, &m}, {&exp_avg_sq_, &v}}, update_sq, out);
    return out;
  }

  OptimizerState state() const override {
    if (steps_ == 0) return {};
    return {{"exp_avg", cloned(exp_avg_)}, {"exp_avg_sq", cloned(exp_avg_sq_)}};
  }

  void load_state(const OptimizerState& state, int64_t steps, const std::string& source) override {
    std::vector<at::Tensor> m(params_.size()), v(params_.size());
    read_slot(state, "exp_avg", m, source, steps > 0);
    read_slot(state, "exp_avg_sq", v, source, steps > 0);
    for (size_t i = 0; i < params_.size(); ++i) {
      exp_avg_[i] = loaded(m, i, 0, "exp_avg", source, false);
      exp_avg_sq_[i] = loaded(v, i, 0, "exp_avg_sq", source, true);
    }
    steps_ = steps;
  }

  at::Tensor preconditioner_state() const override {
    if (steps_ == 0) return {};
    return flat_of(exp_avg_sq_);
  }

  void preconditioner_from(const at::Tensor& state, int64_t steps, at::Tensor& out,
                           const at::Tensor& /*before*/) const override {
    const double bc2 = 1 - std::pow(options_.beta2, static_cast<double>(steps));
    if (!out.defined() || out.numel() != state.numel()) out = at::empty({state.numel()}, at::kDouble);
    out.copy_(state).div_(bc2).sqrt_().add_(options_.eps).reciprocal_();
  }

 private:
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
};

/// torch.optim.RMSprop: gt = g + lc w; v = a v + (1 - a) gt^2; centered: m = a m + (1 - a) gt and
/// v - m^2 under the root; d = gt / (sqrt(.) + eps); with momentum b = mu b + d, w -= lr b, else
/// w -= lr d. The new state is formed out of place and committed when finite.
class RmspropOptimizer final : public SlotOptimizer {
 public:
  RmspropOptimizer(OptimizerOptions o, std::vector<std::string> names, std::vector<at::Tensor> params)
      : SlotOptimizer(o, std::move(names), std::move(params)) {
    for (const auto& p : params_) {
      square_avg_.push_back(at::zeros_like(p));
      if (o.centered) grad_avg_.push_back(at::zeros_like(p));
      if (o.momentum > 0) buf_.push_back(at::zeros_like(p));
    }
  }

  UpdateOutcome step(const std::vector<at::Tensor>& grads, const std::vector<double>& /*grad_sq*/,
                     double lr) override {
    const auto& o = options_;
    const size_t n = params_.size();
    std::vector<at::Tensor> v(n), m(n), b(n), w(n);
    UpdateOutcome out;
    double update_sq = 0;
    for (size_t i = 0; i < n; ++i) {
      at::Tensor g = grads[i];
      const at::Tensor p = params_[i].detach();
      if (o.weight_decay != 0) g = g.add(p, o.weight_decay);
      v[i] = square_avg_[i].mul(o.alpha).addcmul_(g, g, 1 - o.alpha);
      at::Tensor avg;
      if (o.centered) {
        m[i] = grad_avg_[i].mul(o.alpha).add_(g, 1 - o.alpha);
        avg = v[i].addcmul(m[i], m[i], -1).sqrt_().add_(o.eps);
      } else {
        avg = v[i].sqrt().add_(o.eps);
      }
      if (o.momentum > 0) {
        b[i] = buf_[i].mul(o.momentum).addcdiv_(g, avg);
        w[i] = p.add(b[i], -lr);
      } else {
        w[i] = p.addcdiv(g, avg, -lr);
      }
      if (!accept_update(i, w[i], update_sq, out)) return out;
    }
    commit(w, {{&square_avg_, &v}, {&grad_avg_, &m}, {&buf_, &b}}, update_sq, out);  // empty when not kept
    return out;
  }

  OptimizerState state() const override {
    if (steps_ == 0) return {};
    OptimizerState st = {{"square_avg", cloned(square_avg_)}};
    if (options_.momentum > 0) st.emplace_back("momentum_buffer", cloned(buf_));
    if (options_.centered) st.emplace_back("grad_avg", cloned(grad_avg_));
    return st;
  }

  void load_state(const OptimizerState& state, int64_t steps, const std::string& source) override {
    const size_t n = params_.size();
    std::vector<at::Tensor> v(n), m(n), b(n);
    read_slot(state, "square_avg", v, source, steps > 0);
    read_slot(state, "grad_avg", m, source, options_.centered && steps > 0);
    read_slot(state, "momentum_buffer", b, source, options_.momentum > 0 && steps > 0);
    for (const auto& [slot, tensors] : state) {
      if ((slot == "grad_avg" && !options_.centered) || (slot == "momentum_buffer" && options_.momentum == 0)) {
        throw InputError(source + ": holds '" + slot + "', which the run's RMSprop settings do not keep");
      }
    }
    for (size_t i = 0; i < n; ++i) {
      square_avg_[i] = loaded(v, i, 0, "square_avg", source, true);
      if (options_.centered) grad_avg_[i] = loaded(m, i, 0, "grad_avg", source, false);
      if (options_.momentum > 0) buf_[i] = loaded(b, i, 0, "momentum_buffer", source, false);
    }
    steps_ = steps;
  }

  at::Tensor preconditioner_state() const override {
    if (steps_ == 0) return {};
    return options_.centered ? at::cat({flat_of(square_avg_), flat_of(grad_avg_)}) : flat_of(square_avg_);
  }

  void preconditioner_from(const at::Tensor& state, int64_t /*steps*/, at::Tensor& out,
                           const at::Tensor& /*before*/) const override {
    const int64_t n = options_.centered ? state.numel() / 2 : state.numel();
    if (!out.defined() || out.numel() != n) out = at::empty({n}, at::kDouble);
    out.copy_(state.narrow(0, 0, n));
    if (options_.centered) {
      const at::Tensor m = state.narrow(0, n, n).to(at::kDouble);
      out.sub_(m * m).clamp_min_(0);
    }
    out.sqrt_().add_(options_.eps).reciprocal_();
  }

 private:
  std::vector<at::Tensor> square_avg_, grad_avg_, buf_;
};

/// torch.optim.Adagrad: gt = g + lc w; s += gt^2 (s starts at initial_accumulator_value);
/// w -= lr / (1 + k lr_decay) * gt / (sqrt(s) + eps) at step k (0-based).
class AdagradOptimizer final : public SlotOptimizer {
 public:
  AdagradOptimizer(OptimizerOptions o, std::vector<std::string> names, std::vector<at::Tensor> params)
      : SlotOptimizer(o, std::move(names), std::move(params)) {
    for (const auto& p : params_) sum_.push_back(at::full_like(p, o.initial_accumulator));
  }

  UpdateOutcome step(const std::vector<at::Tensor>& grads, const std::vector<double>& /*grad_sq*/,
                     double lr) override {
    const auto& o = options_;
    const size_t n = params_.size();
    const double clr = lr / (1 + static_cast<double>(steps_) * o.lr_decay);
    std::vector<at::Tensor> s(n), w(n);
    UpdateOutcome out;
    double update_sq = 0;
    for (size_t i = 0; i < n; ++i) {
      at::Tensor g = grads[i];
      const at::Tensor p = params_[i].detach();
      if (o.weight_decay != 0) g = g.add(p, o.weight_decay);
      s[i] = sum_[i].addcmul(g, g, 1);
      w[i] = p.addcdiv(g, s[i].sqrt().add_(o.eps), -clr);
      if (!accept_update(i, w[i], update_sq, out)) return out;
    }
    commit(w, {{&sum_, &s}}, update_sq, out);
    return out;
  }

  OptimizerState state() const override {
    return {{"sum", cloned(sum_)}};
  }

  void load_state(const OptimizerState& state, int64_t steps, const std::string& source) override {
    std::vector<at::Tensor> s(params_.size());
    read_slot(state, "sum", s, source, steps > 0);
    for (size_t i = 0; i < params_.size(); ++i) sum_[i] = loaded(s, i, options_.initial_accumulator, "sum", source, true);
    steps_ = steps;
  }

  at::Tensor preconditioner_state() const override { return flat_of(sum_); }

  void preconditioner_from(const at::Tensor& state, int64_t /*steps*/, at::Tensor& out,
                           const at::Tensor& /*before*/) const override {
    if (!out.defined() || out.numel() != state.numel()) out = at::empty({state.numel()}, at::kDouble);
    out.copy_(state).sqrt_().add_(options_.eps).reciprocal_();
  }

 private:
  std::vector<at::Tensor> sum_;
};

/// torch.optim.Adadelta: gt = g + lc w; v = rho v + (1 - rho) gt^2;
/// d = sqrt(u + eps) / sqrt(v + eps) * gt with u the accumulated squared update before this step;
/// u = rho u + (1 - rho) d^2; w -= lr d.
class AdadeltaOptimizer final : public SlotOptimizer {
 public:
  AdadeltaOptimizer(OptimizerOptions o, std::vector<std::string> names, std::vector<at::Tensor> params)
      : SlotOptimizer(o, std::move(names), std::move(params)) {
    for (const auto& p : params_) {
      square_avg_.push_back(at::zeros_like(p));
      acc_delta_.push_back(at::zeros_like(p));
    }
  }

  UpdateOutcome step(const std::vector<at::Tensor>& grads, const std::vector<double>& /*grad_sq*/,
                     double lr) override {
    const auto& o = options_;
    const size_t n = params_.size();
    std::vector<at::Tensor> v(n), u(n), w(n);
    UpdateOutcome out;
    double update_sq = 0;
    for (size_t i = 0; i < n; ++i) {
      at::Tensor g = grads[i];
      const at::Tensor p = params_[i].detach();
      if (o.weight_decay != 0) g = g.add(p, o.weight_decay);
      v[i] = square_avg_[i].mul(o.rho).addcmul_(g, g, 1 - o.rho);
      const at::Tensor std_ = v[i].add(o.eps).sqrt_();
      const at::Tensor delta = acc_delta_[i].add(o.eps).sqrt_().div_(std_).mul_(g);
      u[i] = acc_delta_[i].mul(o.rho).addcmul_(delta, delta, 1 - o.rho);
      w[i] = p.add(delta, -lr);
      if (!accept_update(i, w[i], update_sq, out)) return out;
    }
    commit(w, {{&square_avg_, &v}, {&acc_delta_, &u}}, update_sq, out);
    return out;
  }

  OptimizerState state() const override {
    if (steps_ == 0) return {};
    return {{"square_avg", cloned(square_avg_)}, {"acc_delta", cloned(acc_delta_)}};
  }

  void load_state(const OptimizerState& state, int64_t steps, const std::string& source) override {
    std::vector<at::Tensor> v(params_.size()), u(params_.size());
    read_slot(state, "square_avg", v, source, steps > 0);
    read_slot(state, "acc_delta", u, source, steps > 0);
    for (size_t i = 0; i < params_.size(); ++i) {
      square_avg_[i] = loaded(v, i, 0, "square_avg", source, true);
      acc_delta_[i] = loaded(u, i, 0, "acc_delta", source, true);
    }
    steps_ = steps;
  }

  /// [square_avg, acc_delta], flattened.
  at::Tensor preconditioner_state() const override {
    return at::cat({flat_of(square_avg_), flat_of(acc_delta_)});
  }

  void preconditioner_from(const at::Tensor& state, int64_t /*steps*/, at::Tensor& out,
                           const at::Tensor& before) const override {
    const int64_t n = state.numel() / 2;
    if (!out.defined() || out.numel() != n) out = at::empty({n}, at::kDouble);
    // sqrt(u_{k-1} + eps) / sqrt(v_k + eps): u before the step (0 before step 0), v after it.
    out.copy_(state.narrow(0, 0, n)).add_(options_.eps).sqrt_().reciprocal_();
    if (before.defined()) {
      out.mul_(before.narrow(0, n, n).to(at::kDouble).add(options_.eps).sqrt_());
    } else {
      out.mul_(std::sqrt(options_.eps));
    }
  }

 private:
  std::vector<at::Tensor> square_avg_, acc_delta_;
};

}  // namespace

std::unique_ptr<Optimizer> make_adaptive_optimizer(const OptimizerOptions& options, std::vector<std::string> names,
                                                   std::vector<at::Tensor> params) {
  switch (options.kind) {
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW: return std::make_unique<AdamOptimizer>(options, std::move(names), std::move(params));
    case OptimizerKind::kRmsprop: return std::make_unique<RmspropOptimizer>(options, std::move(names), std::move(params));
    case OptimizerKind::kAdagrad: return std::make_unique<AdagradOptimizer>(options, std::move(names), std::move(params));
    case OptimizerKind::kAdadelta: return std::make_unique<AdadeltaOptimizer>(options, std::move(names), std::move(params));
    case OptimizerKind::kSgd: break;
  }
  throw InputError("make_adaptive_optimizer: not an adaptive optimizer");
}

}  // namespace pathkernel
