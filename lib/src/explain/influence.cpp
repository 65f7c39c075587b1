#include "pathkernel/explain/influence.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/analysis/step_terms.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/train/per_example.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

void set_weights(models::Model& model, const NamedTensors& w) {
  at::NoGradGuard ng;
  std::map<std::string, at::Tensor> by_name(w.begin(), w.end());
  for (const auto& item : model.named_parameters()) item.value().copy_(by_name.at(item.key()));
}

/// The learning rate of the step taken from checkpoint t (the last step's for t = the end).
double rate_at(const Trajectory& traj, int64_t t) {
  const int64_t last = traj.logged_steps();
  return traj.logged_step(std::min(t, last - 1), at::kDouble).lr;
}

at::Tensor squared_norms(const RowGradients& rows) {
  return rows.is_explicit() ? rows.jacobian.pow(2).sum(1) : per_example_grad_sq_norms(rows.signals.taps, 1.0);
}

}  // namespace

InfluenceResult influence(const InfluenceConfig& c) {
  c.validate();
  const auto t0 = Clock::now();
  const std::unique_ptr<Trajectory> run = open_trajectory(c.run);
  Trajectory& traj = *run;
  pin_threads(c.threads);  // after opening the run, which pins its training threads
  auto model = traj.make_model();
  model->to(at::kDouble);
  const bool explicit_route = !factorizable(*model);
  const LossKind loss = traj.loss();
  InfluenceResult res;
  res.route = explicit_route ? "explicit" : "factorized";

  AnalyzeConfig pc;  // the probes by analyze's rules
  pc.split = c.split;
  pc.probes = c.probes;
  pc.balanced = c.balanced;
  pc.probe_indices = c.probe_indices;
  pc.probe_indices_file = c.probe_indices_file;
  const int64_t n_split = traj.split_size(c.split);
  if (n_split == 0) throw InputError(c.run + ": the run has no " + c.split + " split for probes");
  res.probe_indices = choose_probes(
      pc, n_split, c.balanced ? traj.labels(c.split, at::arange(n_split, at::kLong)).contiguous() : at::Tensor());
  const at::Tensor pidx = at::tensor(res.probe_indices, at::kLong);
  const at::Tensor xp = traj.inputs(c.split, pidx, at::kDouble), yp = traj.labels(c.split, pidx);
  for (int64_t i = 0; i < yp.size(0); ++i) res.probe_labels.push_back(yp[i].item<int64_t>());

  const int64_t n_train = traj.split_size("train");
  const int64_t n = c.train_examples > 0 ? std::min(c.train_examples, n_train) : n_train;
  res.train_labels = traj.labels("train", at::arange(n, at::kLong));
  const int64_t last = traj.logged_steps();
  res.checkpoints = c.checkpoints == "all" ? traj.checkpoints() : parse_checkpoint_list(c.checkpoints);
  for (int64_t t : res.checkpoints) {
    if (t > last) {
      throw InputError("--checkpoints: step " + std::to_string(t) + " is past the run's last step " + std::to_string(last));
    }
  }
  traj.check_steps(0, std::max<int64_t>(1, res.checkpoints.back()), 1, false);

  res.influence = at::zeros({xp.size(0), n}, at::kDouble);
  res.self_influence = at::zeros({n}, at::kDouble);
  for (size_t ci = 0; ci < res.checkpoints.size(); ++ci) {
    const int64_t t = res.checkpoints[ci];
    const double lr = rate_at(traj, t);
    res.rates.push_back(lr);
    set_weights(*model, traj.weights_at(t));
    set_buffers(*model, to_double_map(traj.buffers_at(t)));  // BatchNorm's running statistics at t
    const RowGradients sp = loss_rows(*model, xp, yp, loss, explicit_route);
    for (int64_t start = 0; start < n; start += c.chunk) {
      const int64_t len = std::min(c.chunk, n - start);
      const at::Tensor idx = at::arange(start, start + len, at::kLong);
      const RowGradients sb = loss_rows(*model, traj.inputs("train", idx, at::kDouble), traj.labels("train", idx), loss,
                                        explicit_route);
      res.influence.narrow(1, start, len).add_(row_gram(sp, sb), lr);
      res.self_influence.narrow(0, start, len).add_(squared_norms(sb), lr);
    }
    spdlog::info("checkpoint {} ({}/{}): lr {:.3g}, {} test x {} training examples", t, ci + 1, res.checkpoints.size(),
                 lr, xp.size(0), n);
  }
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return res;
}

void write_influence(const InfluenceResult& r, const InfluenceConfig& c) {
  check_output_dir(c.out, c.force, "summary.json", kInfluenceFormat);
  StagedOutput staged(c.out);
  const fs::path out = staged.path();
  save_npy(out / "influence.npy", r.influence);
  save_npy(out / "self_influence.npy", r.self_influence);
  save_npy(out / "probes.npy", at::tensor(r.probe_indices, at::kLong));
  save_npy(out / "probe_labels.npy", at::tensor(r.probe_labels, at::kLong));
  save_npy(out / "train_labels.npy", r.train_labels);
  std::string csv = "step,lr\n";
  for (size_t i = 0; i < r.checkpoints.size(); ++i) csv += fmt::format("{},{:.17g}\n", r.checkpoints[i], r.rates[i]);
  atomic_write(out / "checkpoints.csv", csv, /*durable=*/false);
  const nlohmann::json summary = {
      {"format", kInfluenceFormat},
      {"run", c.run},
      {"probes", r.probe_indices},
      {"split", c.split},
      {"train_examples", r.influence.size(1)},
      {"checkpoints", r.checkpoints},
      {"rates", r.rates},
      {"route", r.route},
      {"orientation", "influence[test example, training example], as Captum's TracInCP"},
      {"seconds", r.seconds},
      {"settings", {{"checkpoints", c.checkpoints}, {"train_examples", c.train_examples}, {"probes", c.probes},
                    {"balanced", c.balanced}, {"probe_indices_file", c.probe_indices_file}, {"chunk", c.chunk},
                    {"threads", c.threads}}}};
  atomic_write(out / "summary.json", summary.dump(2) + "\n");
  staged.commit();
}

}  // namespace pathkernel
