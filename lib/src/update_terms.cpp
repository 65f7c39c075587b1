#include "pathkernel/update_terms.h"

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

void UpdateRecurrence::advance(int64_t k, const ParamMap& grad, const ParamMap& weights) {
  lu_ = optimizer_.linear_update(k);
  // Without memory a step's update depends on that step alone: any step may come next.
  if (k != next_ && lu_.has_memory()) {
    throw std::logic_error("UpdateRecurrence: step " + std::to_string(k) + " given, " + std::to_string(next_) +
                           " expected");
  }
  for (const auto& [name, g] : grad) {
    auto& gb = g_buf_[name];
    gb = gb.defined() && lu_.beta != 0 ? gb * lu_.beta + g * lu_.s : g * lu_.s;
    if (lu_.lc != 0) {
      auto& wb = w_buf_[name];
      const at::Tensor term = weights.at(name) * (lu_.s * lu_.lc);
      wb = wb.defined() && lu_.beta != 0 ? wb * lu_.beta + term : term;
    }
  }
  grad_ = grad;
  weights_ = weights;
  next_ = k + 1;
}

ParamMap UpdateRecurrence::kernel_direction(const ParamMap& p) const {
  ParamMap d;
  for (const auto& [name, gb] : g_buf_) {
    at::Tensor t = gb * lu_.alpha;
    if (lu_.nu != 0) t = t + grad_.at(name) * lu_.nu;
    d[name] = t;
  }
  return precondition(p, d);
}

ParamMap UpdateRecurrence::decay_direction(const ParamMap& p) const {
  ParamMap d;
  for (const auto& [name, w] : weights_) {
    at::Tensor t = at::zeros_like(w);
    if (lu_.lc != 0) {
      t = w_buf_.at(name) * lu_.alpha;
      if (lu_.nu != 0) t = t + w * (lu_.nu * lu_.lc);
    }
    d[name] = t;
  }
  d = precondition(p, d);
  if (lu_.ld != 0) {
    for (auto& [name, t] : d) t = t + weights_.at(name) * lu_.ld;
  }
  return d;
}

}  // namespace pathkernel
