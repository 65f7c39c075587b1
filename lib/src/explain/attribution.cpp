#include "pathkernel/explain/attribution.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/analysis/projection.h"
#include "pathkernel/analysis/step_terms.h"
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
  /// The buffers (BatchNorm's running statistics) at steps a .. b-1, in float64; empty without
  /// any. Read during the forward replay: asked for on the way back, each would replay its
  /// stretch again from the checkpoint.
  std::vector<ParamMap> buffers;
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
  s.buffers.clear();
  if (!traj.buffers_at(a).empty()) s.buffers.push_back(to_double_map(traj.buffers_at(a)));
  s.first_before = at::Tensor();
  if (a > 0 && preconditioner_needs_before(traj.optimizer_after(a).options().kind)) {
    s.first_before = traj.optimizer_after(a).preconditioner_state().clone();
  }
  for (int64_t k = a; k < b; ++k) {
    flatten_into(traj.weights_at(k + 1), s.weights[k + 1 - a]);
    if (!s.buffers.empty() && k + 1 < b) s.buffers.push_back(to_double_map(traj.buffers_at(k + 1)));
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

/// The backward walk of the attribution through the optimizer (attribution.h): the run's steps
/// from the last to the first, a checkpoint stretch at a time, carrying Phi (and with exact nodes
/// Phi_exact) from step j + 1 to step j.
class BackwardAttribution {
 public:
  BackwardAttribution(const OptimizerAttributionConfig& c, Trajectory& traj);
  OptimizerAttribution run();

 private:
  /// Step j's factors on the probes' rows and the batch's: P_j, the parameters' rate scales.
  struct Factors {
    at::Tensor both;         ///< P_j (.) r_j (or either), on step j's update; undefined: ones
    at::Tensor probe_side;   ///< what multiplies the probes' gradients
    at::Tensor batch_side;   ///< RMSprop with momentum: P_j inside the buffer, on the batch's side
  };
  Factors factors(int64_t j, size_t local, const StepSettings& st, const LinearUpdate& lu);
  at::Tensor probe_gradients(at::Tensor& buf);
  /// Phi_end: zeros, or a later part's share handed in (carry_in), checked against the rows.
  at::Tensor carry_in(const at::Tensor& given, int64_t rows, int64_t cols, const char* what) const;
  bool carry_only() const { return c_.carry_in.defined(); }
  /// A carried share that is 0 from here back: a step whose optimizer keeps nothing (plain SGD,
  /// whatever its settings) lets no later Phi through.
  bool nothing_carried() const { return carry_only() && carry_ * beta_next_ == 0; }
  void attribute(int64_t j, size_t local);
  void report_progress(int64_t done);

  const OptimizerAttributionConfig& c_;
  Trajectory& traj_;
  LossKind loss_;
  std::shared_ptr<models::Model> model_;
  bool explicit_route_ = false;
  RowsWorkspace rows_workspace_;  ///< the explicit route's probe rows, kept between steps
  at::Tensor xp_;
  std::unique_ptr<Optimizer> coefficients_;  ///< the update's coefficients and P from a stored state
  int64_t n_params_ = 0;
  Projection projection_;
  std::vector<double> nodes_, node_weights_;
  /// The parameters' order in the flat rows, for a step's rate scales (parameter groups).
  std::vector<std::pair<std::string, int64_t>> flat_params_;
  OptimizerAttribution res_;
  at::Tensor phi_, phi_exact_, gbar_buf_, g_buf_, psi_, ones_, p_buf_, r_buf_;
  Stretch s_;
  double beta_next_ = 0;  ///< the buffer's decay at step j + 1 (Phi_{j+1} enters Phi_j with it)
  double carry_ = 1;      ///< the product of the decays applied so far: Phi_end's factor in Phi_j
  Clock::time_point t0_ = Clock::now(), last_report_ = t0_;
};

BackwardAttribution::BackwardAttribution(const OptimizerAttributionConfig& c, Trajectory& traj)
    : c_(c), traj_(traj), loss_(traj.loss()) {
  if (c.end < 1 || c.end > traj.logged_steps() || c.begin < 0 || c.begin >= c.end) {
    throw InputError(c.run + ": no steps to attribute");
  }
  traj.check_steps(0, c.end, 1, true);
  model_ = traj.make_model();
  model_->to(at::kDouble);
  explicit_route_ = c.kernel_route != "auto" && c.kernel_route != "factorized" ? true : !factorizable(*model_);
  xp_ = traj.inputs(c.split, at::tensor(c.probe_indices, at::kLong), at::kDouble);
  // The update's coefficients and P from a stored state depend only on the settings.
  coefficients_ = make_optimizer(traj.optimizer_after(0).options(), {}, {});
  for (const auto& p : model_->parameters()) n_params_ += p.numel();
  // With a projection, Phi, Psi and the probes' gradients live in its space (projection.h): the
  // recursion's coefficients are scalars, so it commutes with the sketch. An elementwise
  // preconditioner does not.
  if (c.project > 0) {
    if (explicit_route_) throw InputError("--project needs the factorized route (a zoo model's run)");
    if (traj.optimizer_after(0).options().kind != OptimizerKind::kSgd) {
      throw InputError("--project: Adam's and AdamW's elementwise preconditioner does not commute with a random "
                       "projection; explain this run without --project");
    }
    projection_ = make_projection(*model_, c.project, c.project_seed);
  }
  const int64_t n_cols = c.project > 0 ? projection_.dims : n_params_;
  const int64_t rows = c.cols.numel(), n_train = traj.split_size("train");
  std::tie(nodes_, node_weights_) = gauss_legendre(std::max<int64_t>(c.exact_nodes, 1));
  res_.project_dims = c.project > 0 ? projection_.dims : 0;
  res_.attr = at::zeros({rows, n_train}, at::kDouble);
  if (c.exact_nodes > 0) res_.attr_exact = at::zeros_like(res_.attr);
  if (c.self_influence) res_.self_influence = at::zeros({n_train}, at::kDouble);
  res_.times_drawn = at::zeros({n_train}, at::kLong);
  res_.drawn_at.resize(static_cast<size_t>(n_train));
  phi_ = carry_in(c.carry_in, rows, n_cols, "carry_in");
  if (!carry_only()) g_buf_ = at::empty_like(phi_);
  psi_ = at::empty_like(phi_);
  if (c.exact_nodes > 0) {
    phi_exact_ = carry_in(c.carry_in_exact, rows, n_cols, "carry_in_exact");
    if (!carry_only()) gbar_buf_ = at::empty_like(phi_);
  }
  // Phi_end enters step end-1 with the buffer's decay at step end (the whole run's end: nothing enters).
  if (c.end < traj.logged_steps()) {
    beta_next_ = linear_update(traj.logged_step(c.end, at::kDouble).settings.options, c.end).beta;
  }
  ones_ = at::ones({n_params_}, at::kDouble);
  for (const auto& p : model_->named_parameters()) flat_params_.emplace_back(p.key(), p.value().numel());
}

at::Tensor BackwardAttribution::carry_in(const at::Tensor& given, int64_t rows, int64_t cols, const char* what) const {
  if (!given.defined()) {
    if (carry_only()) throw InputError(c_.run + ": " + what + " is missing (the exact share needs it too)");
    return at::zeros({rows, cols}, at::kDouble);
  }
  if (given.dim() != 2 || given.size(0) != rows || given.size(1) != cols || given.scalar_type() != at::kDouble) {
    throw InputError(c_.run + ": " + what + " must be float64 [" + std::to_string(rows) + ", " + std::to_string(cols) +
                     "] (the probes' rows by the parameters)");
  }
  return given.contiguous().clone();
}

/// The probes' gradients as the recursion's rows: projected, or materialized in full.
at::Tensor BackwardAttribution::probe_gradients(at::Tensor& buf) {
  // The explicit route forms its rows in the workspace's buffer: make that buffer `buf`, so that
  // they land where the recursion reads them (one pass over [rows, n_params] a step saved: 396 MB
  // for the residual CNN at 64 probes x 10 outputs); row_jacobian then has nothing to copy.
  if (explicit_route_ && c_.project == 0 && buf.is_contiguous()) rows_workspace_.buffer = buf.view({-1});
  const RowGradients rows = probe_rows(*model_, xp_, c_.cols, explicit_route_, nullptr, &rows_workspace_);
  if (c_.project > 0) return buf.copy_(project_rows(projection_, rows));
  return row_jacobian(*model_, rows, buf);
}

BackwardAttribution::Factors BackwardAttribution::factors(int64_t j, size_t local, const StepSettings& st,
                                                          const LinearUpdate& lu) {
  at::Tensor p, r;  // P_j; the parameters' rate scales (parameter groups)
  if (s_.pstate.defined()) {
    const std::unique_ptr<Optimizer> at_j = traj_.settings_vary() ? make_optimizer(st.options, {}, {}) : nullptr;
    const at::Tensor before = local == 0 ? s_.first_before : s_.pstate[static_cast<int64_t>(local) - 1];
    (at_j ? *at_j : *coefficients_).preconditioner_from(s_.pstate[static_cast<int64_t>(local)], j + 1, p_buf_, before);
    p = p_buf_;
  }
  if (!st.rate_scale.empty()) {
    if (c_.project > 0) {
      throw InputError("--project: parameter groups with their own learning rates scale the update parameter by "
                       "parameter, which does not commute with a random projection; explain this run without --project");
    }
    if (!r_buf_.defined()) r_buf_ = at::empty({n_params_}, at::kDouble);
    int64_t off = 0;
    for (const auto& [name, numel] : flat_params_) {
      r_buf_.narrow(0, off, numel).fill_(st.rate_of(name));
      off += numel;
    }
    r = r_buf_;
  }
  // r multiplies step j's update; P_j the probe side too, or (inside the buffer, RMSprop with
  // momentum) the batch's gradient of step j as it enters the buffer.
  Factors f;
  f.both = p.defined() && r.defined() ? p * r : p.defined() ? p : r;
  f.probe_side = lu.inner ? r : f.both;
  f.batch_side = lu.inner ? p : at::Tensor();
  return f;
}

void BackwardAttribution::attribute(int64_t j, size_t local) {
  const LoggedStep batch = traj_.logged_step(j, at::kDouble);
  const double lr = batch.lr;
  const at::Tensor& bidx = batch.indices;
  const double nb = static_cast<double>(bidx.size(0));
  // The step's own settings (a recorded scheduler's momentum or betas, groups' rates).
  const LinearUpdate lu = linear_update(batch.settings.options, j);
  const Factors fa = factors(j, local, batch.settings, lu);
  const at::Tensor w = s_.weights[static_cast<int64_t>(local)].to(at::kDouble);
  set_flat(*model_, w);
  if (!s_.buffers.empty()) set_buffers(*model_, s_.buffers[local]);  // the probes at step j's running statistics
  const RowGradients sb = [&] {
    const models::TrainingForward batch_forward(*model_, batch.context);  // batch-context rows (masks, batch statistics)
    return loss_rows(*model_, batch.x, batch.y, loss_, explicit_route_);
  }();
  const at::Tensor zb = c_.project > 0 ? project_rows(projection_, sb) : at::Tensor();
  // Phi_j = a_j alpha_j P_j (.) g(x; w_j) + beta Phi_{j+1};  Psi_j = s_j Phi_j + a_j nu P_j (.) g(x; w_j).
  // In place on workspace tensors of [rows, n_params]: fresh ones every step would grow the heap.
  auto dot_batch = [&](const at::Tensor& dirs, double scale, at::Tensor& target) {
    target.index_add_(1, bidx,
                      (c_.project > 0 ? at::mm(dirs, zb.t()) : directions_dot_rows(*model_, sb, dirs))
                          .mul_(-batch.grad_scale * scale / nb));  // the applied gradient: clipping's scale
  };
  // Each pass over [rows, n_params] costs about as much as the products: the scalars go onto the
  // products, P_j onto the gradient as it is added (addcmul), and Psi_j = s_j Phi_j is not formed.
  auto accumulate = [&](at::Tensor& phi_acc, at::Tensor& g, at::Tensor& target) {
    phi_acc.mul_(beta_next_);
    if (!fa.probe_side.defined()) {
      phi_acc.add_(g, lr * lu.alpha);
    } else if (lu.nu == 0) {
      phi_acc.addcmul_(g, fa.probe_side, lr * lu.alpha);
    } else {
      g.mul_(fa.probe_side);  // Nesterov's term below takes P_j (.) g too
      phi_acc.add_(g, lr * lu.alpha);
    }
    if (lu.nu == 0 && !fa.batch_side.defined()) return dot_batch(phi_acc, lu.s, target);
    at::mul_out(psi_, phi_acc, lu.s);
    if (lu.nu != 0) psi_.add_(g, lr * lu.nu);
    if (fa.batch_side.defined()) psi_.mul_(fa.batch_side);
    dot_batch(psi_, 1.0, target);
  };
  carry_ *= beta_next_;
  if (carry_only()) {
    // Step j has no gradient of its own here: Phi_j = carry_ Phi_end, Psi_j = s_j Phi_j; Phi_end
    // is kept as it came and the scalars go onto the products.
    auto carried = [&](const at::Tensor& phi_end, at::Tensor& target) {
      if (!fa.batch_side.defined()) return dot_batch(phi_end, carry_ * lu.s, target);
      at::mul_out(psi_, phi_end, fa.batch_side);
      dot_batch(psi_, carry_ * lu.s, target);
    };
    carried(phi_, res_.attr);
    if (c_.exact_nodes > 0) carried(phi_exact_, res_.attr_exact);
    beta_next_ = lu.beta;
    return;
  }
  probe_gradients(g_buf_);
  accumulate(phi_, g_buf_, res_.attr);
  if (c_.exact_nodes > 0) {
    gbar_buf_.zero_();
    const at::Tensor dw = s_.weights[static_cast<int64_t>(local) + 1].to(at::kDouble) - w;  // exact in float64
    for (size_t q = 0; q < nodes_.size(); ++q) {
      set_flat(*model_, w + dw * nodes_[q]);
      gbar_buf_.add_(probe_gradients(g_buf_), node_weights_[q]);
    }
    accumulate(phi_exact_, gbar_buf_, res_.attr_exact);
  }
  if (c_.self_influence) {
    // TracIn with the optimizer's preconditioner: (a_j / |B_j|) <grad l_i, P_j (.) grad l_i>.
    res_.self_influence.index_add_(
        0, bidx,
        rows_weighted_sq(*model_, sb, fa.both.defined() ? fa.both : ones_) * (lr * batch.grad_scale / static_cast<double>(bidx.size(0))));
  }
  beta_next_ = lu.beta;
  res_.times_drawn.index_add_(0, bidx, at::ones({bidx.size(0)}, at::kLong));
  const int64_t* bi = bidx.data_ptr<int64_t>();
  for (int64_t m = 0; m < bidx.size(0); ++m) res_.drawn_at[static_cast<size_t>(bi[m])].push_back(j);
}

void BackwardAttribution::report_progress(int64_t done) {
  const auto now = Clock::now();
  const int64_t total = c_.end - c_.begin;
  if (now - last_report_ > std::chrono::seconds(2) || done == total) {
    const double el = std::chrono::duration<double>(now - t0_).count();
    spdlog::info("attributed through the optimizer{}: {}/{} steps (backwards)  {:.1f} steps/s",
                 carry_only() ? " (the later steps' share)" : "", done, total, static_cast<double>(done) / el);
    last_report_ = now;
  }
}

OptimizerAttribution BackwardAttribution::run() {
  std::vector<int64_t> starts;
  for (int64_t cp : traj_.checkpoints()) {
    if (cp < c_.end) starts.push_back(cp);
  }
  int64_t max_len = 0;
  for (size_t i = 0; i < starts.size(); ++i) {
    max_len = std::max(max_len, (i + 1 < starts.size() ? starts[i + 1] : c_.end) - starts[i]);
  }
  int64_t done = 0;
  for (auto it = starts.rbegin(); it != starts.rend(); ++it) {
    const int64_t a = *it, b = it == starts.rbegin() ? c_.end : std::min(*(it - 1), c_.end);
    if (b <= c_.begin || nothing_carried()) break;
    replay_stretch(traj_, a, b, max_len, s_);
    for (int64_t j = b - 1; j >= std::max(a, c_.begin) && !nothing_carried(); --j) {
      attribute(j, static_cast<size_t>(j - a));
      report_progress(++done);
    }
  }
  for (auto& steps : res_.drawn_at) std::reverse(steps.begin(), steps.end());
  res_.carry = carry_;
  if (c_.begin > 0 && !carry_only()) {
    res_.phi_begin = phi_;
    res_.phi_exact_begin = phi_exact_;
  }
  return std::move(res_);
}

}  // namespace

OptimizerAttribution attribute_through_optimizer(const OptimizerAttributionConfig& c) {
  const std::unique_ptr<Trajectory> opened =
      c.trajectory ? nullptr : open_trajectory(c.run, c.kernel_route == "torchscript");
  Trajectory& traj = c.trajectory ? *c.trajectory : *opened;
  return BackwardAttribution(c, traj).run();
}

}  // namespace pathkernel
