#include "pathkernel/analysis/update_terms.h"

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

namespace pathkernel {

ParamMap precondition(const ParamMap& p, const ParamMap& v) {
  if (p.empty()) return v;
  ParamMap out;
  for (const auto& [name, t] : v) out[name] = p.at(name) * t;
  return out;
}

ParamMap scaled(const ParamMap& g, double s) {
  ParamMap out;
  for (const auto& [name, t] : g) out[name] = t * s;
  return out;
}

void UpdateRecurrence::advance(int64_t k, const ParamMap& grad, const ParamMap& weights,
                                const StepSettings& settings, const ParamMap& p) {
  lu_ = linear_update(settings.options, k);
  // Without memory a step's update depends on that step alone: any step may come next.
  if (k != next_ && lu_.has_memory()) {
    throw std::logic_error("UpdateRecurrence: step " + std::to_string(k) + " given, " + std::to_string(next_) +
                           " expected");
  }
  const bool coupled = lu_.lc != 0 || (settings.options.kind != OptimizerKind::kAdamW && !settings.weight_decay.empty());
  decays_ = false;
  if (lu_.inner && p.empty() && settings.options.kind != OptimizerKind::kSgd) {
    throw std::logic_error("UpdateRecurrence: step " + std::to_string(k) + " needs its preconditioner");
  }
  for (const auto& [name, g0] : grad) {
    // With P inside the buffer each step's gradient enters preconditioned.
    const at::Tensor g = lu_.inner ? g0 * p.at(name) : g0;
    auto& gb = g_buf_[name];
    gb = gb.defined() && lu_.beta != 0 ? gb * lu_.beta + g * lu_.s : g * lu_.s;
    // The coupled (L2) decay's buffer, kept while any step's decay is in it.
    const double lc = coupled ? settings.decay_of(name) : 0.0;
    auto& wb = w_buf_[name];
    const bool carried = wb.defined() && lu_.beta != 0;
    if (lc != 0) {
      at::Tensor term = weights.at(name) * (lu_.s * lc);
      if (lu_.inner) term = term * p.at(name);
      wb = carried ? wb * lu_.beta + term : term;
    } else {
      wb = carried ? wb * lu_.beta : at::Tensor();
    }
    if (wb.defined()) decays_ = true;
    if (settings.options.kind == OptimizerKind::kAdamW && settings.decay_of(name) != 0) decays_ = true;
  }
  grad_ = grad;
  weights_ = weights;
  settings_ = settings;
  next_ = k + 1;
}

ParamMap UpdateRecurrence::kernel_direction(const ParamMap& p) const {
  ParamMap d;
  for (const auto& [name, gb] : g_buf_) {
    at::Tensor t = gb * (lu_.alpha * settings_.rate_of(name));
    if (lu_.nu != 0) t = t + grad_.at(name) * (lu_.nu * settings_.rate_of(name));
    d[name] = t;
  }
  return lu_.inner ? d : precondition(p, d);
}

ParamMap UpdateRecurrence::decay_direction(const ParamMap& p) const {
  const bool decoupled = settings_.options.kind == OptimizerKind::kAdamW;
  ParamMap d;
  for (const auto& [name, w] : weights_) {
    const double r = settings_.rate_of(name);
    const at::Tensor& wb = w_buf_.at(name);
    at::Tensor t = wb.defined() ? wb * (lu_.alpha * r) : at::zeros_like(w);
    const double lc = decoupled ? 0.0 : settings_.decay_of(name);
    if (lu_.nu != 0 && lc != 0) t = t + w * (lu_.nu * lc * r);
    d[name] = t;
  }
  if (!lu_.inner) d = precondition(p, d);
  if (decoupled) {
    for (auto& [name, t] : d) {
      const double ld = settings_.decay_of(name);
      if (ld != 0) t = t + weights_.at(name) * (ld * settings_.rate_of(name));
    }
  }
  return d;
}

}  // namespace pathkernel
