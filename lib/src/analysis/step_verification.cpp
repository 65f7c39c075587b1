#include "pathkernel/analysis/step_verification.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>

#include <spdlog/spdlog.h>

#include "pathkernel/io/errors.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {

namespace {

/// What disagreed, and what in a training loop makes it so.
std::string diagnosis(const StepVerification& v, bool masked, const LoggedStep& s) {
  const bool loss_off = !(v.loss_error <= kLossTolerance);
  const bool grad_off = !std::isnan(v.gradient_error) && !(v.gradient_error <= kGradientTolerance);
  std::string what;
  if (loss_off) what += fmt::format("the batch loss recomputed from the stored weights and data is off by {:.2g} (relative)", v.loss_error);
  if (grad_off) {
    what += fmt::format("{}the applied gradient's fingerprint is off by {:.2g} of its norm (norm ratio {:.4g})",
                        loss_off ? "; " : "", v.gradient_error, v.norm_ratio);
  }
  if (!s.autocast.empty() && (loss_off || grad_off)) {
    what += fmt::format(". Likely: the step's forward ran under torch.autocast ({}, mixed precision): its loss and "
                        "gradient are {}'s, which a float64 recomputation of the float32 model does not reproduce "
                        "(train in float32 to analyze the run, or --allow-unverified to analyze it marked)",
                        s.autocast, s.autocast);
  } else if (masked && (loss_off || grad_off)) {
    what += ". Likely: the model computed something else on this batch than the stored inputs and the step's "
            "Dropout masks give: the masks file is not the masks training drew, a random operation other than "
            "nn.Dropout ran in the forward (F.dropout), or the loop fed augmented inputs that the recorder did not "
            "store; or the gradient was changed before optimizer.step() in a way the recorder could not record";
  } else if (loss_off) {
    what += ". Likely: the model computed something else on this batch than the stored inputs give: a module's "
            "mode changed (the loop's own model.train() switching Dropout or BatchNorm back on), the loop fed "
            "augmented inputs that the recorder did not store, or the loss is not the manifest's (loss, "
            "label_smoothing)";
  } else if (grad_off && s.accumulated > 1) {
    what += fmt::format(". Likely: the step accumulated {} micro-batches whose losses do not add up to the batch's "
                        "mean (divide each micro-batch's mean loss by {}, micro-batches of equal size: the batch "
                        "gradient is then their sum), or the gradient was changed before optimizer.step()",
                        s.accumulated, s.accumulated);
  } else if (grad_off) {
    what += ". Likely: the gradient was changed between backward() and optimizer.step() in a way the recorder "
            "could not record: clipping by value (clip_grad_value_), per-parameter scaling, or noise (a uniform "
            "scale, such as clip_grad_norm_'s, is recorded and analyzed exactly)";
  }
  return what;
}

}  // namespace

namespace {

/// Step k's loss and gradient fingerprint recomputed with `model` (its dtype: the inputs too)
/// against the logged ones.
StepVerification measure(Trajectory& traj, models::Model& model, int64_t k, LossKind loss, double logged_loss,
                         double logged_norm, const std::vector<double>& logged_proj, VerifiedGradients* keep) {
  {
    at::NoGradGuard ng;
    const NamedTensors w = traj.weights_at(k);
    auto params = model.named_parameters();
    for (const auto& [name, t] : w) params[name].copy_(t);
    auto buffers = model.named_buffers();
    for (const auto& [name, t] : traj.buffers_at(k)) buffers[name].copy_(t);
  }
  const LoggedStep s = traj.logged_step(k, model.parameters().front().scalar_type());
  const std::vector<at::Tensor> params = model.parameters();
  at::Tensor l;
  {
    const models::TrainingForward batch_forward(model, s.context);  // the step's Dropout masks, batch statistics
    l = batch_loss(model.forward(s.x), s.y, loss);
  }
  const std::vector<at::Tensor> g = torch::autograd::grad({l}, params);
  StepVerification v;
  v.step = k;
  const double mine = l.item<double>();
  v.loss_error = std::abs(mine - logged_loss) / std::max(std::abs(logged_loss), 1e-12);
  v.gradient_error = NAN;
  if (!logged_proj.empty()) {
    ParamMap grad;
    size_t i = 0;
    double sq = 0;
    for (const auto& item : model.named_parameters()) {  // the gradient applied: times a clipping scale
      grad[item.key()] = g[i].to(at::kDouble) * s.grad_scale;
      sq += grad[item.key()].pow(2).sum().item<double>();
      ++i;
    }
    const std::vector<double> proj = traj.fingerprint_of(grad);
    const double scale = std::max(logged_norm, 1e-30);
    double worst = std::abs(std::sqrt(sq) - logged_norm) / scale;
    for (size_t j = 0; j < proj.size() && j < logged_proj.size(); ++j) {
      worst = std::max(worst, std::abs(proj[j] - logged_proj[j]) / scale);
    }
    v.gradient_error = worst;
    v.norm_ratio = std::sqrt(sq) / scale;
  }
  v.ok = v.loss_error <= kLossTolerance && (std::isnan(v.gradient_error) || v.gradient_error <= kGradientTolerance);
  if (!v.ok) v.what = diagnosis(v, !s.context.empty(), s);
  if (keep && g.front().scalar_type() == at::kDouble) {
    ParamMap named;
    size_t i = 0;
    for (const auto& item : model.named_parameters()) named[item.key()] = g[i++];
    keep->offer(k, std::move(named), mine);
  }
  return v;
}

}  // namespace

void VerifiedGradients::offer(int64_t k, ParamMap gradient, double loss) {
  int64_t bytes = 0;
  for (const auto& [name, t] : gradient) bytes += static_cast<int64_t>(t.numel() * t.element_size());
  if (used_ + bytes > budget_ || kept_.count(k) != 0) return;
  used_ += bytes;
  kept_.emplace(k, std::make_pair(std::move(gradient), loss));
}

bool VerifiedGradients::take(int64_t k, ParamMap& gradient, double& loss) {
  const auto it = kept_.find(k);
  if (it == kept_.end()) return false;
  gradient = std::move(it->second.first);
  loss = it->second.second;
  for (const auto& [name, t] : gradient) used_ -= static_cast<int64_t>(t.numel() * t.element_size());
  kept_.erase(it);
  return true;
}

std::vector<StepVerification> verify_steps(Trajectory& traj, models::Model& model, const std::vector<int64_t>& steps,
                                           LossKind loss, VerifiedGradients* keep) {
  std::vector<StepVerification> out;
  double logged_loss = 0, logged_norm = 0;
  std::vector<double> logged_proj;
  std::shared_ptr<models::Model> single;  // the run's model in float32, as it trained
  for (int64_t k : steps) {
    if (!traj.logged_fingerprint(k, logged_loss, logged_norm, logged_proj)) return {};
    StepVerification v = measure(traj, model, k, loss, logged_loss, logged_norm, logged_proj, keep);
    if (!v.ok && model.parameters().front().scalar_type() != at::kFloat) {
      // float64 rounds differently from training's float32: where that alone moves the gradient
      // past the tolerance (a ReLU or max-pool kink flips, BatchNorm divides by a small spread),
      // the step recomputed in float32, as it trained, must agree instead.
      if (!single) single = traj.make_model();
      StepVerification v32 = measure(traj, *single, k, loss, logged_loss, logged_norm, logged_proj, nullptr);
      if (v32.ok) {
        v = std::move(v32);
        v.in_float32 = true;
      }
    }
    out.push_back(std::move(v));
  }
  return out;
}

std::string describe_failures(const std::vector<StepVerification>& verdicts, const std::string& run) {
  std::string msg;
  int64_t failed = 0;
  for (const auto& v : verdicts) {
    if (v.ok) continue;
    if (++failed <= 3) msg += fmt::format("\n  step {}: {}", v.step, v.what);
  }
  if (failed == 0) return "";
  return fmt::format("{}: {} of {} analyzed steps are not the logged optimizer's update of the logged batch, as far "
                     "as the recomputed loss and gradient tell (the analysis would explain a trajectory it cannot "
                     "verify):{}{}\n  analyze --allow-unverified analyzes anyway and marks those steps (steps.csv "
                     "column verified)",
                     run, failed, verdicts.size(), msg, failed > 3 ? fmt::format("\n  ... and {} more", failed - 3) : "");
}

std::string check_updates(std::vector<StepRow>& steps, const std::string& run) {
  double kopt = 0;
  for (const auto& s : steps) kopt = std::max(kopt, s.kopt_norm);
  std::vector<const StepRow*> off;
  for (auto& s : steps) {
    if (s.verified < 0) continue;  // not a checked step
    if (!(s.uopt_round_norm <= kUpdateTolerance * kopt)) {
      s.verified = 0;
      off.push_back(&s);
    }
  }
  if (off.empty()) return "";
  std::string list;
  for (size_t i = 0; i < off.size() && i < 3; ++i) {
    list += fmt::format("\n  step {}: the logged optimizer's update of the recomputed gradient leaves {:.2g} of the "
                        "run's largest kernel term unexplained (Uopt_round)", off[i]->step,
                        off[i]->uopt_round_norm / std::max(kopt, 1e-300));
  }
  return fmt::format("{}: {} analyzed steps moved the weights otherwise than the logged optimizer would:{}{}\n  "
                     "Likely: the optimizer's settings changed during training without being recorded (a scheduler "
                     "changing momentum or betas, such as OneCycleLR's cycle_momentum), or the weights were changed "
                     "outside optimizer.step()\n  analyze --allow-unverified analyzes anyway and marks those steps",
                     run, off.size(), list, off.size() > 3 ? fmt::format("\n  ... and {} more", off.size() - 3) : "");
}

namespace {

/// The part of a failure message to log when the analysis goes on (the flag hint dropped).
std::string without_hint(const std::string& failures) {
  return failures.substr(0, failures.find("\n  analyze --allow"));
}

}  // namespace

std::map<int64_t, StepVerification> verify_analyzed_steps(Trajectory& traj, models::Model& model, int64_t begin,
                                                          int64_t end, const AnalyzeConfig& c, LossKind loss,
                                                          AnalysisResult& res, VerifiedGradients* keep) {
  std::vector<int64_t> analyzed;
  for (int64_t k = begin; k < end; k += c.every) analyzed.push_back(k);
  std::map<int64_t, StepVerification> verdicts;
  const std::vector<StepVerification> checked = verify_steps(traj, model, analyzed, loss, keep);
  if (checked.empty()) return verdicts;
  const std::string failures = describe_failures(checked, c.run);
  if (!failures.empty() && !c.allow_unverified) throw CheckFailedError(failures);
  if (!failures.empty()) spdlog::warn("{}", without_hint(failures));
  res.verified_steps = static_cast<int64_t>(checked.size());
  for (const auto& v : checked) {
    res.unverified_steps += v.ok ? 0 : 1;
    res.float32_steps += v.ok && v.in_float32 ? 1 : 0;
    verdicts[v.step] = v;
  }
  return verdicts;
}

void mark_verified(StepRow& row, const std::map<int64_t, StepVerification>& verdicts) {
  const auto v = verdicts.find(row.step);
  if (v == verdicts.end()) return;
  row.verify_loss_error = v->second.loss_error;
  row.verify_gradient_error = v->second.gradient_error;
  row.verified = !v->second.ok ? 0 : v->second.in_float32 ? 2 : 1;
}

void gate_updates(AnalysisResult& res, const std::string& run, bool allow_unverified) {
  const std::string failures = check_updates(res.steps, run);
  if (!failures.empty() && !allow_unverified) throw CheckFailedError(failures);
  if (!failures.empty()) spdlog::warn("{}", without_hint(failures));
  res.verified_steps = 0;
  res.unverified_steps = 0;
  res.float32_steps = 0;
  for (const auto& s : res.steps) {
    res.verified_steps += s.verified >= 0 ? 1 : 0;
    res.unverified_steps += s.verified == 0 ? 1 : 0;
    res.float32_steps += s.verified == 2 ? 1 : 0;
  }
}

}  // namespace pathkernel
