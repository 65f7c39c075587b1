// The probes' products with directions and the second-order term, by autograd on any model:
// Jacobian-vector products (forward mode, a direction per forward or all in one, or the double
// backward) and S = 1/2 dw^T H dw, each mode checked against explicit rows or the plain forward
// mode (kernels.h).
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/autograd.h>

#include <optional>
#include <string>

#include "pathkernel/analysis/batched_rows.h"
#include "pathkernel/analysis/kernels.h"

namespace pathkernel {

at::Tensor second_order(models::Model& model, const at::Tensor& x, const std::vector<int64_t>& outputs,
                        const ParamMap& dw) {
  return second_order(model, x, shared_columns(x.size(0), outputs), dw);
}

namespace {

/// S row by row, each as a Hessian-vector product of one output (one forward per probe, a
/// double backward per row): needs only second derivatives of every operator.
at::Tensor second_order_per_row(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& dirs) {
  const int64_t c = cols.size(1);
  const at::Tensor col = cols.contiguous();
  const auto cl = col.accessor<int64_t, 2>();
  at::Tensor s = at::empty({x.size(0) * c}, params.front().options());
  for (int64_t p = 0; p < x.size(0); ++p) {
    const at::Tensor out = model.forward(x.slice(0, p, p + 1))[0];
    for (int64_t j = 0; j < c; ++j) {
      const auto g = torch::autograd::grad({out[cl[p][j]]}, params, {}, /*retain_graph=*/true, /*create_graph=*/true, true);
      at::Tensor gdw = at::zeros({}, params.front().options());
      for (size_t i = 0; i < g.size(); ++i) {
        if (g[i].defined()) gdw = gdw + (g[i] * dirs[i]).sum();
      }
      double v = 0;
      if (gdw.requires_grad()) {
        const auto h = torch::autograd::grad({gdw}, params, {}, /*retain_graph=*/true, false, true);
        for (size_t i = 0; i < h.size(); ++i) {
          if (h[i].defined()) v += (h[i] * dirs[i]).sum().item<double>();
        }
      }
      s[p * c + j] = 0.5 * v;
    }
  }
  return s;
}

}  // namespace

namespace {

/// The line of an error that names the operator (LibTorch's TorchScript interpreter wraps it).
std::string operator_line(const std::string& what) {
  for (size_t at_ = 0; at_ < what.size();) {
    size_t end = what.find('\n', at_);
    if (end == std::string::npos) end = what.size();
    const std::string line = what.substr(at_, end - at_);
    for (const char* marker : {"not implemented", "not support", "vmap:"}) {
      if (line.find(marker) != std::string::npos) return line;
    }
    at_ = end + 1;
  }
  return what.substr(0, what.find('\n'));
}

std::string operator_line(const c10::Error& e) { return operator_line(e.what_without_backtrace()); }

/// operator_line of any exception (c10::Error, the TorchScript interpreter's own).
std::string failure_line(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return operator_line(*c);
  return operator_line(std::string(e.what()));
}

}  // namespace

at::Tensor second_order(models::Model& model, const at::Tensor& x, const at::Tensor& cols, const ParamMap& dw) {
  // Models from outside the zoo may hold an operator whose third derivative LibTorch gets wrong
  // (choose_second_order_mode below checks).
  return second_order(model, x, cols, dw,
                      model.spec().kind == "torchscript" ? SecondOrderMode::kPerRow : SecondOrderMode::kAllRows);
}

SecondOrderMode choose_second_order_mode(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                         const ParamMap& dw, std::string* why) {
  const at::Tensor x1 = x.slice(0, 0, 1), c1 = cols.slice(0, 0, 1);
  const at::Tensor want = second_order(model, x1, c1, dw, SecondOrderMode::kPerRow);
  const double scale = want.abs().max().item<double>();
  double err = 0;
  try {
    err = (second_order(model, x1, c1, dw, SecondOrderMode::kAllRows) - want).abs().max().item<double>() /
          std::max(scale, 1e-300);
  } catch (const c10::Error& e) {
    if (why) *why = "per row (all rows at once fails: " + operator_line(e) + ")";
    return SecondOrderMode::kPerRow;
  }
  if (scale > 0 && err <= 1e-9) {
    if (why) *why = "all rows at once (agrees with the first probe's Hessian-vector products)";
    return SecondOrderMode::kAllRows;
  }
  if (why) *why = "per row (all rows at once is off the first probe's Hessian-vector products by " + std::to_string(err) + ")";
  return SecondOrderMode::kPerRow;
}

at::Tensor second_order(models::Model& model, const at::Tensor& x, const at::Tensor& cols, const ParamMap& dw,
                        SecondOrderMode mode) {
  const auto params = parameters_of(model);
  std::vector<at::Tensor> dirs;
  for (const auto& item : model.named_parameters()) dirs.push_back(dw.at(item.key()));
  // The all-rows trick below differentiates through the backward of the backward: a third
  // derivative of every operator. LibTorch 1.13 gets that wrong for layer_norm (its saved mean
  // and 1/std carry no autograd history; a 30-50% error in S), so it runs as differentiable
  // operators here (norm_rules.cpp). Any other operator it gets wrong sends a model to the
  // per-row Hessian-vector route (choose_second_order_mode).
  if (mode == SecondOrderMode::kPerRow) return second_order_per_row(model, x, cols, params, dirs);
  const DifferentiableLayerNorm mended;
  // jvp(out, dw) = d/du <grad(out . u, w), dw>: differentiable in w, so it can be applied twice,
  // giving dw^T H dw for every output at once.
  auto jvp = [&](const at::Tensor& out) {
    const at::Tensor u = at::zeros_like(out).requires_grad_(true);
    const auto v = torch::autograd::grad({out}, params, {u}, /*retain_graph=*/true, /*create_graph=*/true, true);
    at::Tensor s = at::zeros({}, out.options());
    for (size_t i = 0; i < v.size(); ++i) {
      if (v[i].defined()) s = s + (v[i] * dirs[i]).sum();
    }
    return torch::autograd::grad({s}, {u}, {}, true, true, false)[0];
  };
  const at::Tensor out = model.forward(x);
  const at::Tensor first = jvp(out);
  // A model linear in w has first derivative constant in w: the second jvp has no graph to follow.
  if (!first.requires_grad()) return at::zeros({cols.numel()}, out.options());
  const at::Tensor second = jvp(first).detach();
  return (second.gather(1, cols) * 0.5).reshape({-1});
}

namespace {

/// Restores the model's capture flag however the products end.
class CaptureOff {
 public:
  explicit CaptureOff(models::Model& m) : model_(m), was_(m.capture()) { model_.set_capture(false); }
  ~CaptureOff() { model_.set_capture(was_); }
  CaptureOff(const CaptureOff&) = delete;
  CaptureOff& operator=(const CaptureOff&) = delete;

 private:
  models::Model& model_;
  bool was_;
};

/// Leaves a forward-mode dual level however the forward ends.
class DualLevel {
 public:
  DualLevel() : level_(torch::autograd::forward_ad::enter_dual_level()) {}
  ~DualLevel() { torch::autograd::forward_ad::exit_dual_level(level_); }
  DualLevel(const DualLevel&) = delete;
  DualLevel& operator=(const DualLevel&) = delete;
  uint64_t level() const { return level_; }

 private:
  uint64_t level_;
};

std::vector<at::Tensor> forward_mode_jvps(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                          const std::vector<const ParamMap*>& dirs, at::Tensor* logits) {
  at::NoGradGuard ng;  // forward-mode AD does not need the tape
  std::vector<at::Tensor> out;
  if (logits && dirs.empty()) *logits = model.forward(x);
  for (const ParamMap* v : dirs) {
    const DualLevel dual;
    for (const auto& item : model.named_parameters()) {
      const at::Tensor& p = item.value();
      item.value()._set_fw_grad(v->at(item.key()).to(p.options()).contiguous(), dual.level(), /*is_inplace_op=*/false);
    }
    const at::Tensor y = model.forward(x);
    const auto [primal, tangent] = at::_unpack_dual(y, dual.level());
    if (logits && out.empty()) *logits = primal.clone();
    // A model whose outputs do not depend on the parameters has no tangent: J v = 0.
    out.push_back(tangent.defined() ? tangent.gather(1, cols).reshape({-1}).clone()
                                    : at::zeros({cols.numel()}, y.options()));
  }
  return out;
}

/// Forward mode with every direction in one pass: the parameters' tangents are the directions
/// stacked as a vmap batch, so the primal forward runs once and each operator's tangent formula
/// runs once on all directions (tangent_rules.cpp for convolution and mean, ATen's rules or loop
/// fallback for the rest).
std::vector<at::Tensor> all_directions_in_one_forward(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                                      const std::vector<const ParamMap*>& dirs, at::Tensor* logits) {
  use_tangent_rules();
  at::NoGradGuard ng;
  const auto nd = static_cast<int64_t>(dirs.size());
  at::Tensor tangents;  // [nd, P, C]
  at::Tensor y;
  {
    const DualLevel dual;
    const VmapLevel level;
    for (const auto& item : model.named_parameters()) {
      const at::Tensor& p = item.value();
      std::vector<at::Tensor> stack;
      for (const ParamMap* v : dirs) stack.push_back(v->at(item.key()).to(p.options()));
      item.value()._set_fw_grad(at::_add_batch_dim(at::stack(stack), 0, level.id()), dual.level(), false);
    }
    const at::Tensor out = model.forward(x);
    const auto [primal, tangent] = at::_unpack_dual(out, dual.level());
    y = primal.clone();
    if (tangent.defined()) tangents = at::_remove_batch_dim(tangent, level.id(), nd, 0).contiguous();
  }
  if (logits) *logits = y;
  std::vector<at::Tensor> res;
  for (int64_t i = 0; i < nd; ++i) {
    res.push_back(tangents.defined() ? tangents[i].gather(1, cols).reshape({-1}).clone()
                                     : at::zeros({cols.numel()}, y.options()));
  }
  return res;
}

/// All directions in one forward where the probes' forward allows it; where an operator's
/// batching fails (choose_forward_batching tries it on every probe, so only in a forward it did
/// not see), one forward per direction, with a warning naming the operator once per process.
std::vector<at::Tensor> batched_forward_jvps(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                             const std::vector<const ParamMap*>& dirs, at::Tensor* logits) {
  if (dirs.size() < 2) return forward_mode_jvps(model, x, cols, dirs, logits);
  try {
    return all_directions_in_one_forward(model, x, cols, dirs, logits);
  } catch (const std::exception& e) {  // c10::Error, or the TorchScript interpreter's own
    static bool warned = false;
    if (!warned) spdlog::warn("J v: one forward per direction (all directions in one forward failed: {})", failure_line(e));
    warned = true;
  }
  return forward_mode_jvps(model, x, cols, dirs, logits);
}

std::vector<at::Tensor> double_backward_jvps(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                             const std::vector<const ParamMap*>& dirs, at::Tensor* logits) {
  const at::AutoGradMode grad_on(true);
  std::vector<at::Tensor> params, tangents;
  for (const auto& item : model.named_parameters()) {
    if (!item.value().requires_grad()) continue;
    params.push_back(item.value());
  }
  const at::Tensor y = model.forward(x);
  if (logits) *logits = y.detach().clone();
  std::vector<at::Tensor> out;
  if (dirs.empty()) return out;
  const at::Tensor sel = y.gather(1, cols);
  if (!sel.requires_grad()) {  // outputs independent of the parameters: J v = 0
    for (size_t i = 0; i < dirs.size(); ++i) out.push_back(at::zeros({cols.numel()}, y.options()));
    return out;
  }
  // J^T u, differentiable in u (and linear in it, so any u serves: ones, since some backward
  // formulas take the log of the incoming gradient): one backward of the probes' graph.
  const at::Tensor u = at::ones_like(sel).requires_grad_(true);
  const auto jtu = torch::autograd::grad({sel}, params, {u}, /*retain_graph=*/true, /*create_graph=*/true,
                                         /*allow_unused=*/true);
  std::vector<std::string> names;
  for (const auto& item : model.named_parameters()) {
    if (item.value().requires_grad()) names.push_back(item.key());
  }
  for (const ParamMap* v : dirs) {
    at::Tensor s;
    for (size_t i = 0; i < jtu.size(); ++i) {
      if (!jtu[i].defined() || !jtu[i].requires_grad()) continue;
      const at::Tensor term = (jtu[i] * v->at(names[i]).to(jtu[i].options())).sum();
      s = s.defined() ? s + term : term;
    }
    if (!s.defined()) {
      out.push_back(at::zeros({cols.numel()}, y.options()));
      continue;
    }
    out.push_back(torch::autograd::grad({s}, {u}, {}, /*retain_graph=*/true, false)[0].reshape({-1}).detach());
  }
  return out;
}

}  // namespace

std::vector<at::Tensor> probe_jvps(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                   const std::vector<const ParamMap*>& dirs, at::Tensor* logits, JvpMode mode) {
  const CaptureOff off(model);
  switch (mode) {
    case JvpMode::kForward:
      return forward_mode_jvps(model, x, cols, dirs, logits);
    case JvpMode::kForwardBatched:
      return batched_forward_jvps(model, x, cols, dirs, logits);
    case JvpMode::kDoubleBackward:
      break;
  }
  return double_backward_jvps(model, x, cols, dirs, logits);
}

std::optional<JvpMode> choose_jvp_mode(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                       std::string* why) {
  // A direction in general position, and the first probe's rows as the reference each mode must
  // match: a mode that runs but is wrong (a NaN from a backward formula) is not taken.
  const at::Tensor x1 = x.slice(0, 0, 1), c1 = cols.slice(0, 0, 1);
  ParamMap v;
  {
    const at::Generator gen = at::detail::createCPUGenerator(20250);
    for (const auto& item : model.named_parameters()) v[item.key()] = at::randn(item.value().sizes(), gen, item.value().options());
  }
  const at::Tensor want = explicit_probe_jacobian(model, x1, c1).mv(flatten_params(model, v));
  const double scale = std::max(want.abs().max().item<double>(), 1e-300);
  std::string failed[2];
  const JvpMode modes[2] = {JvpMode::kForward, JvpMode::kDoubleBackward};
  for (int i = 0; i < 2; ++i) {
    try {
      const at::Tensor got = probe_jvps(model, x1, c1, {&v}, nullptr, modes[i]).at(0);
      const double err = (got - want).abs().max().item<double>() / scale;
      if (err <= 1e-9) {
        if (why) {
          *why = i == 0 ? "forward-mode AD covers every operator of the model's forward"
                        : "no forward-mode AD for the model (" + failed[0] + "): double backward";
        }
        return modes[i];
      }
      failed[i] = "J v off the gradient rows by " + std::to_string(err) + " of their scale";
    } catch (const c10::Error& e) {
      failed[i] = operator_line(e);
    }
  }
  if (why) *why = "neither forward-mode AD (" + failed[0] + ") nor double backward (" + failed[1] + ") for the model: the gradient rows";
  return std::nullopt;
}

JvpMode choose_forward_batching(models::Model& model, const at::Tensor& x, const at::Tensor& cols, std::string* why) {
  // Two directions in general position on every probe (a layout can depend on the number of
  // probes), against one forward per direction.
  ParamMap v[2];
  const at::Generator gen = at::detail::createCPUGenerator(20251);
  for (auto& d : v) {
    for (const auto& item : model.named_parameters()) d[item.key()] = at::randn(item.value().sizes(), gen, item.value().options());
  }
  std::string failed;
  try {
    const auto want = probe_jvps(model, x, cols, {&v[0], &v[1]}, nullptr, JvpMode::kForward);
    const CaptureOff off(model);
    const auto got = all_directions_in_one_forward(model, x, cols, {&v[0], &v[1]}, nullptr);
    double err = 0;
    for (int i = 0; i < 2; ++i) {
      const double scale = std::max(want[i].abs().max().item<double>(), 1e-300);
      err = std::max(err, (got[i] - want[i]).abs().max().item<double>() / scale);
    }
    if (err <= 1e-9) {
      if (why) *why = "every direction in one forward (agrees with one forward per direction on the probes)";
      return JvpMode::kForwardBatched;
    }
    failed = "off one forward per direction by " + std::to_string(err) + " of its scale";
  } catch (const std::exception& e) {  // c10::Error, BatchedRowsUnsupported, the interpreter's own
    failed = failure_line(e);
  }
  if (why) *why = "one forward per direction (all directions in one forward: " + failed + ")";
  return JvpMode::kForward;
}

}  // namespace pathkernel
