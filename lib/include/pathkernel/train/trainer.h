#pragma once
/// \file trainer.h
/// `pathkernel train`: minibatch SGD on IDX data into a crash-safe run directory.

#include <cstdint>
#include <filesystem>
#include <string>

#include "pathkernel/train/train_config.h"

namespace pathkernel {

/// The end of a run, as written to summary.json.
struct TrainSummary {
  std::string status;  ///< "complete" or "diverged"
  int64_t steps_completed = 0;
  int64_t total_steps = 0;
  double final_loss = 0;     ///< loss of the last step, L_{N-1}(w_{N-1})
  double test_accuracy = 0;  ///< of the final weights
  double seconds = 0;        ///< training time of this process
  std::filesystem::path run;
};

/// Trains a new run into config.out. The directory must not exist or be empty: nothing a user
/// made is overwritten. `command_line` is recorded in the manifest.
/// Throws InputError for bad settings or data, DivergenceError when the loss or weights become
/// non-finite (the run directory stays valid up to the last finite step).
TrainSummary train(const TrainConfig& config, const std::string& command_line);

/// Continues an interrupted run from its last checkpoint, with the settings in its manifest;
/// the result is bit-identical to an uninterrupted run. A complete run is returned as it is.
TrainSummary resume(const std::filesystem::path& run, const std::string& command_line);

}  // namespace pathkernel
