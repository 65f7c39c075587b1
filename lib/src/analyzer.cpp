#include "pathkernel/analyzer.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>

#include "pathkernel/errors.h"
#include "pathkernel/sha256.h"
#include "pathkernel/exact_kernel.h"
#include "pathkernel/kernels.h"
#include "pathkernel/kinks.h"
#include "pathkernel/sharpness.h"
#include "pathkernel/step_verification.h"
#include "pathkernel/projection.h"
#include "pathkernel/shards.h"
#include "pathkernel/threads.h"
#include "pathkernel/trajectory.h"
#include "pathkernel/update_terms.h"

namespace pathkernel {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

/// The per-step [P, C] terms as the steps are analyzed, one list per array of AnalysisResult
/// (the optional ones stay empty when not computed).
struct StepArrays {
  std::vector<at::Tensor> d, f, k, u, r, s, kopt, uopt_wd, uopt_round, kexact, uexact, koptexact, uoptexact;

  /// Stacks the steps from row `from` on into r's arrays ([steps, P, C]; undefined when empty).
  void stack_into(AnalysisResult& res, size_t from = 0) const {
    const std::pair<const std::vector<at::Tensor>*, at::Tensor*> lists[] = {
        {&d, &res.d},       {&f, &res.f},         {&k, &res.k},          {&u, &res.u},
        {&r, &res.r},       {&s, &res.s},         {&kopt, &res.kopt},    {&uopt_wd, &res.uopt_wd},
        {&uopt_round, &res.uopt_round}, {&kexact, &res.kexact}, {&uexact, &res.uexact},
        {&koptexact, &res.koptexact},   {&uoptexact, &res.uoptexact}};
    for (const auto& [list, out] : lists) {
      *out = list->size() <= from ? at::Tensor()
                                  : at::stack(std::vector<at::Tensor>(list->begin() + static_cast<std::ptrdiff_t>(from),
                                                                      list->end()));
    }
  }
};

/// Undoes the partial state an analysis started unless it completes: a failure the process sees
/// (bad input, a full disk) leaves nothing of this call's, as any command; only a kill leaves
/// the partial state behind, for the same command to continue. A partial folder an earlier,
/// interrupted run left is kept as it was found (with what this call finished added).
class ProgressGuard {
 public:
  explicit ProgressGuard(const std::string& dir) : dir_(dir) {
    std::error_code ec;
    if (dir_.empty()) return;
    if (!fs::exists(dir_, ec) || fs::is_empty(dir_, ec)) {
      mode_ = kNew;
    } else if (!is_partial_analysis(dir)) {
      mode_ = kOverEarlierOutput;  // --force over a complete earlier analysis
    }
  }
  ~ProgressGuard() {
    std::error_code ec;
    if (done_ || dir_.empty()) return;
    if (mode_ == kNew) fs::remove_all(dir_, ec);
    if (mode_ == kOverEarlierOutput) {
      fs::remove_all(dir_ / "segments", ec);
      fs::remove(dir_ / "partial.json", ec);
    }
  }
  ProgressGuard(const ProgressGuard&) = delete;
  ProgressGuard& operator=(const ProgressGuard&) = delete;
  void done() { done_ = true; }

 private:
  enum Mode { kNew, kOverEarlierOutput, kResumed };
  fs::path dir_;
  Mode mode_ = kResumed;
  bool done_ = false;
};

ParamMap to_double_map(const NamedTensors& t) {
  ParamMap m;
  for (const auto& [name, v] : t) m[name] = v.to(at::kDouble);
  return m;
}

void set_weights(models::Model& model, const ParamMap& w) {
  at::NoGradGuard ng;
  for (const auto& item : model.named_parameters()) item.value().copy_(w.at(item.key()));
}

at::Tensor forward_nograd(models::Model& model, const at::Tensor& x) {
  at::NoGradGuard ng;
  return model.forward(x);
}

double frob(const at::Tensor& t) { return t.norm().item<double>(); }

/// grad L_k(w) for the model's current weights, in the model's dtype, by state_dict name.
ParamMap batch_gradient(models::Model& model, const at::Tensor& xb, const at::Tensor& yb, LossKind loss) {
  const auto params = model.parameters();
  const auto g = torch::autograd::grad({batch_loss(model.forward(xb), yb, loss)}, params);
  ParamMap out;
  size_t i = 0;
  for (const auto& item : model.named_parameters()) out[item.key()] = g[i++];
  return out;
}

/// The stored momentum buffer b_{k-1} as float64, when the SPEC's U_mom applies (SGD momentum,
/// no Nesterov or dampening); empty otherwise.
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

ParamMap momentum_buffer_of(const Optimizer& opt) {
  for (const auto& [slot, tensors] : opt.state()) {
    if (slot == "momentum_buffer") return to_double_map(tensors);
  }
  return {};
}

}  // namespace

namespace {
/// P_k of step k in float64 by parameter name (empty: the identity), from the optimizer's state
/// after step k and, for Adadelta, the state before it.
ParamMap step_preconditioner(Trajectory& traj, int64_t k, OptimizerKind kind) {
  at::Tensor before;
  if (preconditioner_needs_before(kind) && k > 0) {
    before = traj.optimizer_after(k).preconditioner_state();
    if (before.defined()) before = before.clone();  // the next call reuses the optimizer
  }
  return traj.optimizer_after(k + 1).preconditioner(before);
}
}  // namespace

AnalysisResult analyze(const AnalyzeConfig& c) {
  c.validate();
  const auto t0 = Clock::now();
  const std::unique_ptr<Trajectory> run = open_trajectory(c.run, c.kernel_route == "torchscript");
  Trajectory& traj = *run;
  // After opening the run (which pins its training threads): the analysis's own. Replayed
  // steps still run with the run's (Replayer::replay_step).
  const ThreadInfo threads = pin_threads(c.threads);
  const std::string model_spec = traj.model_spec();
  const LossKind loss = traj.loss();
  const int64_t last = traj.logged_steps();
  const int64_t whole_begin = c.step_begin, whole_end = c.step_end < 0 ? last : c.step_end;
  if (whole_begin < 0 || whole_begin >= whole_end || whole_end > last) {
    throw InputError("--range " + std::to_string(whole_begin) + ":" + std::to_string(whole_end) +
                     " is outside the run's steps 0:" + std::to_string(last));
  }
  int64_t begin = whole_begin, end = whole_end;
  if (c.shard_count > 0) {  // the I-th of N parts, split at stored checkpoints
    const std::vector<int64_t> bounds = shard_bounds(whole_begin, whole_end, traj.checkpoints(), c.shard_count);
    begin = bounds[static_cast<size_t>(c.shard_index - 1)];
    end = bounds[static_cast<size_t>(c.shard_index)];
    spdlog::info("shard {}/{}: steps {}..{} of {}..{}", c.shard_index, c.shard_count, begin, end - 1, whole_begin,
                 whole_end - 1);
  }

  // The analysis model: the run's architecture in float64 (SPEC, numerical rules).
  auto model = traj.make_model();
  model->to(at::kDouble);
  // The factorized route covers models whose parameters all sit in tapped Linear/Conv2d layers;
  // anything else (a recorded TorchScript model too) goes through explicit per-row Jacobians.
  bool explicit_route = c.kernel_route == "explicit" || c.kernel_route == "torchscript";
  if (c.kernel_route == "auto" && !factorizable(*model)) {
    if (model_spec == "torchscript") {
      spdlog::info("the recorded TorchScript model: per-row gradients by autograd");
    } else {
      spdlog::warn("model '{}' has parameters outside Linear/Conv2d layers: using explicit Jacobians (slow)", model_spec);
    }
    explicit_route = true;
  }
  // Zoo models with a convolution take forward-mode AD for their probes' directional products
  // (kernels.h, probe_jvps): one forward per direction instead of one backward per logit through
  // the convolutions. Linear-only models keep the probe rows on every step, which is cheaper
  // there (bench_analyze), and so does the explicit route.
  bool has_conv = false;
  for (const auto& t : model->taps()) has_conv = has_conv || t.kind == models::LayerKind::kConv2d;
  const bool jvp_route = !explicit_route && has_conv;
  if (c.project > 0 && explicit_route) {
    throw InputError("--project needs the factorized route: this run's model has parameters outside tapped "
                     "Linear/Conv2d layers or was recorded as TorchScript");
  }
  const Projection projection = c.project > 0 ? make_projection(*model, c.project, c.project_seed) : Projection{};
  if (c.kink_split && explicit_route) {
    throw InputError("--kinks needs one of the zoo's models (its ReLU, leaky ReLU and max-pool patterns are read "
                     "and frozen along each step); this run's model takes the explicit route");
  }
  // Nodes per piece with --kinks: enough for the frozen network's polynomial gradients.
  const int64_t piece_nodes = c.kink_split ? std::max(c.exact_nodes, nodes_needed(*model)) : c.exact_nodes;
  if (c.kernel_route == "factorized" && !factorizable(*model)) {
    throw InputError(model_spec == "torchscript"
                         ? "--kernel-route factorized: the recorder did not recognize this run's model as one of the "
                           "zoo's (docs/pytorch.md: Analyze your own PyTorch training); use auto or torchscript"
                         : "--kernel-route factorized: model '" + model_spec + "' has parameters outside Linear/Conv2d layers");
  }

  if (traj.split_size(c.split) == 0) throw InputError(c.run + ": the run has no " + c.split + " split for probes");
  AnalysisResult res;
  res.project_dims = projection.dims;
  res.probe_indices = choose_probes(
      c, traj.split_size(c.split),
      c.balanced ? traj.labels(c.split, at::arange(traj.split_size(c.split), at::kLong)).contiguous() : at::Tensor());
  const at::Tensor pidx = at::tensor(res.probe_indices, at::kLong);
  const at::Tensor xp = traj.inputs(c.split, pidx, at::kDouble);
  const at::Tensor yp = traj.labels(c.split, pidx);
  for (int64_t i = 0; i < yp.size(0); ++i) res.probe_labels.push_back(yp[i].item<int64_t>());
  const int64_t np = xp.size(0), ncls = traj.num_classes();

  // Which logit each column holds: all, the label's, or the final model's prediction.
  if (c.outputs == "all") {
    res.outputs = at::arange(ncls, at::kLong).unsqueeze(0).expand({np, ncls}).contiguous();
  } else if (c.outputs == "class") {
    if (c.output_class < 0 || c.output_class >= ncls) {
      throw InputError("--logit " + std::to_string(c.output_class) + " is not a class of this run (0.." +
                       std::to_string(ncls - 1) + ")");
    }
    res.outputs = at::full({np, 1}, c.output_class, at::kLong);
  } else if (c.outputs == "true") {
    res.outputs = yp.unsqueeze(1).clone();
  } else {
    traj.check_steps(whole_end - 1, whole_end, 1, false);  // the whole range's end, shards too
    set_weights(*model, to_double_map(traj.weights_at(whole_end)));
    res.outputs = forward_nograd(*model, xp).argmax(1).unsqueeze(1);
  }
  auto select = [&](const at::Tensor& full) { return full.gather(1, res.outputs); };  // [P, ncls] -> [P, C]
  const int64_t nc = res.outputs.size(1);

  StepArrays arrays;
  const auto [nodes, node_weights] = gauss_legendre(std::max<int64_t>(c.exact_nodes, 1));
  res.contiguous = c.every == 1;
  {
    // A TorchScript model may hold kinks (ReLU, max, abs) we cannot see: not gated as smooth.
    const models::ModelSpec& spec = model->spec();
    res.smooth = spec.activation != "relu" && spec.activation != "leaky_relu" && spec.kind != "cnn" && spec.kind != "torchscript";
  }
  auto last_report = t0;
  const OptimizerOptions oo = traj.optimizer_after(begin).options();
  res.shard_index = c.shard_index;
  res.shard_count = c.shard_count;
  res.whole_begin = whole_begin;
  res.whole_end = whole_end;
  res.threads = threads.torch_threads;
  res.blas = threads.blas;
  res.blas_core = threads.blas_core;
  res.run_path = fs::canonical(c.run).string();
  res.run_manifest_sha256 = sha256_file(fs::path(c.run) / "manifest.json");
  res.optimizer = optimizer_name(oo.kind);
  res.model = model_spec;
  // A recorded run's own TorchScript model is named as such (its per-row gradients by autograd).
  res.route = model_spec == "torchscript" ? "torchscript" : explicit_route ? "explicit" : "factorized";
  // Settings that vary by step or parameter group (a recorded run) are the optimizer's: Kopt.
  const bool varying = traj.settings_vary();
  const bool memory = oo.kind != OptimizerKind::kSgd || oo.momentum != 0;  // earlier gradients in the update
  res.uses_kopt = memory || varying;
  // The SPEC's sources of U (U_wd, U_mom) are defined for SGD without Nesterov or dampening, one
  // setting for the run.
  const bool sgd_sources = oo.kind == OptimizerKind::kSgd && !oo.nesterov && oo.dampening == 0 && !varying;
  // The update's coefficients c_{k,j}, from each step's settings.
  UpdateRecurrence recurrence;
  traj.check_steps(begin, end, c.every, memory);
  traj.verify_through(end);  // --range inside a checkpoint interval: still the run's own weights
  // A recorded run: every analyzed step checked against its logged loss and gradient before any
  // output (a trained run's replay checks its steps against its checkpoints instead).
  const std::map<int64_t, StepVerification> verdicts = verify_analyzed_steps(traj, *model, begin, end, c, loss, res);
  // Resumable (progress_dir): what an interrupted run of this same command finished.
  const bool progress = !c.progress_dir.empty();
  nlohmann::json progress_key;
  int64_t resume_at = begin;
  ProgressGuard guard(c.progress_dir);
  if (progress) {
    // The resolved range too: a run trained on after the kill has another end (and another
    // final model, which --outputs pred reads).
    progress_key = {{"settings", analysis_settings(c, np)}, {"shard", {c.shard_index, c.shard_count}},
                    {"range", {begin, end}}};
    progress_key["settings"].erase("threads");  // results equal across thread counts
    const std::vector<StoredAnalysis> finished = open_progress(c.progress_dir, progress_key, c.force);
    for (const auto& s : finished) {
      if (s.result.steps.front().step != resume_at) {
        throw InputError(s.dir.string() + ": a segment that does not continue the ones before it (expected step " +
                         std::to_string(resume_at) + ")");
      }
      resume_at = s.result.steps.back().step + c.every;
    }
    if (!finished.empty()) {
      spdlog::info("continuing an interrupted analysis: steps {}..{} done ({} segments in {}/segments)", begin,
                   resume_at - c.every, finished.size(), c.progress_dir);
    }
  }
  const std::vector<int64_t>& stored = traj.checkpoints();
  size_t seg_row0 = 0;  // the current segment's first row
  auto seg_started = Clock::now();
  at::Tensor seg_f0;
  double seg_split_error = 0;
  int64_t seg_checked = 0;
  // With memory the recurrences need every step's gradient from step 0 on, analyzed or not.
  const int64_t walk_from = memory ? 0 : resume_at;
  res.startup_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  spdlog::debug("analysis set up in {:.3f} s (run opened, data decoded, probes chosen)", res.startup_seconds);
  // The fixed training subset of --sharpness: its first sharpness_examples examples.
  at::Tensor xs, ys, sidx;
  if (c.sharpness_every > 0) {
    res.sharpness_examples = std::min(c.sharpness_examples, traj.split_size("train"));
    sidx = at::arange(res.sharpness_examples, at::kLong);
    xs = traj.inputs("train", sidx, at::kDouble);
    ys = traj.labels("train", sidx);
  }
  // The previous step's batch gradient, for the cosine between consecutive gradients.
  ParamMap prev_grad;
  int64_t prev_grad_step = -2;
  for (int64_t k = walk_from; k < end && resume_at < end; ++k) {  // (nothing left when resumed at the end)
    const bool analyzed = k >= resume_at && (k - begin) % c.every == 0;
    if (!analyzed && !memory) continue;
    const ParamMap w0 = to_double_map(traj.weights_at(k));
    const LoggedStep batch = traj.logged_step(k, at::kDouble);
    const double lr = batch.lr;
    const at::Tensor& bidx = batch.indices;
    const at::Tensor& xb = batch.x;
    const at::Tensor& yb = batch.y;
    const double nb = static_cast<double>(bidx.size(0));
    if (!analyzed) {
      set_weights(*model, w0);
      prev_grad = batch_gradient(*model, xb, yb, loss);
      prev_grad_step = k;
      // P_k only where it enters the buffer (RMSprop with momentum).
      const bool inner = linear_update(batch.settings.options, k).inner;
      recurrence.advance(k, scaled(prev_grad, batch.grad_scale), w0, batch.settings,
                         inner ? step_preconditioner(traj, k, oo.kind) : ParamMap{});
      continue;
    }
    const ParamMap v_prev = sgd_sources ? momentum_buffer_of(traj.optimizer_after(k)) : ParamMap{};
    const ParamMap w1 = to_double_map(traj.weights_at(k + 1));
    const ParamMap precond = step_preconditioner(traj, k, oo.kind);  // P_k, after step k
    ParamMap dw;
    for (const auto& [name, t] : w0) dw[name] = w1.at(name) - t;  // exact: float32 -> float64 first

    set_weights(*model, w1);
    const at::Tensor f1 = forward_nograd(*model, xp);
    const double loss_after = batch_loss(forward_nograd(*model, xb), yb, loss).item<double>();
    set_weights(*model, w0);
    const double loss_before = batch_loss(forward_nograd(*model, xb), yb, loss).item<double>();

    // The probes' products with every direction the step needs, J_p v for v = dw, grad L_k and
    // the optimizer's directions, all at w_k; f(w_k) comes from the same forwards.
    const ParamMap grad_l = batch_gradient(*model, xb, yb, loss);
    double grad_cos = NAN;
    if (k > 0) {
      if (prev_grad_step != k - 1) {  // the first step of a range, or every > 1: step k-1's own
        const LoggedStep before = traj.logged_step(k - 1, at::kDouble);
        set_weights(*model, to_double_map(traj.weights_at(k - 1)));
        prev_grad = batch_gradient(*model, before.x, before.y, loss);
        set_weights(*model, w0);
      }
      grad_cos = gradient_cosine(grad_l, prev_grad);
    }
    prev_grad = grad_l;
    prev_grad_step = k;
    // The gradient the optimizer applied: grad L_k times a recorded clipping scale (1 without).
    const double gs = batch.grad_scale;
    const ParamMap applied = gs == 1 ? grad_l : scaled(grad_l, gs);
    recurrence.advance(k, applied, w0, batch.settings, precond);
    const ParamMap kernel_dir = recurrence.kernel_direction(precond);
    const ParamMap decay_dir = recurrence.has_decay() ? recurrence.decay_direction(precond) : ParamMap{};
    const bool with_wd = oo.weight_decay != 0, with_mom = oo.momentum != 0 && !v_prev.empty();
    std::vector<const ParamMap*> dirs = {&dw, &applied};
    if (res.uses_kopt) dirs.push_back(&kernel_dir);
    if (with_wd) dirs.push_back(&w0);
    if (with_mom) dirs.push_back(&v_prev);
    if (recurrence.has_decay()) dirs.push_back(&decay_dir);
    // The per-example split K_{k,m} (probe rows against the batch's loss rows) is needed by the
    // step callback (explain) and on the checked steps (counted from the whole range's first
    // step, so that shards check the steps one process would): there its sum over m is compared
    // with -a_k g . grad L_k, an independent route (exit status 4 beyond tolerance). The
    // forward-mode route gives K and F without it on the other steps; the explicit route forms
    // the rows anyway and checks every step.
    const bool checked = ((k - whole_begin) / c.every) % c.check_every == 0;
    const bool split = !jvp_route || c.on_step || checked;
    at::Tensor f0;
    std::vector<at::Tensor> jv;
    if (jvp_route) jv = probe_jvps(*model, xp, res.outputs, dirs, &f0);
    RowGradients sp, sb;
    at::Tensor k_per, zb;  // zb: the batch rows projected (with --project)
    if (split) {
      sp = probe_rows(*model, xp, res.outputs, explicit_route, jvp_route ? nullptr : &f0);
      sb = loss_rows(*model, xb, yb, loss, explicit_route);
      if (c.project > 0) {
        zb = project_rows(projection, sb);
        k_per = at::mm(project_rows(projection, sp), zb.t()).mul_(-lr * gs / nb);  // K~_{k,m}
      } else {
        k_per = row_gram(sp, sb).mul_(-lr * gs / nb);  // K_{k,m}: [P*C, M]
      }
    }
    auto product = [&](const ParamMap& v) {
      const size_t i = static_cast<size_t>(std::find(dirs.begin(), dirs.end(), &v) - dirs.begin());
      return (jvp_route ? jv.at(i) : row_directional(sp, v)).reshape({np, nc});
    };
    if (k == begin) res.f_initial = select(f0);
    const at::Tensor k_direct = product(applied) * (-lr);
    // K itself is exact: a projected split only estimates its per-example parts.
    const at::Tensor k_full = jvp_route || c.project > 0 ? k_direct : k_per.sum(1).reshape({np, nc});
    const at::Tensor f_full = product(dw);
    at::Tensor u_wd = at::zeros_like(f_full), u_mom = at::zeros_like(f_full);
    if (with_wd) u_wd = product(w0) * (-lr * oo.weight_decay);
    if (with_mom) u_mom = product(v_prev) * (-lr * oo.momentum);
    // The optimizer's kernel term (SPEC): Kopt_k = -a_k g . P_k (.) sum_j c_{k,j} grad L_j(w_j).
    const at::Tensor kopt = res.uses_kopt ? product(kernel_dir) * (-lr) : k_direct;
    if (split) {
      const double scale = std::max(1e-300, k_direct.abs().max().item<double>());
      const double e = (k_per.sum(1).reshape({np, nc}) - k_direct).abs().max().item<double>() / scale;
      if (c.project > 0) {  // the projection's error, not a failed check
        res.projection_error = std::max(res.projection_error, e);
      } else {
        res.kernel_split_error = std::max(res.kernel_split_error, e);
        seg_split_error = std::max(seg_split_error, e);
      }
      ++res.kernel_split_checked;
      ++seg_checked;
    }
    const at::Tensor uopt_wd = recurrence.has_decay() ? product(decay_dir) * (-lr) : at::zeros_like(kopt);

    const at::Tensor d = select(f1 - f0), f = f_full, kk = k_full;
    const at::Tensor u = f - kk, r = d - f;
    StepRow row;
    row.step = k;
    row.lr = lr;
    row.loss_before = loss_before;
    row.loss_after = loss_after;
    row.loss_up = loss_after > loss_before;
    row.grad_cos = grad_cos;
    mark_verified(row, verdicts);
    row.grad_norm = traj.logged_grad_norm(k);
    if (std::isnan(row.grad_norm)) {  // not logged (a recorded run): the float64 gradient's norm
      double sq = 0;
      for (const auto& [name, g] : grad_l) sq += g.pow(2).sum().item<double>();
      row.grad_norm = std::sqrt(sq);
    }
    double dw_sq = 0;
    for (const auto& [name, t] : dw) dw_sq += t.pow(2).sum().item<double>();
    row.update_norm = std::sqrt(dw_sq);
    row.d_norm = frob(d);
    row.f_norm = frob(f);
    row.k_norm = frob(kk);
    row.u_norm = frob(u);
    row.u_wd_norm = sgd_sources ? frob(u_wd) : NAN;
    row.u_mom_norm = sgd_sources ? frob(u_mom) : NAN;
    row.u_round_norm = sgd_sources ? frob(u - u_wd - u_mom) : NAN;
    const at::Tensor uopt_round = f - kopt - uopt_wd;
    row.kopt_norm = frob(kopt);
    row.uopt_wd_norm = frob(uopt_wd);
    row.uopt_round_norm = frob(uopt_round);
    arrays.kopt.push_back(kopt);
    arrays.uopt_wd.push_back(uopt_wd);
    arrays.uopt_round.push_back(uopt_round);
    row.r_norm = frob(r);
    row.r = row.f_norm > 0 ? row.r_norm / row.f_norm : 0.0;
    at::Tensor kex_per_step;
    StepKinks kinks;
    if (c.kink_split) {
      // Each probe's and batch example's kinks along the step, walked row by row (kinks.h).
      try {
        kinks = walk_step(*model, w0, dw, xp, xb, c.kinks_examples, c.kinks_max);
      } catch (const std::invalid_argument& e) {
        throw InputError(std::string("--kinks: ") + e.what());
      }
      row.kinks_probes = kinks.probe_kinks;
      row.kinks_batch = kinks.batch_kinks;
      row.kink_pieces = kinks.probe_pieces;
    }
    if (c.exact_nodes > 0) {
      // gbar = integral_0^1 g(w_k + t dw) dt by quadrature (SPEC, "exact path kernel"): the probe
      // rows' signals at each node against the batch's loss signals at w_k; with --kinks each
      // probe over its own pieces.
      ExactStepInputs in;
      in.model = model.get();
      in.xp = &xp;
      in.cols = &res.outputs;
      in.w0 = &w0;
      in.dw = &dw;
      in.grad_l = &applied;
      in.kernel_dir = res.uses_kopt ? &kernel_dir : nullptr;
      in.split = !jvp_route || c.on_step;  // else forward mode at the nodes
      in.explicit_route = explicit_route;
      in.batch_rows = &sb;
      in.projection = c.project > 0 ? &projection : nullptr;
      in.batch_sketch = &zb;
      in.lr = lr * gs;  // the per-example terms of the applied gradient
      in.batch_size = nb;
      in.per_row = kinks.walked;
      in.rounds = in.per_row ? row_node_rounds(kinks.probes, piece_nodes) : shared_node_rounds(nodes, node_weights, np);
      const ExactStepSums sums = integrate_exact_step(in);
      const bool split_nodes = in.split;
      const at::Tensor &gbar_dw = sums.gbar_dw, &gbar_grad = sums.gbar_grad, &gbar_kdir = sums.gbar_kdir,
                       &kex_per = sums.kex_per;
      if (res.uses_kopt) {
        // Kopt with gbar in place of g (SPEC): the rest of gbar . dw is decay and rounding.
        const at::Tensor koex = gbar_kdir.reshape({np, nc}) * (-lr);
        arrays.koptexact.push_back(koex);
        arrays.uoptexact.push_back(gbar_dw.reshape({np, nc}) - koex);
      }
      if (split_nodes) kex_per_step = kex_per;
      const at::Tensor kex = split_nodes && c.project == 0 ? kex_per.sum(1).reshape({np, nc})
                                                           : gbar_grad.reshape({np, nc}) * (-lr);
      const at::Tensor fex = gbar_dw.reshape({np, nc});
      arrays.kexact.push_back(kex);
      arrays.uexact.push_back(fex - kex);  // Uexact = gbar . (dw + a_k grad L_k) = gbar . dw - sum_m Kexact_m
      row.kexact_norm = frob(kex);
      row.quad_error = frob(d - fex);
    }
    if (c.on_step) c.on_step(StepTerms{k, lr * gs, bidx, k_per, kex_per_step, &sb});
    if (c.second_order) {
      set_weights(*model, w0);
      const at::Tensor s = second_order(*model, xp, res.outputs, dw).reshape({np, nc});
      row.s_norm = frob(s);
      row.higher_norm = frob(r - s);
      arrays.s.push_back(s);
    }
    if (c.sharpness_every > 0 && (k - whole_begin) % c.sharpness_every == 0) {
      // lambda_max at w_k (sharpness.h), seeded by the step so that shards agree with one process.
      set_weights(*model, w0);
      const Sharpness st = hessian_top_eigenvalue(*model, xs, ys, loss, c.sharpness_iterations, 1e-7,
                                                  static_cast<uint64_t>(k));
      // Full-batch GD: the batch is the subset in another order, one Hessian; its lambda_max is reused.
      const bool batch_is_subset = bidx.size(0) == sidx.size(0) && at::equal(std::get<0>(bidx.sort()), sidx);
      const Sharpness sb_ = batch_is_subset ? st
                                            : hessian_top_eigenvalue(*model, xb, yb, loss, c.sharpness_iterations,
                                                                     1e-7, static_cast<uint64_t>(k) + 1);
      row.lambda_train = st.lambda_max;
      row.lanczos_iterations = static_cast<double>(st.iterations);
      row.lanczos_residual = st.residual;
      row.lambda_batch = sb_.lambda_max;
      row.subset_loss_before = mean_loss(*model, xs, ys, loss);
      set_weights(*model, w1);
      row.subset_loss_after = mean_loss(*model, xs, ys, loss);
      set_weights(*model, w0);
    }
    arrays.d.push_back(d);
    arrays.f.push_back(f);
    arrays.k.push_back(kk);
    arrays.u.push_back(u);
    arrays.r.push_back(r);
    res.steps.push_back(row);
    res.f_final = select(f1);
    if (progress) {
      if (seg_row0 + 1 == res.steps.size()) seg_f0 = select(f0);
      // A segment ends at the end, or where the next analyzed step would cross a stored
      // checkpoint once it holds segment_seconds of work.
      const int64_t next = k + c.every;
      const bool long_enough =
          std::chrono::duration<double>(Clock::now() - seg_started).count() >= c.segment_seconds;
      const bool boundary = next >= end || (long_enough && std::any_of(stored.begin(), stored.end(), [&](int64_t s) {
                                              return s > k && s <= next;
                                            }));
      if (boundary) {
        AnalysisResult seg = res;  // the header fields; the steps and arrays of this segment below
        seg.steps.assign(res.steps.begin() + static_cast<std::ptrdiff_t>(seg_row0), res.steps.end());
        arrays.stack_into(seg, seg_row0);
        seg.f_initial = seg_f0;
        seg.f_final = res.f_final;
        seg.kernel_split_error = seg_split_error;
        seg.kernel_split_checked = seg_checked;
        finish_analysis(seg, c);
        seg.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
        write_segment(c.progress_dir, seg, c);
        seg_row0 = res.steps.size();
        seg_started = Clock::now();
        seg_split_error = 0;
        seg_checked = 0;
      }
    }

    const auto now = Clock::now();
    if (now - last_report > std::chrono::seconds(2) || k + c.every >= end) {
      const double el = std::chrono::duration<double>(now - t0).count();
      const double done = static_cast<double>(res.steps.size());
      const double total = static_cast<double>((end - begin + c.every - 1) / c.every);
      spdlog::info("analyzed step {} ({}/{})  r {:.3g}  {:.1f} steps/s  ETA {:.0f}s", k, res.steps.size(),
                   static_cast<int64_t>(total), row.r, done / el, (total - done) * el / done);
      last_report = now;
    }
  }
  if (progress) {
    // Every step is in the segments now, the earlier run's and this one's: the result is their
    // join, read back from the files (which hold every number exactly).
    const std::vector<StoredAnalysis> all = open_progress(c.progress_dir, progress_key, /*force=*/false);
    AnalysisResult joined = join_parts(all);
    finish_analysis(joined, c);
    if (res.verified_steps > 0) gate_updates(joined, c.run, c.allow_unverified);
    joined.startup_seconds = res.startup_seconds;
    joined.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    guard.done();
    return joined;
  }
  arrays.stack_into(res);
  finish_analysis(res, c);
  if (res.verified_steps > 0) gate_updates(res, c.run, c.allow_unverified);
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return res;
}

}  // namespace pathkernel
