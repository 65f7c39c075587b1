#include "pathkernel/explain/explain.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/explain/attribution.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/idx.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/models/model_spec.h"
#include "pathkernel/train/per_example.h"
#include "pathkernel/train/train_config.h"
#include "pathkernel/trajectory/recorded_run.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {
namespace fs = std::filesystem;

namespace {

/// The analysis explain runs: its settings, on the run explain opened.
AnalyzeConfig analysis_config(const ExplainConfig& c, Trajectory* traj) {
  AnalyzeConfig a;
  a.run = c.run;
  a.out = c.out;
  a.split = c.split;
  a.exact_nodes = c.exact_nodes;
  a.probes = c.probes;
  a.outputs = c.output >= 0 ? "class" : "pred";
  a.output_class = c.output;
  a.probe_indices = c.probe_indices;
  a.shard_index = c.shard_index;
  a.shard_count = c.shard_count;
  a.shard_even = c.shard_even;
  a.kernel_route = c.kernel_route;
  a.threads = c.threads;
  a.trajectory = traj;
  return a;
}

/// Exact attribution integrates each step's segment by quadrature, which is exact only where the
/// model is smooth along it: across ReLU or max-pool kinks it converges like 1/Q (off by 2e-2
/// on a ReLU MLP). analyze splits the segments at the kinks (--kinks); explain does not.
void refuse_exact_across_kinks(const ExplainConfig& c, const RunFacts& facts) {
  if (c.exact_nodes <= 0 || facts.model.empty() || c.kernel_route == "torchscript") return;
  const models::ModelSpec spec = models::parse_model_spec(facts.model);
  if (spec.activation == "relu" || spec.activation == "leaky_relu" || spec.kind == "cnn") {
    throw InputError("explain --exact: " + facts.model + " has kinks (" +
                     (spec.kind == "cnn" ? std::string("max-pool") : spec.activation) +
                     "), where the quadrature of the exact kernel is not exact; explain it without --exact, "
                     "or measure the exact kernel with analyze --exact Q --kinks");
  }
}

/// Whether the run is attributed through the optimizer's recursion (aopt_i): memory, a
/// preconditioner, or settings that vary by step or parameter group; or asked for (route backward).
bool through_optimizer(const ExplainConfig& c, const OptimizerOptions& oo, bool settings_vary) {
  return c.route == "backward" || oo.kind != OptimizerKind::kSgd || oo.momentum != 0 || settings_vary;
}

/// The step route's attribution, gathered from the analysis step by step: a_i accumulates
/// K_{k,i} over the steps that drew i, self-influence (a_k / |B_k|) |grad l_i|^2.
struct StepAttribution {
  int64_t n_train;
  bool self_influence;
  at::Tensor attr, attr_exact, drawn, self;
  std::vector<std::vector<int64_t>> drawn_at;

  StepAttribution(int64_t n, bool with_self)
      : n_train(n), self_influence(with_self), drawn(at::zeros({n}, at::kLong)), self(at::zeros({n}, at::kDouble)),
        drawn_at(static_cast<size_t>(n)) {}

  void add(const StepTerms& t) {
    if (!attr.defined()) {
      attr = at::zeros({t.k_per.size(0), n_train}, at::kDouble);
      if (t.kexact_per.defined()) attr_exact = at::zeros_like(attr);
    }
    // index_add_ also handles an example drawn twice in one batch.
    attr.index_add_(1, t.batch, t.k_per);
    if (t.kexact_per.defined()) attr_exact.index_add_(1, t.batch, t.kexact_per);
    drawn.index_add_(0, t.batch, at::ones({t.batch.size(0)}, at::kLong));
    const int64_t* b = t.batch.data_ptr<int64_t>();
    for (int64_t j = 0; j < t.batch.size(0); ++j) drawn_at[static_cast<size_t>(b[j])].push_back(t.step);
    if (self_influence) {
      const RowGradients& rows = *t.batch_rows;
      const at::Tensor sq = rows.is_explicit() ? rows.jacobian.pow(2).sum(1)
                                               : per_example_grad_sq_norms(rows.signals.taps, /*scale=*/1.0);
      // SPEC: (a_k / |B_k|) |grad l_i|^2, the same weight as K_{k,i}.
      self.index_add_(0, t.batch, sq * (t.lr / static_cast<double>(t.batch.size(0))));
    }
  }
};

/// A --probe-part worker's rows of the probes: [begin, end) of the I-th of N parts of n.
std::pair<int64_t, int64_t> part_rows(const ExplainConfig& c, int64_t n) {
  if (c.part_count == 0) return {0, n};
  return {(c.part_index - 1) * n / c.part_count, c.part_index * n / c.part_count};
}

/// The attribution through the optimizer's recursion (aopt_i) over the analyzed steps; a
/// --probe-part worker's over the whole run, for its rows of the probes.
void attribute_by_optimizer(const ExplainConfig& c, Trajectory* traj, const AnalysisResult& an,
                            StepAttribution& sa, ExplainResult& res) {
  const auto [b, e] = part_rows(c, static_cast<int64_t>(an.probe_indices.size()));
  OptimizerAttributionConfig oc;
  oc.run = c.run;
  oc.trajectory = traj;
  oc.probe_indices.assign(an.probe_indices.begin() + b, an.probe_indices.begin() + e);
  oc.split = c.split;
  oc.cols = an.outputs.slice(0, b, e);
  oc.begin = c.part_count > 0 ? an.whole_begin : an.steps.front().step;  // a shard's first step; else 0
  oc.end = c.part_count > 0 ? an.whole_end : an.steps.back().step + 1;
  oc.exact_nodes = c.exact_nodes;
  oc.self_influence = c.self_influence;
  oc.kernel_route = c.kernel_route;
  oc.project = c.project;
  oc.project_seed = c.project_seed;
  OptimizerAttribution at = attribute_through_optimizer(oc);
  sa.attr = at.attr;
  sa.attr_exact = at.attr_exact;
  sa.drawn = at.times_drawn;
  if (c.self_influence) sa.self = at.self_influence;
  sa.drawn_at = std::move(at.drawn_at);
  res.project_dims = at.project_dims;
  res.phi_begin = at.phi_begin;
  res.phi_exact_begin = at.phi_exact_begin;
  res.carry = at.carry;
  res.sum_check_in_merge = c.shard_count > 1 || c.part_count > 0;
}

/// Per step, what the kernel view leaves to the update: U (plain SGD) or Uopt_wd + Uopt_round.
/// With running statistics (BatchNorm) their own change U_stats too, which U holds and Uopt's parts do not.
at::Tensor leftover_u(const AnalysisResult& an) {
  at::Tensor u = an.uses_kopt ? an.uopt_wd + an.uopt_round : an.u;
  if (an.uses_kopt && an.u_stats.defined()) u = u + an.u_stats;
  return u;
}

/// The attribution's rows (all the probes, or a --probe-part worker's) and what goes with them.
void fill_attribution(const ExplainConfig& c, const AnalysisResult& an, StepAttribution& sa, ExplainResult& res) {
  const auto [b, e] = part_rows(c, static_cast<int64_t>(an.probe_indices.size()));
  res.drawn_at = std::move(sa.drawn_at);
  res.probe_indices.assign(an.probe_indices.begin() + b, an.probe_indices.begin() + e);
  res.probe_labels.assign(an.probe_labels.begin() + b, an.probe_labels.begin() + e);
  for (int64_t p = b; p < e; ++p) res.outputs.push_back(an.outputs[p][0].item<int64_t>());
  res.attributions = sa.attr;
  res.attributions_exact = sa.attr_exact;
  res.times_drawn = sa.drawn;
  if (c.self_influence) res.self_influence = sa.self;
}

/// A --probe-part worker's result: its rows attributed over the whole run, and its stretch's
/// analysis of every probe, step by step (the join sums the steps as one process does).
void fill_part(const ExplainConfig& c, const AnalysisResult& an, StepAttribution& sa, ExplainResult& res) {
  fill_attribution(c, an, sa, res);
  ProbePart& p = res.part;
  p.index = c.part_index;
  p.count = c.part_count;
  std::tie(p.rows_begin, p.rows_end) = part_rows(c, static_cast<int64_t>(an.probe_indices.size()));
  p.probe_indices = an.probe_indices;
  p.probe_labels = an.probe_labels;
  for (int64_t q = 0; q < an.outputs.size(0); ++q) p.outputs.push_back(an.outputs[q][0].item<int64_t>());
  p.first_step = an.steps.front().step;
  p.last_step = an.steps.back().step;
  p.f_initial = an.f_initial.reshape({-1});
  p.f_final = an.f_final.reshape({-1});
  const at::Tensor u = leftover_u(an);
  p.u = u.reshape({u.size(0), -1});
  p.r = an.r.reshape({an.r.size(0), -1});
  if (sa.attr_exact.defined()) {
    const at::Tensor& ux = an.uses_kopt ? an.uoptexact : an.uexact;
    p.uexact = ux.reshape({ux.size(0), -1});
    for (const auto& s : an.steps) p.max_quad_error = std::max(p.max_quad_error, s.quad_error);
  }
  p.projection_error = an.projection_error;
  res.whole_begin = an.whole_begin;
  res.whole_end = an.whole_end;
  res.first_step = an.whole_begin;
  res.last_step = an.whole_end - 1;
}

/// The explanation's terms and its sum check from the analysis and the attribution.
void fill_result(const ExplainConfig& c, const AnalysisResult& an, StepAttribution& sa, ExplainResult& res) {
  fill_attribution(c, an, sa, res);
  res.f_initial = an.f_initial.reshape({-1});
  res.f_final = an.f_final.reshape({-1});
  res.sum_u = leftover_u(an).sum(0).reshape({-1});
  res.sum_r = an.r.sum(0).reshape({-1});
  const at::Tensor change = res.f_final - res.f_initial;
  const double scale = std::max(1e-300, change.abs().max().item<double>());
  res.sum_error = (change - (sa.attr.sum(1) + res.sum_u + res.sum_r)).abs().max().item<double>() / scale;
  if (sa.attr_exact.defined()) {
    res.sum_uexact = (an.uses_kopt ? an.uoptexact : an.uexact).sum(0).reshape({-1});
    res.sum_error_exact = (change - (sa.attr_exact.sum(1) + res.sum_uexact)).abs().max().item<double>() / scale;
    for (const auto& s : an.steps) res.max_quad_error = std::max(res.max_quad_error, s.quad_error);
  }
  if (c.project > 0) {
    if (!res.through_optimizer) res.project_dims = an.project_dims;
    res.projection_error = an.projection_error;
  }
  res.shard_index = an.shard_index;
  res.shard_count = an.shard_count;
  res.whole_begin = an.whole_begin;
  res.whole_end = an.whole_end;
  res.first_step = an.steps.front().step;
  res.last_step = an.steps.back().step;
}

}  // namespace

namespace {

/// plan_explain of a run pathkernel trained, from its manifest and step log alone: the workers
/// decode the data and check it against the manifest (a run's opening costs about 0.5 s).
ExplainPlan plan_from_manifest(const ExplainConfig& c) {
  const RunFacts facts = run_facts(c.run);
  refuse_exact_across_kinks(c, facts);  // once, before any worker starts
  const RunDir dir(c.run);
  const nlohmann::json manifest = dir.read_manifest();
  int64_t n = 0;
  try {
    n = manifest.at("data").at(c.split == "train" ? "train_examples" : "test_examples").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw InputError(dir.manifest().string() + ": malformed (" + std::string(e.what()) + ")");
  }
  if (n <= 0) throw InputError(c.run + ": the run has no " + c.split + " split for probes");
  ExplainPlan plan;
  plan.through_optimizer = through_optimizer(c, facts.optimizer, facts.settings_vary);
  plan.probe_indices = choose_probes(analysis_config(c, nullptr), n, at::Tensor());  // as the analysis chooses
  plan.steps = facts.logged_steps;
  return plan;
}

}  // namespace

ExplainPlan plan_explain(const ExplainConfig& c) {
  c.validate();
  if (!is_recorded_run(c.run) && c.kernel_route != "torchscript") return plan_from_manifest(c);
  const std::unique_ptr<Trajectory> traj(open_trajectory(c.run, c.kernel_route == "torchscript"));
  const OptimizerOptions oo = traj->optimizer_after(0).options();
  RunFacts facts;
  facts.model = traj->model_spec() == "torchscript" ? "" : traj->model_spec();
  refuse_exact_across_kinks(c, facts);  // once, before any worker starts
  ExplainPlan plan;
  plan.through_optimizer = through_optimizer(c, oo, traj->settings_vary());
  const int64_t n = traj->split_size(c.split);
  if (n == 0) throw InputError(c.run + ": the run has no " + c.split + " split for probes");
  plan.probe_indices = choose_probes(analysis_config(c, traj.get()), n, at::Tensor());  // as the analysis chooses
  plan.steps = traj->logged_steps();
  return plan;
}

ExplainResult explain(const ExplainConfig& c) {
  c.validate();
  const auto t0 = std::chrono::steady_clock::now();
  // The run, opened and decoded once: the analysis, the attribution and the files read it.
  const std::shared_ptr<Trajectory> traj(open_trajectory(c.run, c.kernel_route == "torchscript"));
  AnalyzeConfig a = analysis_config(c, traj.get());
  RunFacts facts;
  facts.train_examples = traj->split_size("train");
  facts.optimizer = traj->optimizer_after(0).options();
  facts.model = traj->model_spec() == "torchscript" ? "" : traj->model_spec();
  facts.settings_vary = traj->settings_vary();
  const OptimizerOptions& oo = facts.optimizer;
  refuse_exact_across_kinks(c, facts);
  ExplainResult res;
  res.trajectory = traj;
  res.optimizer = optimizer_name(oo.kind);
  // Settings that vary by step or parameter group are attributed through the optimizer's terms.
  res.through_optimizer = through_optimizer(c, oo, facts.settings_vary);
  if (c.project > 0 && oo.kind != OptimizerKind::kSgd) {
    throw InputError("--project: Adam's and AdamW's elementwise preconditioner does not commute with a random "
                     "projection; explain this run without --project");
  }
  StepAttribution sa(facts.train_examples, c.self_influence);
  if (c.part_count > 0) {  // a worker of explain --workers through the optimizer: its stretch of the steps
    if (!res.through_optimizer) {
      throw InputError("--probe-part: " + c.run + " is attributed step by step (plain SGD): --workers splits its steps");
    }
    const size_t probes = choose_probes(a, traj->split_size(c.split), at::Tensor()).size();
    if (static_cast<size_t>(c.part_count) > probes || c.part_count > traj->logged_steps()) {
      throw InputError("--probe-part " + std::to_string(c.part_index) + "/" + std::to_string(c.part_count) + ": " +
                       std::to_string(probes) + " probes over " + std::to_string(traj->logged_steps()) +
                       " steps make at most " + std::to_string(std::min<int64_t>(probes, traj->logged_steps())) +
                       " parts (a part needs a probe and a step)");
    }
    a.shard_index = c.part_index;
    a.shard_count = c.part_count;
    a.shard_even = true;
  }
  if (!res.through_optimizer) {  // the step route's split goes through the projection
    a.project = c.project;
    a.project_seed = c.project_seed;
    a.on_step = [&sa](const StepTerms& t) { sa.add(t); };
  }
  const AnalysisResult an = analyze(a);
  if (!an.contiguous || (a.shard_count > 0 ? an.whole_begin : an.steps.front().step) != 0) {
    throw InputError("explain needs every step of the run");
  }
  if (res.through_optimizer) attribute_by_optimizer(c, traj.get(), an, sa, res);
  if (c.part_count > 0) {
    fill_part(c, an, sa, res);
  } else {
    fill_result(c, an, sa, res);
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace pathkernel
