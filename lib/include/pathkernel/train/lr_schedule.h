#pragma once
/// \file lr_schedule.h
/// Per-step learning rates. Spec grammar: `[warmup:W+]BASE`, BASE one of
///   constant | step:EVERY:GAMMA | cosine[:LR_MIN] | file:PATH
/// - step:EVERY:GAMMA multiplies the rate by GAMMA every EVERY steps;
/// - cosine anneals from the base rate to LR_MIN (default 0) over the run's steps;
/// - file:PATH reads one rate per line (at least one per step; `#` starts a comment);
/// - warmup:W scales the first W steps linearly: step k gets (k+1)/W of the rate.

#include <cstdint>
#include <string>
#include <vector>

namespace pathkernel {

class LrSchedule {
 public:
  /// Parses `spec` for a base rate and a run of `total_steps`. Throws InputError on a bad spec,
  /// an unreadable or short file, or a step whose rate is not finite and positive (a decay that
  /// underflows, a growth that overflows).
  /// A relative `file:PATH` is read from `base_dir` when it is given (a run's own copy).
  LrSchedule(const std::string& spec, double base_lr, int64_t total_steps, const std::string& base_dir = "");

  /// Learning rate a_k of step k (0-based).
  double at(int64_t step) const;
  const std::string& spec() const { return spec_; }

 private:
  void check_rates() const;

  std::string spec_;
  std::string kind_;
  double base_ = 0, gamma_ = 1, lr_min_ = 0;
  int64_t every_ = 1, warmup_ = 0, total_ = 0;
  std::vector<double> table_;
};

}  // namespace pathkernel
