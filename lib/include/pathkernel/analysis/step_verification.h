#pragma once
/// \file step_verification.h
/// Every analyzed step of a recorded run checked against what training logged: the batch loss
/// recomputed from the stored weights, batch and data, and the gradient fingerprint (the applied
/// gradient's norm and its products with fixed +-1 vectors, taken by the recorder when
/// optimizer.step() ran). A loop that switched a module's mode, fed augmented inputs the run did
/// not store, or clipped the gradient trains on something the analysis would not see; such a
/// step fails here, before any output. Native runs are checked by their replay instead.

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/train/optimizer.h"
#include "pathkernel/train/stepper.h"
#include "pathkernel/trajectory/recorded_run.h"  // fingerprint_signs

namespace pathkernel {

namespace models {
class Model;
}
class Trajectory;

/// Thresholds, from measured clean and broken runs (docs/analysis-format.md): clean steps agree
/// to about 1e-7 (loss) and 1e-6 (gradient, of its norm); the broken loops of issue 23 differ
/// by 1e-2 to 3.
inline constexpr double kLossTolerance = 1e-4;      ///< |L - L_logged| / max(|L_logged|, 1e-12)
inline constexpr double kGradientTolerance = 1e-3;  ///< max over the fingerprint of |diff| / |g_logged|
/// |Uopt_round_k| / max_j |Kopt_j|: the part of a step's first-order change that the logged
/// optimizer's update of the recomputed gradient does not give (float rounding in a clean run).
inline constexpr double kUpdateTolerance = 1e-3;

/// One step's verdict.
struct StepVerification {
  int64_t step = 0;
  double loss_error = 0;      ///< relative difference of the recomputed batch loss
  double gradient_error = 0;  ///< largest fingerprint difference over the logged gradient's norm (NaN: none logged)
  double norm_ratio = 1;      ///< recomputed over logged gradient norm
  bool ok = true;
  std::string what;           ///< what disagreed and the likely causes, when !ok
  bool in_float32 = false;    ///< ok only when recomputed in float32, as it trained (verify_steps)
};

/// The float64 batch gradients (and batch losses) the verification computed, kept for the
/// analysis of the same steps: at most `budget_bytes` of tensors (later steps past the budget are
/// not kept). The analysis takes each step's once; the gradient is the one it would form itself
/// (the same weights, buffers, batch, training forward and model).
class VerifiedGradients {
 public:
  explicit VerifiedGradients(int64_t budget_bytes) : budget_(budget_bytes) {}
  /// Keeps step k's gradient when it fits the budget.
  void offer(int64_t k, ParamMap gradient, double loss);
  /// Moves step k's gradient and loss out (true), or leaves them untouched (false: not kept).
  bool take(int64_t k, ParamMap& gradient, double& loss);
  int64_t bytes() const { return used_; }

 private:
  int64_t budget_;
  int64_t used_ = 0;
  std::map<int64_t, std::pair<ParamMap, double>> kept_;
};

/// Checks steps `steps` of a recorded trajectory with `model` (float64, the trajectory's
/// parameter names); a step off in float64 is recomputed in float32 as it trained (a fresh
/// traj.make_model()), and passes when that agrees (float64 rounding alone can flip a ReLU or
/// max-pool kink, and BatchNorm amplifies it). Returns one verdict per step (empty for a
/// trajectory that logs no fingerprints: a trained run). The model's weights are left at the
/// last step checked.
/// With `keep`, each step's float64 gradient and loss go there (model's dtype float64 only).
std::vector<StepVerification> verify_steps(Trajectory& traj, models::Model& model, const std::vector<int64_t>& steps,
                                           LossKind loss, VerifiedGradients* keep = nullptr);

/// The first failed verdicts as one message: each step, what disagreed, the likely causes.
std::string describe_failures(const std::vector<StepVerification>& verdicts, const std::string& run);

/// The update check of a recorded run, after its analysis: a step whose Uopt_round (the first-
/// order change the optimizer's update of the recomputed gradient does not give) exceeds
/// kUpdateTolerance of the run's largest Kopt moved by something else than the logged optimizer
/// (a scheduler changing momentum or betas, weights changed outside optimizer.step()). Marks
/// such steps unverified (StepRow::verified 0) and returns the message naming them, or "".
std::string check_updates(std::vector<StepRow>& steps, const std::string& run);

/// The analyzer's side of the checks, before any work: verify_steps on the steps it analyzes
/// ([begin, end), every c.every-th), a CheckFailedError (exit 4) naming the failures unless
/// c.allow_unverified (then a warning), the counts in `res`. Returns the verdicts by step (empty
/// for a trained run).
std::map<int64_t, StepVerification> verify_analyzed_steps(Trajectory& traj, models::Model& model, int64_t begin,
                                                          int64_t end, const AnalyzeConfig& c, LossKind loss,
                                                          AnalysisResult& res, VerifiedGradients* keep = nullptr);

/// Copies the verdict of row.step (when there is one) into the row's verification columns.
void mark_verified(StepRow& row, const std::map<int64_t, StepVerification>& verdicts);

/// The analyzer's side after its work: check_updates on `res`'s rows, a CheckFailedError unless
/// `allow_unverified`, and the counts recomputed from the rows (a continued analysis reads the
/// earlier segments' rows back).
void gate_updates(AnalysisResult& res, const std::string& run, bool allow_unverified);

}  // namespace pathkernel
