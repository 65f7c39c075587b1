#include "pathkernel/trajectory/replay.h"

#include <ATen/ATen.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/sha256.h"
#include "pathkernel/io/threads.h"

namespace pathkernel {
namespace fs = std::filesystem;

Replayer::Replayer(const std::filesystem::path& run) : dir_(run) {
  manifest_ = dir_.read_manifest();
  // A shared lock: readers together, but no resume while a run is read. A run still training
  // holds the exclusive lock: it is read as far as it goes, and said so.
  lock_ = std::make_unique<DirLock>(dir_.root(), /*exclusive=*/false);
  if (!lock_->held() && !dir_.complete()) {
    spdlog::warn("{}: is still being trained (or resumed); reading the steps it has logged so far", run.string());
  }
  TrainConfig config = train_config_from_json(manifest_.at("config"), dir_.manifest().string());
  const auto& norm = manifest_.at("data").at("normalization");
  if (manifest_.contains("lr_schedule_file") && manifest_["lr_schedule_file"].is_object() &&
      (!fs::exists(dir_.schedule_copy()) ||
       sha256_file(dir_.schedule_copy()) != manifest_["lr_schedule_file"].value("sha256", ""))) {
    throw InputError(dir_.schedule_copy().string() + ": missing or changed since the run was trained (SHA-256 differs "
                     "from the manifest's)");
  }
  ctx_ = make_run_context(config, Normalization{norm.at("mean").get<double>(), norm.at("std").get<double>()},
                          dir_.root().string());
  // Every reader of a run (replay, analyze, explain, influence) works on the data it was trained
  // on: other files (inverted images, say) would give other numbers, "verified" all the same.
  check_data_files(manifest_, *ctx_, dir_.manifest().string(), "reading this run");
  log_ = read_step_log(dir_.steps_log());
  checkpoints_ = dir_.checkpoint_steps();
  if (checkpoints_.empty() || checkpoints_.front() != 0) {
    throw InputError(dir_.checkpoint(0).string() + ": missing; a run needs its step-0 checkpoint to be replayed");
  }
  check_run();
}

void Replayer::check_run() const {
  // Nothing in the run directory is trusted that can be checked against the data and the
  // manifest's own settings before it is used.
  const std::string manifest = dir_.manifest().string(), log = dir_.steps_log().string();
  try {
    const std::string spec = manifest_.at("model").at("spec").get<std::string>();
    if (spec != ctx_->model->spec().str()) {
      throw InputError(manifest + ": model.spec '" + spec.substr(0, 80) + "' and config.model '" + ctx_->config.model +
                       "' (built as " + ctx_->model->spec().str() + ") disagree");
    }
    const auto& data = manifest_.at("data");
    if (data.at("train_examples").get<int64_t>() != ctx_->train.size() ||
        data.at("test_examples").get<int64_t>() != ctx_->test.size()) {
      throw InputError(manifest + ": records " + data.at("train_examples").dump() + " training and " +
                       data.at("test_examples").dump() + " test examples, the data has " +
                       std::to_string(ctx_->train.size()) + " and " + std::to_string(ctx_->test.size()));
    }
    if (manifest_.at("total_steps").get<int64_t>() != ctx_->total_steps) {
      throw InputError(manifest + ": total_steps " + manifest_.at("total_steps").dump() + " does not follow from its config (" +
                       std::to_string(ctx_->total_steps) + ")");
    }
  } catch (const nlohmann::json::exception& e) {
    throw InputError(manifest + ": malformed (" + std::string(e.what()) + ")");
  }
  if (dir_.complete() && (logged_steps() < checkpoints_.back() || logged_steps() < ctx_->total_steps)) {
    throw InputError(log + ": holds " + std::to_string(logged_steps()) + " steps, but the run is complete (" +
                     dir_.complete_marker().string() + ") with " + std::to_string(ctx_->total_steps) +
                     " steps and a checkpoint at step " + std::to_string(checkpoints_.back()) +
                     ": the step log was cut short or damaged");
  }
  if (logged_steps() > ctx_->total_steps) {
    throw InputError(log + ": holds " + std::to_string(logged_steps()) + " steps, the run has " +
                     std::to_string(ctx_->total_steps) + " (records after the end)");
  }
  if (checkpoints_.back() > ctx_->total_steps) {
    throw InputError(dir_.checkpoint(checkpoints_.back()).string() + ": beyond the run's " +
                     std::to_string(ctx_->total_steps) + " steps");
  }
  check_step_records(log_, ctx_->train.size(), ctx_->config.batch, log);
}

void Replayer::check_against_checkpoint(int64_t step) {
  // The weights replayed from the step before must be those stored for this step: the step log
  // and the manifest are what made them. A changed batch, rate or model shows up here.
  const NamedTensors stored = load_tensor_dict(dir_.checkpoint(step));
  const NamedTensors now = state_dict_of(*ctx_->model);
  double diff = 0, scale = 0;
  bool equal = stored.size() == now.size();
  for (size_t i = 0; equal && i < now.size(); ++i) {
    if (stored[i].first != now[i].first || stored[i].second.sizes() != now[i].second.sizes()) {
      equal = false;
      break;
    }
    if (!at::equal(stored[i].second, now[i].second)) {
      const double d = (stored[i].second.to(at::kDouble) - now[i].second.to(at::kDouble)).abs().max().item<double>();
      diff = std::isnan(d) || std::isnan(diff) ? NAN : std::max(diff, d);
      scale = std::max(scale, now[i].second.to(at::kDouble).abs().max().item<double>());
    }
  }
  if (equal && !(diff <= 1e-5 * std::max(scale, 1e-30))) equal = false;  // NaN is a mismatch too
  if (!equal) {
    throw ReplayMismatchError("step " + std::to_string(step - 1) + ": replaying the step log does not reproduce " +
                              dir_.checkpoint(step).string() + (diff > 0 ? " (weights differ by up to " +
                              std::to_string(diff) + ")" : "") +
                              "; the step log, the manifest or the checkpoint was changed");
  }
  if (diff > 0 && !rounding_warned_) {
    spdlog::warn("{}: the replay differs from the stored checkpoint {} by float rounding ({:.2e}): another BLAS "
                 "kernel or thread count than training; the stored checkpoints are used",
                 dir_.root().string(), step, diff);
    rounding_warned_ = true;
  }
}

void Replayer::load_checkpoint(int64_t step) {
  dir_.check_digest(step);
  load_weights(*ctx_->model, load_tensor_dict(dir_.checkpoint(step)), dir_.checkpoint(step).string());
  ctx_->restore(load_trainer_state(dir_.state(step)), step, dir_.state(step).string());
  current_ = step;
}

Replayer::LoggedStep Replayer::logged_step(int64_t k, at::ScalarType dtype) const {
  const auto& rec = log_.at(static_cast<size_t>(k));
  LoggedStep s;
  s.lr = rec.at("lr").get<double>();
  s.indices = at::tensor(rec.at("batch").get<std::vector<int64_t>>(), at::kLong);
  s.x = to_inputs(ctx_->train.images.index_select(0, s.indices), dtype, ctx_->normalization);
  s.y = ctx_->train.labels.index_select(0, s.indices);
  s.settings.options = ctx_->stepper->optimizer().options();  // one setting for the whole run
  s.context = ctx_->step_context(k, s.indices.size(0), false);  // its Dropout masks drawn again, BatchNorm on copies
  return s;
}

StepRecord Replayer::replay_step(int64_t k) {
  const ScopedThreads training_threads(ctx_->config.threads);  // as trained: bit for bit
  const auto& rec = log_.at(static_cast<size_t>(k));
  const std::vector<int64_t> idx = rec.at("batch").get<std::vector<int64_t>>();
  const auto [x, y] = ctx_->batch(idx);
  const models::TrainingForward training(*ctx_->model, ctx_->step_context(k, x.size(0), true));  // as trained
  StepRecord r = ctx_->stepper->step(x, y, rec.at("lr").get<double>(), /*per_example=*/false);
  r.step = k;
  current_ = k + 1;
  return r;
}

void Replayer::seek(int64_t step) {
  const int64_t last = std::max(logged_steps(), checkpoints_.back());
  if (step < 0 || step > last) {
    throw InputError(dir_.root().string() + ": step " + std::to_string(step) + " is out of range (the run has steps 0.." +
                     std::to_string(last) + ")");
  }
  auto it = std::upper_bound(checkpoints_.begin(), checkpoints_.end(), step);
  const int64_t base = *(it - 1);
  if (step > 0 && base == step && current_ == step - 1 && step <= logged_steps()) {
    replay_step(current_);            // walking into a checkpoint: replay it and check the file
    check_against_checkpoint(step);
    load_checkpoint(step);            // then go on from the stored weights and optimizer state
    return;
  }
  if (!(current_ >= base && current_ <= step)) load_checkpoint(base);
  if (step > logged_steps() && step != current_) {
    throw InputError(dir_.steps_log().string() + ": ends at step " + std::to_string(logged_steps()) +
                     "; cannot replay to step " + std::to_string(step));
  }
  while (current_ < step) replay_step(current_);
}

NamedTensors Replayer::weights_at(int64_t step) {
  seek(step);
  NamedTensors out = named_parameters_of(*ctx_->model);
  for (auto& [name, t] : out) t = t.clone();
  return out;
}

NamedTensors Replayer::state_dict_at(int64_t step) {
  seek(step);
  NamedTensors out = state_dict_of(*ctx_->model);
  for (auto& [name, t] : out) t = t.clone();
  return out;
}

NamedTensors Replayer::buffers_at(int64_t step) {
  seek(step);
  NamedTensors out = named_buffers_of(*ctx_->model);
  for (auto& [name, t] : out) t = t.clone();
  return out;
}

void Replayer::compare_optimizer_state(const TrainerState& stored, int64_t step) const {
  const std::string where = "checkpoint " + std::to_string(step) + ": optimizer state ";
  const OptimizerState now = ctx_->stepper->optimizer().state();
  if (stored.optimizer_steps != ctx_->stepper->optimizer().steps()) {
    throw ReplayMismatchError(where + "records " + std::to_string(stored.optimizer_steps) + " updates, the replay made " +
                              std::to_string(ctx_->stepper->optimizer().steps()));
  }
  if (now.size() != stored.optimizer_state.size()) {
    throw ReplayMismatchError(where + "has " + std::to_string(stored.optimizer_state.size()) +
                              " slots, the replay has " + std::to_string(now.size()));
  }
  for (size_t s = 0; s < now.size(); ++s) {
    const auto& [slot, tensors] = now[s];
    const auto& [stored_slot, stored_tensors] = stored.optimizer_state[s];
    if (slot != stored_slot || tensors.size() != stored_tensors.size()) {
      throw ReplayMismatchError(where + "slot '" + stored_slot + "' does not match the replay's '" + slot + "'");
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].first != stored_tensors[i].first || !at::equal(tensors[i].second, stored_tensors[i].second)) {
        throw ReplayMismatchError(where + "'" + slot + "." + tensors[i].first + "' is not reproduced");
      }
    }
  }
}

int64_t Replayer::verify(const std::function<void(int64_t, int64_t)>& progress) {
  int64_t compared = 0;
  const int64_t total = std::min<int64_t>(checkpoints_.back(), logged_steps());
  if (total == 0) {
    throw InputError(dir_.root().string() + ": nothing to verify: " +
                     (logged_steps() == 0 ? "the step log is empty" : "no checkpoint after step 0"));
  }
  for (size_t c = 0; c + 1 < checkpoints_.size(); ++c) {
    const int64_t from = checkpoints_[c], to = checkpoints_[c + 1];
    if (to > logged_steps()) break;  // a run still training (check_run refuses this on a complete one)
    ++compared;
    load_checkpoint(from);
    for (int64_t k = from; k < to; ++k) {
      const StepRecord r = replay_step(k);
      const double logged = log_[static_cast<size_t>(k)].at("loss").get<double>();
      if (r.loss != logged) {
        throw ReplayMismatchError("step " + std::to_string(k) + " differs: replayed loss " + std::to_string(r.loss) +
                                  ", logged " + std::to_string(logged) + " (replayed from checkpoint " +
                                  std::to_string(from) + ")");
      }
      if (progress) progress(k + 1, total);
    }
    const NamedTensors stored = load_tensor_dict(dir_.checkpoint(to));
    const NamedTensors now = state_dict_of(*ctx_->model);
    if (stored.size() != now.size()) {
      throw InputError(dir_.checkpoint(to).string() + ": holds " + std::to_string(stored.size()) + " tensors, the model has " +
                       std::to_string(now.size()));
    }
    for (size_t i = 0; i < now.size(); ++i) {
      if (stored[i].first != now[i].first || stored[i].second.sizes() != now[i].second.sizes()) {
        throw InputError(dir_.checkpoint(to).string() + ": tensor " + std::to_string(i) + " is '" + stored[i].first +
                         "' " + c10::str(stored[i].second.sizes()) + ", the model's is '" + now[i].first + "' " +
                         c10::str(now[i].second.sizes()));
      }
      if (stored[i].first != now[i].first || !at::equal(stored[i].second, now[i].second)) {
        const double diff = (stored[i].second.to(at::kDouble) - now[i].second.to(at::kDouble)).abs().max().item<double>();
        throw ReplayMismatchError("checkpoint " + std::to_string(to) + " is not reproduced: '" + now[i].first +
                                  "' differs by up to " + std::to_string(diff) + " after replaying steps " +
                                  std::to_string(from) + ".." + std::to_string(to - 1) + " (first differing step <= " +
                                  std::to_string(to - 1) + ")");
      }
    }
    compare_optimizer_state(load_trainer_state(dir_.state(to)), to);
  }
  return compared;
}

}  // namespace pathkernel
