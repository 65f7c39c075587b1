#include "pathkernel/attribution.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "pathkernel/analyzer.h"
#include "pathkernel/errors.h"
#include "pathkernel/kernels.h"
#include "pathkernel/replay.h"

namespace pathkernel {
namespace {

using Clock = std::chrono::steady_clock;

/// One checkpoint stretch [a, b], replayed forwards: the weights of every step and the
/// preconditioner after every step (flattened in state_dict order; undefined for SGD).
struct Stretch {
  int64_t a = 0, b = 0;
  std::vector<NamedTensors> weights;  ///< w_a .. w_b
  std::vector<at::Tensor> precond;    ///< P_a .. P_{b-1}
};

at::Tensor flat_precond(const ParamMap& p, const std::vector<std::string>& order) {
  if (p.empty()) return {};
  std::vector<at::Tensor> flat;
  for (const auto& n : order) flat.push_back(p.at(n).reshape({-1}));
  return at::cat(flat);
}

Stretch replay_stretch(Replayer& replay, int64_t a, int64_t b) {
  Stretch s;
  s.a = a;
  s.b = b;
  const Optimizer& opt = replay.context().stepper->optimizer();
  s.weights.push_back(replay.weights_at(a));
  for (int64_t k = a; k < b; ++k) {
    s.weights.push_back(replay.weights_at(k + 1));
    s.precond.push_back(flat_precond(opt.preconditioner(), opt.names()));
  }
  return s;
}

/// w + t (w_next - w), in float64 (both converted first, so dw is exact).
NamedTensors along(const NamedTensors& w, const NamedTensors& w_next, double t) {
  NamedTensors out;
  for (size_t i = 0; i < w.size(); ++i) {
    const at::Tensor a = w[i].second.to(at::kDouble);
    out.emplace_back(w[i].first, a + (w_next[i].second.to(at::kDouble) - a) * t);
  }
  return out;
}

}  // namespace

OptimizerAttribution attribute_through_optimizer(const OptimizerAttributionConfig& c) {
  const auto t0 = Clock::now();
  Replayer replay(c.run);
  RunContext& ctx = replay.context();
  const LossKind loss = parse_loss(ctx.config.loss);
  if (c.end < 1 || c.end > replay.logged_steps()) throw InputError(c.run + ": no steps to attribute");
  auto model = models::build_model(models::parse_model_spec(ctx.config.model),
                                   {1, ctx.train.height(), ctx.train.width()}, ctx.num_classes);
  model->to(at::kDouble);
  const bool explicit_route = c.kernel_route == "explicit" || !factorizable(*model);
  const Dataset& split = c.split == "test" ? ctx.test : ctx.train;
  const at::Tensor xp = to_inputs(split.images.index_select(0, at::tensor(c.probe_indices, at::kLong)), at::kDouble,
                                  ctx.normalization);
  const Optimizer& opt = ctx.stepper->optimizer();
  int64_t n_params = 0;
  for (const auto& p : model->parameters()) n_params += p.numel();
  const int64_t rows = c.cols.numel(), n_train = ctx.train.size();
  const auto [nodes, node_weights] = gauss_legendre(std::max<int64_t>(c.exact_nodes, 1));

  OptimizerAttribution res;
  res.attr = at::zeros({rows, n_train}, at::kDouble);
  if (c.exact_nodes > 0) res.attr_exact = at::zeros_like(res.attr);
  if (c.self_influence) res.self_influence = at::zeros({n_train}, at::kDouble);
  res.times_drawn = at::zeros({n_train}, at::kLong);
  res.drawn_at.resize(static_cast<size_t>(n_train));
  at::Tensor phi = at::zeros({rows, n_params}, at::kDouble), phi_exact;
  if (c.exact_nodes > 0) phi_exact = at::zeros_like(phi);
  const at::Tensor ones = at::ones({n_params}, at::kDouble);

  std::vector<int64_t> starts;
  for (int64_t cp : replay.checkpoints()) {
    if (cp < c.end) starts.push_back(cp);
  }
  const auto& log = replay.step_log();
  int64_t done = 0;
  auto last_report = t0;
  for (auto it = starts.rbegin(); it != starts.rend(); ++it) {
    const int64_t a = *it, b = it == starts.rbegin() ? c.end : std::min(*(it - 1), c.end);
    const Stretch s = replay_stretch(replay, a, b);
    for (int64_t j = b - 1; j >= a; --j) {
      const size_t local = static_cast<size_t>(j - a);
      const auto& rec = log.at(static_cast<size_t>(j));
      const double lr = rec.at("lr").get<double>();
      const at::Tensor bidx = at::tensor(rec.at("batch").get<std::vector<int64_t>>(), at::kLong);
      const at::Tensor xb = to_inputs(ctx.train.images.index_select(0, bidx), at::kDouble, ctx.normalization);
      const at::Tensor yb = ctx.train.labels.index_select(0, bidx);
      const double nb = static_cast<double>(bidx.size(0));
      const LinearUpdate lu = opt.linear_update(j);
      const at::Tensor& p = s.precond[local];

      load_weights(*model, s.weights[local], "replayed weights");
      const RowGradients sb = loss_rows(*model, xb, yb, loss, explicit_route);
      // Phi_j = a_j alpha_j P_j (.) g(x; w_j) + beta Phi_{j+1};  Psi_j = s_j Phi_j + a_j nu P_j (.) g(x; w_j).
      auto accumulate = [&](at::Tensor& phi_acc, const at::Tensor& g, at::Tensor& target) {
        const at::Tensor term = p.defined() ? g * p : g;
        phi_acc.mul_(lu.beta).add_(term, lr * lu.alpha);
        at::Tensor psi = phi_acc * lu.s;
        if (lu.nu != 0) psi.add_(term, lr * lu.nu);
        target.index_add_(1, bidx, directions_dot_rows(*model, sb, psi).mul_(-1.0 / nb));
      };
      const at::Tensor g = row_jacobian(*model, probe_rows(*model, xp, c.cols, explicit_route));
      accumulate(phi, g, res.attr);
      if (c.exact_nodes > 0) {
        at::Tensor gbar = at::zeros_like(g);
        for (size_t q = 0; q < nodes.size(); ++q) {
          load_weights(*model, along(s.weights[local], s.weights[local + 1], nodes[q]), "quadrature node");
          gbar.add_(row_jacobian(*model, probe_rows(*model, xp, c.cols, explicit_route)), node_weights[q]);
        }
        accumulate(phi_exact, gbar, res.attr_exact);
      }
      if (c.self_influence) {
        // TracIn with the optimizer's preconditioner: a_j <grad l_i, P_j (.) grad l_i>.
        res.self_influence.index_add_(0, bidx, rows_weighted_sq(*model, sb, p.defined() ? p : ones) * lr);
      }
      res.times_drawn.index_add_(0, bidx, at::ones({bidx.size(0)}, at::kLong));
      const int64_t* bi = bidx.data_ptr<int64_t>();
      for (int64_t m = 0; m < bidx.size(0); ++m) res.drawn_at[static_cast<size_t>(bi[m])].push_back(j);

      ++done;
      const auto now = Clock::now();
      if (now - last_report > std::chrono::seconds(2) || done == c.end) {
        const double el = std::chrono::duration<double>(now - t0).count();
        spdlog::info("attributed through the optimizer: {}/{} steps (backwards)  {:.1f} steps/s", done, c.end,
                     static_cast<double>(done) / el);
        last_report = now;
      }
    }
  }
  for (auto& steps : res.drawn_at) std::reverse(steps.begin(), steps.end());
  return res;
}

}  // namespace pathkernel
