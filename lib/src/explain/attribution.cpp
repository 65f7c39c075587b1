#include "pathkernel/explain/attribution.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/analysis/projection.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {
namespace {

using Clock = std::chrono::steady_clock;

/// One checkpoint stretch [a, b], replayed forwards: the weights of every step and the state
/// that determines the preconditioner after every step (Optimizer::preconditioner_state),
/// flattened in state_dict order. The buffers are allocated once for the longest stretch and
/// reused: fresh ones per stretch would be page-faulted in again each time.
struct Stretch {
  int64_t a = 0, b = 0;
  at::Tensor first_before;  ///< the state after step a (Adadelta's P_a needs it); undefined at 0
  at::Tensor weights;  ///< [>= b - a + 1, n_params]: rows 0.. hold w_a .. w_b, in the run's dtype
  at::Tensor pstate;   ///< [>= b - a, n_params]: rows 0.. hold the state after steps a .. b-1
};

void flatten_into(const NamedTensors& w, at::Tensor row) {
  int64_t off = 0;
  for (const auto& [name, t] : w) {
    row.narrow(0, off, t.numel()).copy_(t.reshape({-1}));
    off += t.numel();
  }
}

void replay_stretch(Trajectory& traj, int64_t a, int64_t b, int64_t max_len, Stretch& s) {
  s.a = a;
  s.b = b;
  const NamedTensors first = traj.weights_at(a);
  const int64_t n = s.weights.defined() ? s.weights.size(1) : 0;
  if (!s.weights.defined()) {
    int64_t numel = 0;
    for (const auto& [name, t] : first) numel += t.numel();
    s.weights = at::empty({max_len + 1, numel}, first.front().second.options());
  }
  (void)n;
  flatten_into(first, s.weights[0]);
  s.first_before = at::Tensor();
  if (a > 0 && preconditioner_needs_before(traj.optimizer_after(a).options().kind)) {
    s.first_before = traj.optimizer_after(a).preconditioner_state().clone();
  }
  for (int64_t k = a; k < b; ++k) {
    flatten_into(traj.weights_at(k + 1), s.weights[k + 1 - a]);
    const at::Tensor ps = traj.optimizer_after(k + 1).preconditioner_state();
    if (!ps.defined()) continue;
    if (!s.pstate.defined()) s.pstate = at::empty({max_len, ps.numel()}, ps.options());
    s.pstate[k - a].copy_(ps);
  }
}

/// Copies a flat row (state_dict order) into the model's parameters.
void set_flat(models::Model& model, const at::Tensor& row) {
  at::NoGradGuard ng;
  int64_t off = 0;
  for (auto& p : model.parameters()) {
    p.copy_(row.narrow(0, off, p.numel()).view(p.sizes()));
    off += p.numel();
  }
}

}  // namespace

OptimizerAttribution attribute_through_optimizer(const OptimizerAttributionConfig& c) {
  const auto t0 = Clock::now();
  const std::unique_ptr<Trajectory> opened =
      c.trajectory ? nullptr : open_trajectory(c.run, c.kernel_route == "torchscript");
  Trajectory& traj = c.trajectory ? *c.trajectory : *opened;
  const LossKind loss = traj.loss();
  if (c.end < 1 || c.end > traj.logged_steps()) throw InputError(c.run + ": no steps to attribute");
  traj.check_steps(0, c.end, 1, true);
  auto model = traj.make_model();
  model->to(at::kDouble);
  const bool explicit_route = c.kernel_route != "auto" && c.kernel_route != "factorized" ? true : !factorizable(*model);
  const at::Tensor xp = traj.inputs(c.split, at::tensor(c.probe_indices, at::kLong), at::kDouble);
  // The update's coefficients and P from a stored state depend only on the settings.
  const std::unique_ptr<Optimizer> coefficients = make_optimizer(traj.optimizer_after(0).options(), {}, {});
  const Optimizer& opt = *coefficients;
  int64_t n_params = 0;
  for (const auto& p : model->parameters()) n_params += p.numel();
  // With a projection, Phi, Psi and the probes' gradients live in its space (projection.h): the
  // recursion's coefficients are scalars, so it commutes with the sketch. An elementwise
  // preconditioner does not.
  Projection projection;
  if (c.project > 0) {
    if (explicit_route) throw InputError("--project needs the factorized route (a zoo model's run)");
    if (traj.optimizer_after(0).options().kind != OptimizerKind::kSgd) {
      throw InputError("--project: Adam's and AdamW's elementwise preconditioner does not commute with a random "
                       "projection; explain this run without --project");
    }
    projection = make_projection(*model, c.project, c.project_seed);
  }
  const int64_t n_cols = c.project > 0 ? projection.dims : n_params;
  // The probes' gradients as the recursion's rows: projected, or materialized in full.
  auto probe_gradients = [&](at::Tensor& buf) -> at::Tensor {
    const RowGradients rows = probe_rows(*model, xp, c.cols, explicit_route);
    if (c.project > 0) return buf.copy_(project_rows(projection, rows));
    return row_jacobian(*model, rows, buf);
  };
  const int64_t rows = c.cols.numel(), n_train = traj.split_size("train");
  const auto [nodes, node_weights] = gauss_legendre(std::max<int64_t>(c.exact_nodes, 1));

  OptimizerAttribution res;
  res.project_dims = c.project > 0 ? projection.dims : 0;
  res.attr = at::zeros({rows, n_train}, at::kDouble);
  if (c.exact_nodes > 0) res.attr_exact = at::zeros_like(res.attr);
  if (c.self_influence) res.self_influence = at::zeros({n_train}, at::kDouble);
  res.times_drawn = at::zeros({n_train}, at::kLong);
  res.drawn_at.resize(static_cast<size_t>(n_train));
  at::Tensor phi = at::zeros({rows, n_cols}, at::kDouble), phi_exact, gbar_buf;
  at::Tensor g_buf = at::empty_like(phi), psi = at::empty_like(phi);
  if (c.exact_nodes > 0) {
    phi_exact = at::zeros_like(phi);
    gbar_buf = at::empty_like(phi);
  }
  const at::Tensor ones = at::ones({n_params}, at::kDouble);

  std::vector<int64_t> starts;
  for (int64_t cp : traj.checkpoints()) {
    if (cp < c.end) starts.push_back(cp);
  }
  int64_t max_len = 0;
  for (size_t i = 0; i < starts.size(); ++i) {
    max_len = std::max(max_len, (i + 1 < starts.size() ? starts[i + 1] : c.end) - starts[i]);
  }
  Stretch s;
  at::Tensor p_buf, r_buf;
  // The parameters' order in the flat rows, for a step's rate scales (parameter groups).
  std::vector<std::pair<std::string, int64_t>> flat_params;
  for (const auto& p : model->named_parameters()) flat_params.emplace_back(p.key(), p.value().numel());
  double beta_next = 0;  // the buffer's decay at step j + 1 (Phi_{j+1} enters Phi_j with it)
  int64_t done = 0;
  auto last_report = t0;
  for (auto it = starts.rbegin(); it != starts.rend(); ++it) {
    const int64_t a = *it, b = it == starts.rbegin() ? c.end : std::min(*(it - 1), c.end);
    replay_stretch(traj, a, b, max_len, s);
    for (int64_t j = b - 1; j >= a; --j) {
      const size_t local = static_cast<size_t>(j - a);
      const LoggedStep batch = traj.logged_step(j, at::kDouble);
      const double lr = batch.lr;
      const at::Tensor& bidx = batch.indices;
      const at::Tensor& xb = batch.x;
      const at::Tensor& yb = batch.y;
      const double nb = static_cast<double>(bidx.size(0));
      // The step's own settings (a recorded scheduler's momentum or betas, groups' rates).
      const StepSettings& st = batch.settings;
      const LinearUpdate lu = linear_update(st.options, j);
      at::Tensor p, r;  // P_j; the parameters' rate scales (parameter groups)
      if (s.pstate.defined()) {
        const std::unique_ptr<Optimizer> at_j = traj.settings_vary() ? make_optimizer(st.options, {}, {}) : nullptr;
        const at::Tensor before = local == 0 ? s.first_before : s.pstate[static_cast<int64_t>(local) - 1];
        (at_j ? *at_j : opt).preconditioner_from(s.pstate[static_cast<int64_t>(local)], j + 1, p_buf, before);  // P_j
        p = p_buf;
      }
      if (!st.rate_scale.empty()) {
        if (c.project > 0) {
          throw InputError("--project: parameter groups with their own learning rates scale the update parameter by "
                           "parameter, which does not commute with a random projection; explain this run without --project");
        }
        if (!r_buf.defined()) r_buf = at::empty({n_params}, at::kDouble);
        int64_t off = 0;
        for (const auto& [name, numel] : flat_params) {
          r_buf.narrow(0, off, numel).fill_(st.rate_of(name));
          off += numel;
        }
        r = r_buf;
      }
      // r multiplies step j's update; P_j the probe side too, or (inside the buffer, RMSprop with
      // momentum) the batch's gradient of step j as it enters the buffer.
      const at::Tensor both = p.defined() && r.defined() ? p * r : p.defined() ? p : r;
      const at::Tensor probe_side = lu.inner ? r : both, batch_side = lu.inner ? p : at::Tensor();
      const at::Tensor w = s.weights[static_cast<int64_t>(local)].to(at::kDouble);
      set_flat(*model, w);
      const RowGradients sb = loss_rows(*model, xb, yb, loss, explicit_route);
      const at::Tensor zb = c.project > 0 ? project_rows(projection, sb) : at::Tensor();
      // Phi_j = a_j alpha_j P_j (.) g(x; w_j) + beta Phi_{j+1};  Psi_j = s_j Phi_j + a_j nu P_j (.) g(x; w_j).
      // In place on workspace tensors of [rows, n_params]: fresh ones every step would grow the heap.
      auto accumulate = [&](at::Tensor& phi_acc, at::Tensor& g, at::Tensor& target) {
        if (probe_side.defined()) g.mul_(probe_side);
        phi_acc.mul_(beta_next).add_(g, lr * lu.alpha);
        at::mul_out(psi, phi_acc, lu.s);
        if (lu.nu != 0) psi.add_(g, lr * lu.nu);
        if (batch_side.defined()) psi.mul_(batch_side);
        target.index_add_(1, bidx,
                          (c.project > 0 ? at::mm(psi, zb.t()) : directions_dot_rows(*model, sb, psi))
                              .mul_(-batch.grad_scale / nb));  // the applied gradient: clipping's scale
      };
      probe_gradients(g_buf);
      accumulate(phi, g_buf, res.attr);
      if (c.exact_nodes > 0) {
        gbar_buf.zero_();
        const at::Tensor dw = s.weights[static_cast<int64_t>(local) + 1].to(at::kDouble) - w;  // exact in float64
        for (size_t q = 0; q < nodes.size(); ++q) {
          set_flat(*model, w + dw * nodes[q]);
          gbar_buf.add_(probe_gradients(g_buf), node_weights[q]);
        }
        accumulate(phi_exact, gbar_buf, res.attr_exact);
      }
      if (c.self_influence) {
        // TracIn with the optimizer's preconditioner: (a_j / |B_j|) <grad l_i, P_j (.) grad l_i>.
        res.self_influence.index_add_(
            0, bidx,
            rows_weighted_sq(*model, sb, both.defined() ? both : ones) * (lr * batch.grad_scale / static_cast<double>(bidx.size(0))));
      }
      beta_next = lu.beta;
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
