#include "pathkernel/analysis/analyzer.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <numeric>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>

#include "pathkernel/analysis/exact_kernel.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/analysis/kinks.h"
#include "pathkernel/analysis/projection.h"
#include "pathkernel/analysis/shards.h"
#include "pathkernel/analysis/sharpness.h"
#include "pathkernel/analysis/step_terms.h"
#include "pathkernel/analysis/step_verification.h"
#include "pathkernel/analysis/update_terms.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/sha256.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/trajectory/trajectory.h"
#include "pathkernel/trajectory/scripted_model.h"

namespace pathkernel {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

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

}  // namespace

namespace {

/// The analysis driver: opens the run, chooses the route, the probes and their outputs, then
/// walks the range and hands every step's shared context to the step terms (step_terms.h),
/// keeping what an interrupted analysis finished (progress_dir) in segments.
class Driver {
 public:
  /// Probes whose rows an explicit-route split formed only for its check covers (form_products).
  static constexpr int64_t kCheckedProbes = 4;

  explicit Driver(const AnalyzeConfig& c)
      : c_(c),
        t0_(Clock::now()),
        run_(c.trajectory ? nullptr : open_trajectory(c.run, c.kernel_route == "torchscript")),
        traj_(c.trajectory ? *c.trajectory : *run_) {}

  AnalysisResult run() {
    // After opening the run (which pins its training threads): the analysis's own. Replayed
    // steps still run with the run's (Replayer::replay_step).
    threads_ = pin_threads(c_.threads);
    resolve_range();
    // The analysis model: the run's architecture in float64 (SPEC, numerical rules).
    model_ = traj_.make_model();
    model_->to(at::kDouble);
    choose_route();
    choose_probes_and_outputs();
    choose_products();
    describe();
    StepContext ctx(c_, traj_, *model_, res_, traj_.loss(), xp_, res_.outputs, np_, res_.outputs.size(1),
                    explicit_route_, jvp_route_, projection_);
    ctx.jvp_mode = jvp_mode_;
    set_up(ctx);
    for (int64_t k = walk_from_; k < end_ && resume_at_ < end_; ++k) {  // (nothing left when resumed at the end)
      const bool analyzed = k >= resume_at_ && (k - begin_) % c_.every == 0;
      if (!analyzed && !ctx.memory) continue;
      load_step(ctx, k);
      if (!analyzed) {
        for (auto& t : terms_) t->walk(ctx);
        continue;
      }
      analyze_step(ctx);
      if (progress_) end_segment_if_due(ctx);
      report(k);
    }
    return finish();
  }

 private:
  void resolve_range() {
    const int64_t last = traj_.logged_steps();
    if (last == 0) throw InputError(c_.run + ": the run has no logged step (its step log is empty): nothing to analyze");
    whole_begin_ = c_.step_begin;
    whole_end_ = c_.step_end < 0 ? last : c_.step_end;
    if (whole_begin_ < 0 || whole_begin_ >= whole_end_ || whole_end_ > last) {
      throw InputError("--range " + std::to_string(whole_begin_) + ":" + std::to_string(whole_end_) +
                       " is outside the run's steps 0:" + std::to_string(last));
    }
    begin_ = whole_begin_;
    end_ = whole_end_;
    if (c_.shard_count > 0) {  // the I-th of N parts, split at stored checkpoints
      std::vector<int64_t> at = traj_.checkpoints();
      if (c_.shard_even) {
        at.resize(static_cast<size_t>(whole_end_ - whole_begin_));
        std::iota(at.begin(), at.end(), whole_begin_);
      }
      const std::vector<int64_t> bounds = shard_bounds(whole_begin_, whole_end_, at, c_.shard_count);
      begin_ = bounds[static_cast<size_t>(c_.shard_index - 1)];
      end_ = bounds[static_cast<size_t>(c_.shard_index)];
      spdlog::info("shard {}/{}: steps {}..{} of {}..{}", c_.shard_index, c_.shard_count, begin_, end_ - 1,
                   whole_begin_, whole_end_ - 1);
    }
  }

  /// The factorized route covers models whose parameters all sit in tapped Linear/Conv2d layers;
  /// anything else (a recorded TorchScript model too) goes through explicit per-row Jacobians.
  /// Zoo models with a convolution take forward-mode AD for their probes' directional products
  /// (kernels.h, probe_jvps): one forward per direction instead of one backward per logit through
  /// the convolutions. Linear-only models keep the probe rows on every step, which is cheaper
  /// there (bench_analyze), and so does the explicit route.
  void choose_route() {
    const std::string spec = traj_.model_spec();
    explicit_route_ = c_.kernel_route == "explicit" || c_.kernel_route == "torchscript";
    if (explicit_route_) {
      res_.route_reason = "--kernel-route " + c_.kernel_route;
    } else if (spec == "torchscript" && !scripted_constants(*model_).empty()) {
      res_.route_reason = "a recorded model with parameters the run does not train (frozen, outside the optimizer, or "
                          "unused by its forward), held constant";
      explicit_route_ = true;
    } else if (spec == "torchscript") {
      res_.route_reason = "a recorded model the recorder did not recognize as one of the zoo's";
      explicit_route_ = true;
    } else if (!factorizable(*model_)) {
      res_.route_reason = "model '" + spec + "' has parameters outside Linear/Conv2d layers" +
                          (model_->norm_sites().empty() ? "" : " (BatchNorm's, whose batch couples the examples)");
      explicit_route_ = true;
    } else {
      res_.route_reason = "the zoo's " + spec + ": every parameter in a tapped Linear/Conv2d layer";
    }
    if (explicit_route_ && c_.kernel_route == "auto" && model_->norm_sites().empty() &&
        scripted_constants(*model_).empty()) {
      res_.route_reason += "; hint: the factorized route (much faster) serves nn.Sequential stacks of Linear/Conv2d "
                           "layers with ReLU, leaky ReLU, tanh, max-pool, Flatten and identities (docs/pytorch.md)";
    }
    spdlog::info("kernel route: {} ({})", explicit_route_ ? "per-row autograd" : "factorized", res_.route_reason);
    if (c_.project > 0 && explicit_route_) {
      throw InputError("--project needs the factorized route: this run's model has parameters outside tapped "
                       "Linear/Conv2d layers or was recorded as TorchScript");
    }
    projection_ = c_.project > 0 ? make_projection(*model_, c_.project, c_.project_seed) : Projection{};
    if (c_.kink_split && explicit_route_) {
      throw InputError("--kinks needs one of the zoo's models (its ReLU, leaky ReLU and max-pool patterns are read "
                       "and frozen along each step); this run's model takes the explicit route");
    }
    if (c_.kink_split && !model_->dropout_sites().empty()) {
      throw InputError("--kinks: model '" + spec + "' has Dropout sites, and the kink walk of the batch's examples "
                       "does not apply the steps' masks");
    }
    if (c_.kernel_route == "factorized" && !factorizable(*model_)) {
      throw InputError(spec == "torchscript"
                           ? "--kernel-route factorized: the recorder did not recognize this run's model as one of "
                             "the zoo's (docs/pytorch.md: Analyze your own PyTorch training); use auto or torchscript"
                           : "--kernel-route factorized: model '" + spec + "' has parameters outside Linear/Conv2d layers");
    }
  }

  /// How J v is formed (AnalyzeConfig::products); the per-example split's rows are formed on the
  /// steps that need them whichever way.
  void choose_products() {
    bool has_conv = false;
    for (const auto& t : model_->taps()) has_conv = has_conv || t.kind == models::LayerKind::kConv2d;
    std::string why;
    if (c_.products == "rows" || (c_.products == "auto" && !explicit_route_ && !has_conv)) {
      jvp_route_ = false;
      res_.products = "rows";
    } else {
      jvp_route_ = true;
      if (c_.products == "forward" || (c_.products == "auto" && !explicit_route_)) {
        jvp_mode_ = JvpMode::kForward;
      } else if (c_.products == "double-backward") {
        jvp_mode_ = JvpMode::kDoubleBackward;
      } else {
        const std::optional<JvpMode> mode = choose_jvp_mode(*model_, xp_, res_.outputs, &why);
        jvp_route_ = mode.has_value();
        jvp_mode_ = mode.value_or(JvpMode::kForward);
      }
      res_.products = !jvp_route_ ? "rows" : jvp_mode_ == JvpMode::kForward ? "forward" : "double-backward";
    }
    if (jvp_route_ && jvp_mode_ == JvpMode::kForward) {  // how the step's directions are carried
      std::string how;
      jvp_mode_ = choose_forward_batching(*model_, xp_, res_.outputs, &how);
      why = why.empty() ? how : why + "; " + how;
    }
    res_.products_why = why;
    spdlog::info("probe products J v: {}{}", res_.products, why.empty() ? "" : " (" + why + ")");
  }

  /// The probes, and which logit each column holds: all, one class, the label's, or the final
  /// model's prediction.
  void choose_probes_and_outputs() {
    if (traj_.split_size(c_.split) == 0) throw InputError(c_.run + ": the run has no " + c_.split + " split for probes");
    res_.project_dims = projection_.dims;
    res_.probe_indices = choose_probes(
        c_, traj_.split_size(c_.split),
        c_.balanced ? traj_.labels(c_.split, at::arange(traj_.split_size(c_.split), at::kLong)).contiguous() : at::Tensor());
    const at::Tensor pidx = at::tensor(res_.probe_indices, at::kLong);
    xp_ = traj_.inputs(c_.split, pidx, at::kDouble);
    const at::Tensor yp = traj_.labels(c_.split, pidx);
    for (int64_t i = 0; i < yp.size(0); ++i) res_.probe_labels.push_back(yp[i].item<int64_t>());
    np_ = xp_.size(0);
    const int64_t ncls = traj_.num_classes();
    if (c_.outputs == "all") {
      res_.outputs = at::arange(ncls, at::kLong).unsqueeze(0).expand({np_, ncls}).contiguous();
    } else if (c_.outputs == "class") {
      if (c_.output_class < 0 || c_.output_class >= ncls) {
        throw InputError("--logit " + std::to_string(c_.output_class) + " is not a class of this run (0.." +
                         std::to_string(ncls - 1) + ")");
      }
      res_.outputs = at::full({np_, 1}, c_.output_class, at::kLong);
    } else if (c_.outputs == "true") {
      res_.outputs = yp.unsqueeze(1).clone();
    } else {
      traj_.check_steps(whole_end_ - 1, whole_end_, 1, false);  // the whole range's end, shards too
      set_weights(*model_, to_double_map(traj_.weights_at(whole_end_)));
      set_buffers(*model_, to_double_map(traj_.buffers_at(whole_end_)));
      res_.outputs = forward_nograd(*model_, xp_).argmax(1).unsqueeze(1);
    }
  }

  /// The facts of the analysis in its summary.
  void describe() {
    res_.contiguous = c_.every == 1;
    // A TorchScript model may hold kinks (ReLU, max, abs) we cannot see: not gated as smooth.
    const models::ModelSpec& spec = model_->spec();
    res_.smooth = spec.activation != "relu" && spec.activation != "leaky_relu" && spec.kind != "cnn" &&
                  spec.kind != "torchscript";
    options_ = traj_.optimizer_after(begin_).options();
    res_.shard_index = c_.shard_index;
    res_.shard_count = c_.shard_count;
    res_.whole_begin = whole_begin_;
    res_.whole_end = whole_end_;
    res_.threads = threads_.torch_threads;
    res_.blas = threads_.blas;
    res_.blas_core = threads_.blas_core;
    res_.run_path = fs::canonical(c_.run).string();
    res_.run_manifest_sha256 = sha256_file(fs::path(c_.run) / "manifest.json");
    res_.run_complete = run_complete(c_.run);
    res_.optimizer = optimizer_name(options_.kind);
    res_.loss = loss_name(traj_.loss());
    res_.model = traj_.model_spec();
    // A recorded run's own TorchScript model is named as such (its per-row gradients by autograd).
    res_.route = res_.model == "torchscript" ? "torchscript" : explicit_route_ ? "explicit" : "factorized";
  }

  /// The run-wide facts of the context, the verification of a recorded run's steps, what an
  /// interrupted analysis finished, and the terms.
  void set_up(StepContext& ctx) {
    // Settings that vary by step or parameter group (a recorded run) are the optimizer's: Kopt.
    const bool varying = traj_.settings_vary();
    ctx.options = options_;
    ctx.memory = options_.kind != OptimizerKind::kSgd || options_.momentum != 0;  // earlier gradients in the update
    res_.uses_kopt = ctx.memory || varying;
    // The SPEC's sources of U (U_wd, U_mom): SGD without Nesterov or dampening, one setting.
    ctx.sgd_sources = options_.kind == OptimizerKind::kSgd && !options_.nesterov && options_.dampening == 0 && !varying;
    ctx.whole_begin = whole_begin_;
    traj_.check_steps(begin_, end_, c_.every, ctx.memory);
    traj_.verify_through(end_);  // --range inside a checkpoint interval: still the run's own weights
    // A recorded run: every analyzed step checked against its logged loss and gradient before any
    // output (a trained run's replay checks its steps against its checkpoints instead).
    verdicts_ = verify_analyzed_steps(traj_, *model_, begin_, end_, c_, ctx.loss, res_, &verified_gradients_);
    ctx.verdicts = &verdicts_;
    resume_progress();
    // With memory the recurrences need every step's gradient from step 0 on, analyzed or not.
    walk_from_ = ctx.memory ? 0 : resume_at_;
    terms_ = standard_terms(c_);
    terms_.insert(terms_.end(), c_.extra_terms.begin(), c_.extra_terms.end());
    for (auto& t : terms_) t->start(ctx);
    res_.startup_seconds = std::chrono::duration<double>(Clock::now() - t0_).count();
    spdlog::debug("analysis set up in {:.3f} s (run opened, data decoded, probes chosen)", res_.startup_seconds);
  }

  /// Resumable (progress_dir): what an interrupted run of this same command finished.
  void resume_progress() {
    progress_ = !c_.progress_dir.empty();
    guard_ = std::make_unique<ProgressGuard>(c_.progress_dir);
    resume_at_ = begin_;
    if (!progress_) return;
    // The resolved range too: a run trained on after the kill has another end (and another
    // final model, which --outputs pred reads).
    progress_key_ = {{"settings", analysis_settings(c_, np_)}, {"shard", {c_.shard_index, c_.shard_count}},
                     {"range", {begin_, end_}}};
    progress_key_["settings"].erase("threads");  // results equal across thread counts
    const std::vector<StoredAnalysis> finished = open_progress(c_.progress_dir, progress_key_, c_.force);
    for (const auto& s : finished) {
      if (s.result.steps.front().step != resume_at_) {
        throw InputError(s.dir.string() + ": a segment that does not continue the ones before it (expected step " +
                         std::to_string(resume_at_) + ")");
      }
      resume_at_ = s.result.steps.back().step + c_.every;
    }
    if (!finished.empty()) {
      spdlog::info("continuing an interrupted analysis: steps {}..{} done ({} segments in {}/segments)", begin_,
                   resume_at_ - c_.every, finished.size(), c_.progress_dir);
    }
    seg_started_ = Clock::now();
  }

  /// w_k, the batch and its gradient at w_k, for a walked or an analyzed step.
  void load_step(StepContext& ctx, int64_t k) {
    ctx.k = k;
    ctx.w0 = to_double_map(traj_.weights_at(k));
    ctx.b0 = to_double_map(traj_.buffers_at(k));
    set_buffers(*model_, ctx.b0);
    ctx.batch = traj_.logged_step(k, at::kDouble);
    ctx.lr = ctx.batch.lr;
    ctx.gs = ctx.batch.grad_scale;
    ctx.nb = static_cast<double>(ctx.batch.indices.size(0));
    ctx.dw.clear();
    ctx.w1.clear();
    ctx.kinks = StepKinks{};
    ctx.kex_per = at::Tensor();
    ctx.kernel_dir = nullptr;
    ctx.dirs.clear();
    ctx.jv.clear();
    if (ctx.memory && !((k >= resume_at_) && (k - begin_) % c_.every == 0)) {  // walked
      set_weights(*model_, ctx.w0);
      const models::TrainingForward batch_forward(*model_, ctx.batch.context);
      ctx.grad_l = batch_gradient(*model_, ctx.batch.x, ctx.batch.y, ctx.loss);
      // The gradient the optimizer applied: grad L_k times a recorded clipping scale (1 without).
      ctx.applied = scaled(ctx.grad_l, ctx.gs);
    }
  }

  /// One analyzed step: the terms load, the driver reads w_{k+1} and forms the outputs, the
  /// losses and the batch gradient, the terms ask for directions, the driver forms the products
  /// and rows, the terms compute.
  void analyze_step(StepContext& ctx) {
    for (auto& t : terms_) t->load(ctx);
    ctx.w1 = to_double_map(traj_.weights_at(ctx.k + 1));
    for (const auto& [name, t] : ctx.w0) ctx.dw[name] = ctx.w1.at(name) - t;  // exact: float32 -> float64 first
    const at::Tensor& xb = ctx.batch.x;
    const at::Tensor& yb = ctx.batch.y;
    set_weights(*model_, ctx.w1);
    const ParamMap b1 = to_double_map(traj_.buffers_at(ctx.k + 1));
    set_buffers(*model_, b1);
    ctx.f1 = forward_nograd(*model_, xp_);
    ctx.u_stats = at::Tensor();
    if (!b1.empty()) {  // the running statistics' own change, at w_{k+1}
      set_buffers(*model_, ctx.b0);
      ctx.u_stats = ctx.select(ctx.f1 - forward_nograd(*model_, xp_));
    }
    {  // the batch as the step's training forward saw it (Dropout masks, batch statistics); the probes as predicted
      const models::TrainingForward batch_forward(*model_, ctx.batch.context);
      ctx.loss_after = batch_loss(forward_nograd(*model_, xb), yb, ctx.loss).item<double>();
      set_weights(*model_, ctx.w0);
      if (!verified_gradients_.take(ctx.k, ctx.grad_l, ctx.loss_before)) {
        ctx.grad_l = batch_gradient(*model_, xb, yb, ctx.loss, &ctx.loss_before);
      }
    }
    ctx.applied = ctx.gs == 1 ? ctx.grad_l : scaled(ctx.grad_l, ctx.gs);
    for (auto& t : terms_) t->prepare(ctx);
    form_products(ctx);
    if (ctx.k == begin_) res_.f_initial = ctx.select(ctx.f0);
    ctx.d = ctx.select(ctx.f1 - ctx.f0);
    StepRow row;
    row.step = ctx.k;
    row.lr = ctx.lr;
    StepArrays& arrays = arrays_;
    for (auto& t : terms_) t->compute(ctx, row, arrays);
    if (c_.on_step) c_.on_step(StepTerms{ctx.k, ctx.lr * ctx.gs, ctx.batch.indices, ctx.k_per, ctx.kex_per, &ctx.sb});
    res_.steps.push_back(row);
    res_.f_final = ctx.select(ctx.f1);
    if (progress_ && seg_row0_ + 1 == res_.steps.size()) seg_f0_ = ctx.select(ctx.f0);
  }

  /// The probes' products with every direction asked for, J_p v, all at w_k; f(w_k) from the
  /// same forwards. The per-example split K_{k,m} (probe rows against the batch's loss rows) is
  /// formed for the step callback (explain) and on the checked steps (counted from the whole
  /// range's first step, so that shards check the steps one process would), where its sum over
  /// m is compared with -a_k g . grad L_k, an independent route (exit status 4 beyond
  /// tolerance). Jacobian-vector products (forward mode or double backward) give K and F without
  /// it on the other steps; the rows route (--products rows) forms the rows and checks every step.
  /// On the explicit route each probe row costs a backward pass, so a split formed only to be
  /// checked covers the first kCheckedProbes probes (every output of each).
  void form_products(StepContext& ctx) {
    const bool checked = ((ctx.k - whole_begin_) / c_.every) % c_.check_every == 0;
    ctx.split = !jvp_route_ || c_.on_step || checked;
    ctx.f0 = at::Tensor();
    if (jvp_route_) ctx.jv = probe_jvps(*model_, xp_, res_.outputs, ctx.dirs, &ctx.f0, jvp_mode_);
    ctx.sp = RowGradients{};
    ctx.sb = RowGradients{};
    ctx.k_per = at::Tensor();
    ctx.zb = at::Tensor();
    ctx.split_probes = np_;
    if (!ctx.split) return;
    if (jvp_route_ && explicit_route_ && !c_.on_step) ctx.split_probes = std::min<int64_t>(np_, kCheckedProbes);
    const int64_t sp = ctx.split_probes;
    const double scale = -ctx.lr * ctx.gs / ctx.nb;
    if (jvp_route_ && explicit_route_) {  // the rows serve K_{k,m} only: formed in blocks of probes
      ctx.sb = batch_rows(ctx);
      ctx.k_per = blocked_probe_gram(sp, ctx.sb).mul_(scale);
      return;
    }
    ctx.sp = probe_rows(*model_, xp_.slice(0, 0, sp), res_.outputs.slice(0, 0, sp), explicit_route_,
                        jvp_route_ ? nullptr : &ctx.f0, &rows_workspace_);
    if (explicit_route_) res_.rows_used = rows_workspace_.why;
    ctx.sb = batch_rows(ctx);
    if (c_.project > 0) {
      ctx.zb = project_rows(projection_, ctx.sb);
      ctx.k_per = at::mm(project_rows(projection_, ctx.sp), ctx.zb.t()).mul_(scale);  // K~_{k,m}
    } else {
      ctx.k_per = row_gram(ctx.sp, ctx.sb).mul_(scale);  // K_{k,m}: [P*C, M]
    }
  }

  /// The batch's loss rows at w_k, as the step computed them (its masks, batch statistics).
  RowGradients batch_rows(const StepContext& ctx) {
    const models::TrainingForward batch_forward(*model_, ctx.batch.context);
    return loss_rows(*model_, ctx.batch.x, ctx.batch.y, ctx.loss, explicit_route_);
  }

  /// [sp*C, M]: the first sp probes' rows against the batch's, the probes' rows formed a block of
  /// probes at a time in the reused workspace (at most rows_memory bytes of them at once).
  at::Tensor blocked_probe_gram(int64_t sp, const RowGradients& sb) {
    const int64_t nc = res_.outputs.size(1);
    const int64_t per_probe = std::max<int64_t>(1, nc * sb.jacobian.size(1) * sb.jacobian.element_size());
    const int64_t block = std::max<int64_t>(1, c_.rows_memory / per_probe);
    at::Tensor k = at::empty({sp * nc, sb.jacobian.size(0)}, at::kDouble);
    for (int64_t p0 = 0; p0 < sp; p0 += block) {
      const int64_t p1 = std::min(sp, p0 + block);
      const RowGradients rows = probe_rows(*model_, xp_.slice(0, p0, p1), res_.outputs.slice(0, p0, p1),
                                           /*explicit_route=*/true, nullptr, &rows_workspace_);
      k.slice(0, p0 * nc, p1 * nc).copy_(row_gram(rows, sb));
    }
    res_.rows_used = rows_workspace_.why;
    return k;
  }

  /// A segment ends at the end, or where the next analyzed step would cross a stored checkpoint
  /// once it holds segment_seconds of work.
  void end_segment_if_due(StepContext& ctx) {
    const int64_t k = ctx.k, next = k + c_.every;
    const std::vector<int64_t>& stored = traj_.checkpoints();
    const bool long_enough = std::chrono::duration<double>(Clock::now() - seg_started_).count() >= c_.segment_seconds;
    const bool boundary = next >= end_ || (long_enough && std::any_of(stored.begin(), stored.end(), [&](int64_t s) {
                                             return s > k && s <= next;
                                           }));
    if (!boundary) return;
    AnalysisResult seg = res_;  // the header fields; the steps and arrays of this segment below
    seg.steps.assign(res_.steps.begin() + static_cast<std::ptrdiff_t>(seg_row0_), res_.steps.end());
    arrays_.stack_into(seg, seg_row0_);
    seg.f_initial = seg_f0_;
    seg.f_final = res_.f_final;
    seg.kernel_split_error = ctx.seg_split_error;
    seg.kernel_split_checked = ctx.seg_checked;
    finish_analysis(seg, c_);
    seg.seconds = std::chrono::duration<double>(Clock::now() - t0_).count();
    write_segment(c_.progress_dir, seg, c_);
    seg_row0_ = res_.steps.size();
    seg_started_ = Clock::now();
    ctx.seg_split_error = 0;
    ctx.seg_checked = 0;
  }

  void report(int64_t k) {
    const auto now = Clock::now();
    if (now - last_report_ < std::chrono::seconds(2) && k + c_.every < end_) return;
    const double el = std::chrono::duration<double>(now - t0_).count();
    const double done = static_cast<double>(res_.steps.size());
    const double total = static_cast<double>((end_ - begin_ + c_.every - 1) / c_.every);
    spdlog::info("analyzed step {} ({}/{})  r {:.3g}  {:.1f} steps/s  ETA {:.0f}s", k, res_.steps.size(),
                 static_cast<int64_t>(total), res_.steps.back().r, done / el, (total - done) * el / done);
    last_report_ = now;
  }

  AnalysisResult finish() {
    if (progress_) {
      // Every step is in the segments now, the earlier run's and this one's: the result is their
      // join, read back from the files (which hold every number exactly).
      const std::vector<StoredAnalysis> all = open_progress(c_.progress_dir, progress_key_, /*force=*/false);
      AnalysisResult joined = join_parts(all);
      finish_analysis(joined, c_);
      if (res_.verified_steps > 0) gate_updates(joined, c_.run, c_.allow_unverified);
      joined.startup_seconds = res_.startup_seconds;
      joined.seconds = std::chrono::duration<double>(Clock::now() - t0_).count();
      guard_->done();
      return joined;
    }
    arrays_.stack_into(res_);
    finish_analysis(res_, c_);
    if (res_.verified_steps > 0) gate_updates(res_, c_.run, c_.allow_unverified);
    res_.seconds = std::chrono::duration<double>(Clock::now() - t0_).count();
    return res_;
  }

  const AnalyzeConfig& c_;
  const Clock::time_point t0_;
  Clock::time_point last_report_ = Clock::now(), seg_started_ = Clock::now();
  const std::unique_ptr<Trajectory> run_;
  Trajectory& traj_;
  ThreadInfo threads_;
  std::shared_ptr<models::Model> model_;
  int64_t whole_begin_ = 0, whole_end_ = 0, begin_ = 0, end_ = 0, resume_at_ = 0, walk_from_ = 0, np_ = 0;
  bool explicit_route_ = false, jvp_route_ = false, progress_ = false;
  JvpMode jvp_mode_ = JvpMode::kForward;
  RowsWorkspace rows_workspace_;  ///< the explicit route's probe rows, reused from step to step
  Projection projection_;
  OptimizerOptions options_;
  at::Tensor xp_;
  AnalysisResult res_;
  StepArrays arrays_;
  std::map<int64_t, StepVerification> verdicts_;
  VerifiedGradients verified_gradients_{c_.verified_gradients_memory};  ///< the verification's, taken once each
  std::vector<std::shared_ptr<StepTerm>> terms_;
  nlohmann::json progress_key_;
  std::unique_ptr<ProgressGuard> guard_;
  size_t seg_row0_ = 0;  // the current segment's first row
  at::Tensor seg_f0_;
};

}  // namespace

AnalysisResult analyze(const AnalyzeConfig& c) {
  c.validate();
  return Driver(c).run();
}

}  // namespace pathkernel
