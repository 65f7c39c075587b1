// The standard step terms of the analysis (step_terms.h), one class per family of quantities.
#include "pathkernel/analysis/step_terms.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "pathkernel/analysis/exact_kernel.h"
#include "pathkernel/analysis/sharpness.h"
#include "pathkernel/analysis/update_terms.h"
#include "pathkernel/io/errors.h"

namespace pathkernel {
namespace {

double frob(const at::Tensor& t) { return t.norm().item<double>(); }

/// cos(a, b) over every parameter.
double gradient_cosine(const ParamMap& a, const ParamMap& b) {
  double ab = 0, aa = 0, bb = 0;
  for (const auto& [name, t] : a) {
    ab += (t * b.at(name)).sum().item<double>();
    aa += t.pow(2).sum().item<double>();
    bb += b.at(name).pow(2).sum().item<double>();
  }
  return ab / std::sqrt(aa * bb);
}

/// The stored momentum buffer b_{k-1} as float64 (the SPEC's U_mom); empty without one.
ParamMap momentum_buffer_of(const Optimizer& opt) {
  for (const auto& [slot, tensors] : opt.state()) {
    if (slot == "momentum_buffer") return to_double_map(tensors);
  }
  return {};
}

/// The step's signals: batch losses before and after, |grad L_k|, |dw|, the cosine with the
/// previous step's gradient, and a recorded run's verification marks.
class SignalsTerm final : public StepTerm {
 public:
  void walk(StepContext& ctx) override {
    prev_grad_ = ctx.grad_l;
    prev_step_ = ctx.k;
  }
  void compute(StepContext& ctx, StepRow& row, StepArrays& /*arrays*/) override {
    const int64_t k = ctx.k;
    double cos = NAN;
    if (k > 0) {
      if (prev_step_ != k - 1) {  // the first step of a range, or every > 1: step k-1's own
        const LoggedStep before = ctx.traj.logged_step(k - 1, at::kDouble);
        set_weights(ctx.model, to_double_map(ctx.traj.weights_at(k - 1)));
        set_buffers(ctx.model, to_double_map(ctx.traj.buffers_at(k - 1)));
        {
          const models::TrainingForward batch_forward(ctx.model, before.context);
          prev_grad_ = batch_gradient(ctx.model, before.x, before.y, ctx.loss);
        }
        set_weights(ctx.model, ctx.w0);
        set_buffers(ctx.model, ctx.b0);
      }
      cos = gradient_cosine(ctx.grad_l, prev_grad_);
    }
    walk(ctx);
    row.loss_before = ctx.loss_before;
    row.loss_after = ctx.loss_after;
    row.loss_up = ctx.loss_after > ctx.loss_before;
    row.grad_cos = cos;
    if (ctx.verdicts) mark_verified(row, *ctx.verdicts);
    row.grad_norm = ctx.traj.logged_grad_norm(k);
    if (std::isnan(row.grad_norm)) {  // not logged (a recorded run): the float64 gradient's norm
      double sq = 0;
      for (const auto& [name, g] : ctx.grad_l) sq += g.pow(2).sum().item<double>();
      row.grad_norm = std::sqrt(sq);
    }
    double dw_sq = 0;
    for (const auto& [name, t] : ctx.dw) dw_sq += t.pow(2).sum().item<double>();
    row.update_norm = std::sqrt(dw_sq);
  }

 private:
  ParamMap prev_grad_;
  int64_t prev_step_ = -2;
};

/// First order (SPEC): D, F = J dw, K = -a_k J grad L_k (the applied gradient), U = F - K with
/// its SGD sources U_wd, U_mom, U_round, R = D - F; the per-example split's check.
class FirstOrderTerm final : public StepTerm {
 public:
  void load(StepContext& ctx) override {
    v_prev_ = ctx.sgd_sources ? momentum_buffer_of(ctx.traj.optimizer_after(ctx.k)) : ParamMap{};
  }
  void prepare(StepContext& ctx) override {
    with_wd_ = ctx.options.weight_decay != 0;
    with_mom_ = ctx.options.momentum != 0 && !v_prev_.empty();
    ctx.need(ctx.dw);
    ctx.need(ctx.applied);
    if (with_wd_) ctx.need(ctx.w0);
    if (with_mom_) ctx.need(v_prev_);
  }
  void compute(StepContext& ctx, StepRow& row, StepArrays& arrays) override {
    const auto& c = ctx.config;
    const int64_t np = ctx.np, nc = ctx.nc;
    ctx.k_direct = ctx.product(ctx.applied) * (-ctx.lr);
    // K itself is exact: a projected split only estimates its per-example parts.
    const at::Tensor kk = ctx.jvp_route || c.project > 0 ? ctx.k_direct : ctx.k_per.sum(1).reshape({np, nc});
    ctx.f = ctx.product(ctx.dw);
    at::Tensor u_wd = at::zeros_like(ctx.f), u_mom = at::zeros_like(ctx.f);
    if (with_wd_) u_wd = ctx.product(ctx.w0) * (-ctx.lr * ctx.options.weight_decay);
    if (with_mom_) u_mom = ctx.product(v_prev_) * (-ctx.lr * ctx.options.momentum);
    if (ctx.split) check_split(ctx);
    const at::Tensor& f = ctx.f;
    // The running statistics' change is a part of U, outside F: U = F - K + U_stats, R = D - F - U_stats.
    const bool stats = ctx.u_stats.defined();
    const at::Tensor u = stats ? f - kk + ctx.u_stats : f - kk;
    ctx.r = stats ? ctx.d - f - ctx.u_stats : ctx.d - f;
    row.d_norm = frob(ctx.d);
    row.f_norm = frob(f);
    row.k_norm = frob(kk);
    row.u_norm = frob(u);
    row.u_wd_norm = ctx.sgd_sources ? frob(u_wd) : NAN;
    row.u_mom_norm = ctx.sgd_sources ? frob(u_mom) : NAN;
    row.u_round_norm = ctx.sgd_sources ? frob(stats ? u - u_wd - u_mom - ctx.u_stats : u - u_wd - u_mom) : NAN;
    if (stats) {
      row.extra.emplace_back("U_stats_norm", frob(ctx.u_stats));
      arrays.u_stats.push_back(ctx.u_stats);
    }
    row.r_norm = frob(ctx.r);
    row.r = row.f_norm > 0 ? row.r_norm / row.f_norm : 0.0;
    arrays.d.push_back(ctx.d);
    arrays.f.push_back(f);
    arrays.k.push_back(kk);
    arrays.u.push_back(u);
    arrays.r.push_back(ctx.r);
  }

 private:
  /// The split summed over the batch against the direct K: two independent routes (exit 4
  /// beyond tolerance), or, through a projection, the projection's error.
  static void check_split(StepContext& ctx) {
    const double scale = std::max(1e-300, ctx.k_direct.abs().max().item<double>());
    // The split may cover only the first probes (a check on the explicit route): compared there,
    // against the scale of the whole K.
    const int64_t sp = ctx.split_probes;
    const double e =
        (ctx.k_per.sum(1).reshape({sp, ctx.nc}) - ctx.k_direct.slice(0, 0, sp)).abs().max().item<double>() / scale;
    if (ctx.config.project > 0) {
      ctx.result.projection_error = std::max(ctx.result.projection_error, e);
    } else {
      ctx.result.kernel_split_error = std::max(ctx.result.kernel_split_error, e);
      ctx.seg_split_error = std::max(ctx.seg_split_error, e);
    }
    ++ctx.result.kernel_split_checked;
    ++ctx.seg_checked;
  }
  ParamMap v_prev_;
  bool with_wd_ = false, with_mom_ = false;
};

/// The optimizer's terms (SPEC, "Optimizers with memory or a preconditioner"): Kopt_k =
/// -a_k J (kernel direction), Uopt_wd = -a_k J (decay direction), Uopt_round = F - Kopt - Uopt_wd,
/// through the recurrence over every step from 0 with each step's settings.
class OptimizerTerm final : public StepTerm {
 public:
  void walk(StepContext& ctx) override {
    // P_k only where it enters the buffer (RMSprop with momentum).
    const bool inner = linear_update(ctx.batch.settings.options, ctx.k).inner;
    recurrence_.advance(ctx.k, ctx.applied, ctx.w0, ctx.batch.settings, inner ? preconditioner(ctx) : ParamMap{});
    if (!inner && preconditioner_needs_before(ctx.options.kind)) keep_state_after(ctx);
  }
  void prepare(StepContext& ctx) override {
    const ParamMap precond = preconditioner(ctx);  // P_k, after step k
    recurrence_.advance(ctx.k, ctx.applied, ctx.w0, ctx.batch.settings, precond);
    kernel_dir_ = recurrence_.kernel_direction(precond);
    decay_dir_ = recurrence_.has_decay() ? recurrence_.decay_direction(precond) : ParamMap{};
    if (ctx.result.uses_kopt) ctx.need(kernel_dir_);
    if (recurrence_.has_decay()) ctx.need(decay_dir_);
    ctx.kernel_dir = ctx.result.uses_kopt ? &kernel_dir_ : nullptr;
  }
  void compute(StepContext& ctx, StepRow& row, StepArrays& arrays) override {
    const at::Tensor kopt = ctx.result.uses_kopt ? ctx.product(kernel_dir_) * (-ctx.lr) : ctx.k_direct;
    const at::Tensor uopt_wd = recurrence_.has_decay() ? ctx.product(decay_dir_) * (-ctx.lr) : at::zeros_like(kopt);
    const at::Tensor uopt_round = ctx.f - kopt - uopt_wd;
    row.kopt_norm = frob(kopt);
    row.uopt_wd_norm = frob(uopt_wd);
    row.uopt_round_norm = frob(uopt_round);
    arrays.kopt.push_back(kopt);
    arrays.uopt_wd.push_back(uopt_wd);
    arrays.uopt_round.push_back(uopt_round);
  }

 private:
  /// P_k (step_preconditioner), with the state before step k taken from the previous step's
  /// state after it when this term saw it: asking the trajectory for it again, once it stands at
  /// w_{k+1}, would replay a run from its checkpoint every step (Adadelta).
  ParamMap preconditioner(StepContext& ctx) {
    if (!preconditioner_needs_before(ctx.options.kind)) return ctx.traj.optimizer_after(ctx.k + 1).preconditioner({});
    at::Tensor before;
    if (ctx.k > 0) {
      before = state_k_ == ctx.k ? state_ : ctx.traj.optimizer_after(ctx.k).preconditioner_state();
      if (before.defined() && state_k_ != ctx.k) before = before.clone();  // the next call reuses the optimizer
    }
    ParamMap p = ctx.traj.optimizer_after(ctx.k + 1).preconditioner(before);
    keep_state_after(ctx);
    return p;
  }
  void keep_state_after(StepContext& ctx) {
    const at::Tensor s = ctx.traj.optimizer_after(ctx.k + 1).preconditioner_state();
    state_ = s.defined() ? s.clone() : s;
    state_k_ = ctx.k + 1;
  }

  UpdateRecurrence recurrence_;
  ParamMap kernel_dir_, decay_dir_;
  at::Tensor state_;     ///< the preconditioner's state after step state_k_ - 1 (before step state_k_)
  int64_t state_k_ = -1;
};

/// --kinks: each probe's and batch example's kinks along the step, walked row by row (kinks.h).
class KinkTerm final : public StepTerm {
 public:
  void compute(StepContext& ctx, StepRow& row, StepArrays& /*arrays*/) override {
    const auto& c = ctx.config;
    try {
      ctx.kinks = walk_step(ctx.model, ctx.w0, ctx.dw, ctx.xp, ctx.batch.x, c.kinks_examples, c.kinks_max);
    } catch (const std::invalid_argument& e) {
      throw InputError(std::string("--kinks: ") + e.what());
    }
    row.kinks_probes = ctx.kinks.probe_kinks;
    row.kinks_batch = ctx.kinks.batch_kinks;
    row.kink_pieces = ctx.kinks.probe_pieces;
  }
};

/// --exact Q: gbar = integral_0^1 g(w_k + t dw) dt by quadrature (SPEC, "exact path kernel"):
/// Kexact, Uexact (and Koptexact, Uoptexact with the optimizer's kernel), the quadrature error.
class ExactTerm final : public StepTerm {
 public:
  explicit ExactTerm(const AnalyzeConfig& c) {
    std::tie(nodes_, weights_) = gauss_legendre(std::max<int64_t>(c.exact_nodes, 1));
  }
  void start(StepContext& ctx) override {
    // Nodes per piece with --kinks: enough for the frozen network's polynomial gradients.
    piece_nodes_ = ctx.config.kink_split ? std::max(ctx.config.exact_nodes, nodes_needed(ctx.model)) : ctx.config.exact_nodes;
  }
  void compute(StepContext& ctx, StepRow& row, StepArrays& arrays) override {
    const auto& c = ctx.config;
    const int64_t np = ctx.np, nc = ctx.nc;
    ExactStepInputs in;
    in.model = &ctx.model;
    in.xp = &ctx.xp;
    in.cols = &ctx.cols;
    in.w0 = &ctx.w0;
    in.dw = &ctx.dw;
    in.grad_l = &ctx.applied;
    in.kernel_dir = ctx.kernel_dir;
    in.split = !ctx.jvp_route || static_cast<bool>(c.on_step);  // else J v at the nodes
    in.jvp_mode = ctx.jvp_mode;
    in.explicit_route = ctx.explicit_route;
    in.rows_workspace = &rows_;
    in.batch_rows = &ctx.sb;
    in.projection = c.project > 0 ? &ctx.projection : nullptr;
    in.batch_sketch = &ctx.zb;
    in.lr = ctx.lr * ctx.gs;  // the per-example terms of the applied gradient
    in.batch_size = static_cast<int64_t>(ctx.nb);
    in.per_row = ctx.kinks.walked;
    in.rounds = in.per_row ? row_node_rounds(ctx.kinks.probes, piece_nodes_) : shared_node_rounds(nodes_, weights_, np);
    const ExactStepSums sums = integrate_exact_step(in);
    if (ctx.kernel_dir) {
      // Kopt with gbar in place of g (SPEC): the rest of gbar . dw is decay and rounding.
      const at::Tensor koex = sums.gbar_kdir.reshape({np, nc}) * (-ctx.lr);
      arrays.koptexact.push_back(koex);
      arrays.uoptexact.push_back(sums.gbar_dw.reshape({np, nc}) - koex);
    }
    if (in.split) ctx.kex_per = sums.kex_per;
    const at::Tensor kex = in.split && c.project == 0 ? sums.kex_per.sum(1).reshape({np, nc})
                                                      : sums.gbar_grad.reshape({np, nc}) * (-ctx.lr);
    const at::Tensor fex = sums.gbar_dw.reshape({np, nc});
    arrays.kexact.push_back(kex);
    arrays.uexact.push_back(fex - kex);  // Uexact = gbar . (dw + a_k grad L_k) = gbar . dw - sum_m Kexact_m
    row.kexact_norm = frob(kex);
    row.quad_error = frob(ctx.d - fex);
  }

 private:
  RowsWorkspace rows_;  ///< the explicit route's rows at the nodes
  std::vector<double> nodes_, weights_;
  int64_t piece_nodes_ = 0;
};

/// --second-order: S = 1/2 dw^T H_c dw per probe and output, and |R - S|.
class SecondOrderTerm final : public StepTerm {
 public:
  void compute(StepContext& ctx, StepRow& row, StepArrays& arrays) override {
    set_weights(ctx.model, ctx.w0);
    if (!mode_) {  // the zoo's models: all rows at once; any other model: checked on its first probe
      std::string why = "all rows at once";
      mode_ = ctx.model.spec().kind == "torchscript" || ctx.explicit_route
                  ? choose_second_order_mode(ctx.model, ctx.xp, ctx.cols, ctx.dw, &why)
                  : SecondOrderMode::kAllRows;
      spdlog::info("S = 1/2 dw^T H dw: {}", why);
    }
    const at::Tensor s = second_order(ctx.model, ctx.xp, ctx.cols, ctx.dw, *mode_).reshape({ctx.np, ctx.nc});
    row.s_norm = frob(s);
    row.higher_norm = frob(ctx.r - s);
    arrays.s.push_back(s);
  }

 private:
  std::optional<SecondOrderMode> mode_;
};

/// --sharpness EVERY: lambda_max of the loss Hessian on a fixed training subset and on the
/// step's batch at w_k (sharpness.h), with the subset's loss before and after the step.
class SharpnessTerm final : public StepTerm {
 public:
  void start(StepContext& ctx) override {
    // The fixed training subset: its first sharpness_examples examples.
    ctx.result.sharpness_examples = std::min(ctx.config.sharpness_examples, ctx.traj.split_size("train"));
    sidx_ = at::arange(ctx.result.sharpness_examples, at::kLong);
    xs_ = ctx.traj.inputs("train", sidx_, at::kDouble);
    ys_ = ctx.traj.labels("train", sidx_);
  }
  void compute(StepContext& ctx, StepRow& row, StepArrays& /*arrays*/) override {
    const auto& c = ctx.config;
    const int64_t k = ctx.k;
    if ((k - ctx.whole_begin) % c.sharpness_every != 0) return;
    // Seeded by the step so that shards agree with one process.
    set_weights(ctx.model, ctx.w0);
    const Sharpness st = hessian_top_eigenvalue(ctx.model, xs_, ys_, ctx.loss, c.sharpness_iterations, 1e-7,
                                                static_cast<uint64_t>(k));
    // Full-batch GD: the batch is the subset in another order, one Hessian; its lambda_max is reused.
    const at::Tensor& bidx = ctx.batch.indices;
    const bool batch_is_subset = bidx.size(0) == sidx_.size(0) && at::equal(std::get<0>(bidx.sort()), sidx_);
    const Sharpness sb = [&] {
      if (batch_is_subset && ctx.batch.context.empty()) return st;
      const models::TrainingForward batch_forward(ctx.model, ctx.batch.context);  // the batch's loss as trained
      return hessian_top_eigenvalue(ctx.model, ctx.batch.x, ctx.batch.y, ctx.loss, c.sharpness_iterations, 1e-7,
                                    static_cast<uint64_t>(k) + 1);
    }();
    row.lambda_train = st.lambda_max;
    row.lanczos_iterations = static_cast<double>(st.iterations);
    row.lanczos_residual = st.residual;
    row.lambda_batch = sb.lambda_max;
    row.subset_loss_before = mean_loss(ctx.model, xs_, ys_, ctx.loss);
    set_weights(ctx.model, ctx.w1);
    set_buffers(ctx.model, to_double_map(ctx.traj.buffers_at(k + 1)));
    row.subset_loss_after = mean_loss(ctx.model, xs_, ys_, ctx.loss);
    set_weights(ctx.model, ctx.w0);
    set_buffers(ctx.model, ctx.b0);
  }

 private:
  at::Tensor xs_, ys_, sidx_;
};

}  // namespace

void StepArrays::stack_into(AnalysisResult& res, size_t from) const {
  const std::pair<const std::vector<at::Tensor>*, at::Tensor*> lists[] = {
      {&d, &res.d},       {&f, &res.f},         {&k, &res.k},          {&u, &res.u},
      {&r, &res.r},       {&s, &res.s},         {&kopt, &res.kopt},    {&uopt_wd, &res.uopt_wd},
      {&uopt_round, &res.uopt_round}, {&kexact, &res.kexact}, {&uexact, &res.uexact},
      {&koptexact, &res.koptexact},   {&uoptexact, &res.uoptexact}, {&u_stats, &res.u_stats}};
  for (const auto& [list, out] : lists) {
    *out = list->size() <= from ? at::Tensor()
                                : at::stack(std::vector<at::Tensor>(list->begin() + static_cast<std::ptrdiff_t>(from),
                                                                    list->end()));
  }
}

ParamMap to_double_map(const NamedTensors& t) {
  ParamMap m;
  for (const auto& [name, v] : t) m[name] = v.to(at::kDouble);
  return m;
}

void set_weights(models::Model& model, const ParamMap& w) {
  at::NoGradGuard ng;
  for (const auto& item : model.named_parameters()) item.value().copy_(w.at(item.key()));
}

void set_buffers(models::Model& model, const ParamMap& b) {
  if (b.empty()) return;
  at::NoGradGuard ng;
  for (const auto& item : model.named_buffers()) item.value().copy_(b.at(item.key()));
}

at::Tensor forward_nograd(models::Model& model, const at::Tensor& x) {
  at::NoGradGuard ng;
  return model.forward(x);
}

ParamMap batch_gradient(models::Model& model, const at::Tensor& xb, const at::Tensor& yb, LossKind loss,
                        double* value) {
  const auto params = model.parameters();
  const at::Tensor l = batch_loss(model.forward(xb), yb, loss);
  if (value) *value = l.item<double>();
  const auto g = torch::autograd::grad({l}, params);
  ParamMap out;
  size_t i = 0;
  for (const auto& item : model.named_parameters()) out[item.key()] = g[i++];
  return out;
}

at::Tensor StepContext::product(const ParamMap& v) const {
  const auto it = std::find(dirs.begin(), dirs.end(), &v);
  if (it == dirs.end()) throw std::logic_error("StepContext::product: a direction no term asked for");
  const size_t i = static_cast<size_t>(it - dirs.begin());
  return (jvp_route ? jv.at(i) : row_directional(sp, v)).reshape({np, nc});
}

ParamMap step_preconditioner(Trajectory& traj, int64_t k, OptimizerKind kind) {
  at::Tensor before;
  if (preconditioner_needs_before(kind) && k > 0) {
    before = traj.optimizer_after(k).preconditioner_state();
    if (before.defined()) before = before.clone();  // the next call reuses the optimizer
  }
  return traj.optimizer_after(k + 1).preconditioner(before);
}

std::vector<std::shared_ptr<StepTerm>> standard_terms(const AnalyzeConfig& c) {
  std::vector<std::shared_ptr<StepTerm>> terms;
  terms.push_back(std::make_shared<SignalsTerm>());
  terms.push_back(std::make_shared<FirstOrderTerm>());
  terms.push_back(std::make_shared<OptimizerTerm>());
  if (c.kink_split) terms.push_back(std::make_shared<KinkTerm>());
  if (c.exact_nodes > 0) terms.push_back(std::make_shared<ExactTerm>(c));
  if (c.second_order) terms.push_back(std::make_shared<SecondOrderTerm>());
  if (c.sharpness_every > 0) terms.push_back(std::make_shared<SharpnessTerm>());
  return terms;
}

}  // namespace pathkernel
