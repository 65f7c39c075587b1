#pragma once
/// \file sweep.h
/// `pathkernel sweep`: the same model, data, initialization and batches trained and analyzed at
/// several learning rates, to answer the note's open question for a given model: does the
/// kernel picture hold outside the small-step regime, and how much do T_c steps carry?

#include <string>
#include <vector>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/train/train_config.h"

namespace pathkernel {

struct SweepConfig {
  TrainConfig train;           ///< everything but lr and out
  AnalyzeConfig analysis;      ///< everything but run, out and steps
  std::vector<double> lrs;
  std::string out;
  std::string command_line;
  void validate() const;
};

/// One learning rate's outcome (a row of sweep.csv).
struct SweepRow {
  double lr = 0;
  std::string status;          ///< complete, or diverged (analyzed up to the divergence)
  int64_t steps = 0;           ///< steps trained and analyzed
  double test_accuracy = 0;    ///< NaN when diverged
  double median_r = 0;
  double tc_share_steps = 0;   ///< share of steps in T_c
  double tc_share_r = 0;       ///< share of sum |R| inside T_c
  double sum_r_over_change = 0;  ///< |sum R| / |f_N - f_0| (summed over probes and outputs)
};

/// Trains and analyzes at every rate into OUT/lr_<rate>/{run,analysis}. A rate whose run and
/// analysis are already complete there is reused, so an interrupted sweep can simply be run
/// again. Writes OUT/sweep.csv and OUT/sweep.png (with gnuplot). Throws InputError.
std::vector<SweepRow> sweep(const SweepConfig& config);

/// The table for stdout.
std::string sweep_table(const std::vector<SweepRow>& rows);

}  // namespace pathkernel
