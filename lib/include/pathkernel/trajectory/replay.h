#pragma once
/// \file replay.h
/// Reconstructs the weights at any step of a run from the nearest earlier checkpoint and the
/// step log, by re-running the logged steps through the same Stepper that trained them.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/run_context.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {

class Replayer {
 public:
  /// Opens a run directory: reads the manifest and step log, loads the data and builds the model
  /// with the run's settings and threads. Throws InputError for a missing or malformed run.
  explicit Replayer(const std::filesystem::path& run);

  /// Number of steps in the step log (the weights exist for steps 0 .. logged_steps()).
  int64_t logged_steps() const { return static_cast<int64_t>(log_.size()); }
  const std::vector<int64_t>& checkpoints() const { return checkpoints_; }
  const RunDir& dir() const { return dir_; }
  const nlohmann::json& manifest() const { return manifest_; }
  const std::vector<nlohmann::json>& step_log() const { return log_; }
  RunContext& context() { return *ctx_; }

  /// Puts the weights (and optimizer state) of step `step` into the model: loads the nearest
  /// checkpoint at or before it (unless the model already holds an earlier state of the same
  /// stretch) and replays the logged steps. Walking from step c - 1 into a checkpoint c, the
  /// replayed weights are checked against the stored ones (ReplayMismatchError if the step log
  /// or manifest no longer matches them). Throws InputError when the step is out of range.
  void seek(int64_t step);
  /// The step whose weights the model holds.
  int64_t current_step() const { return current_; }
  /// The weights (parameters) at `step` (copies, state_dict order).
  NamedTensors weights_at(int64_t step);
  /// The model's buffers at `step` (a `:bn` model's running statistics and batch counts; copies).
  NamedTensors buffers_at(int64_t step);
  /// The whole state_dict at `step` (parameters and buffers, as a checkpoint holds it; copies).
  NamedTensors state_dict_at(int64_t step);

  /// The logged step k's learning rate and batch: indices int64 [M], inputs [M, ...] in `dtype`
  /// (normalized as in training), labels int64 [M]. The log was checked at construction.
  using LoggedStep = pathkernel::LoggedStep;
  LoggedStep logged_step(int64_t k, at::ScalarType dtype) const;

  /// Replays from each checkpoint to the next and compares bit for bit, and compares each
  /// replayed step's loss with the log. Throws ReplayMismatchError naming the first step that
  /// differs. `progress` is called with (steps replayed, total). Returns the number of
  /// checkpoints compared (after step 0): all of them, except on a run still being trained,
  /// whose log may end before its newest checkpoint.
  int64_t verify(const std::function<void(int64_t, int64_t)>& progress = {});

 private:
  void load_checkpoint(int64_t step);
  /// Checks the manifest and step log against the data and the settings (sizes, batch indices,
  /// rates, records past the end). Throws InputError naming the file and record.
  void check_run() const;
  /// Throws ReplayMismatchError unless the replayed weights equal the stored checkpoint of
  /// `step` (up to float rounding, which is warned about once).
  void check_against_checkpoint(int64_t step);
  /// Throws ReplayMismatchError unless the optimizer's state equals `stored` bit for bit.
  void compare_optimizer_state(const TrainerState& stored, int64_t step) const;
  /// Replays step k (from w_k to w_{k+1}); returns its record.
  StepRecord replay_step(int64_t k);

  RunDir dir_;
  nlohmann::json manifest_;
  std::vector<nlohmann::json> log_;
  std::vector<int64_t> checkpoints_;
  std::unique_ptr<RunContext> ctx_;
  int64_t current_ = -1;
  bool rounding_warned_ = false;
  std::unique_ptr<DirLock> lock_;
};

}  // namespace pathkernel
