#pragma once
/// \file step_terms.h
/// The analysis as a pipeline of step terms. `analyze()` is a driver: for every step it loads
/// the shared per-step context (StepContext: the weights at k and k + 1, the batch, its rate and
/// settings, the probes' outputs, the batch gradient, the probes' products with every direction
/// the terms asked for, the per-example rows) and hands it to each term in turn. A term is one
/// family of quantities (first order F, K, U and R; the optimizer's Kopt and Uopt; second order
/// S; the kink walk; the exact kernel; sharpness; the gradient signals): it owns its steps.csv
/// columns, its arrays and the tallies of its checks, and reads the context, not other terms.
///
/// Adding a quantity: a class deriving from StepTerm, and one line, either in standard_terms()
/// (step_terms.cpp) or, from outside the library, in AnalyzeConfig::extra_terms. A term that
/// is not one of the standard ones writes its values as extra steps.csv columns
/// (StepRow::extra): docs/architecture.md has a worked example.

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/analysis/kinks.h"
#include "pathkernel/analysis/projection.h"
#include "pathkernel/analysis/step_verification.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {

/// The per-step [P, C] terms as the steps are analyzed, one list per array of AnalysisResult
/// (the optional ones stay empty when not computed).
struct StepArrays {
  std::vector<at::Tensor> d, f, k, u, r, s, kopt, uopt_wd, uopt_round, kexact, uexact, koptexact, uoptexact, u_stats;

  /// Stacks the steps from row `from` on into res's arrays ([steps, P, C]; undefined when empty).
  void stack_into(AnalysisResult& res, size_t from = 0) const;
};

/// What every term reads. The fields above the line are fixed for the analysis; the rest are
/// step k's, filled by the driver in the order of the phases below.
struct StepContext {
  StepContext(const AnalyzeConfig& c, Trajectory& t, models::Model& m, AnalysisResult& res, LossKind l,
              const at::Tensor& probes, const at::Tensor& columns, int64_t n_probes, int64_t n_cols, bool explicit_rows,
              bool forward_mode, const Projection& proj)
      : config(c), traj(t), model(m), result(res), loss(l), xp(probes), cols(columns), np(n_probes), nc(n_cols),
        explicit_route(explicit_rows), jvp_route(forward_mode), projection(proj) {}

  const AnalyzeConfig& config;
  Trajectory& traj;
  models::Model& model;  ///< float64; at w_k between terms (a term that moves it moves it back)
  AnalysisResult& result;
  LossKind loss = LossKind::kCrossEntropy;
  const at::Tensor& xp;    ///< the probes' inputs
  const at::Tensor& cols;  ///< int64 [P, C]: the logit each column holds
  int64_t np = 0, nc = 0;
  bool explicit_route = false, jvp_route = false;
  JvpMode jvp_mode = JvpMode::kForward;  ///< with jvp_route: how J v is formed
  const Projection& projection;
  OptimizerOptions options;     ///< the run's optimizer as at its first analyzed step
  bool memory = false;          ///< earlier gradients enter the update: every step from 0 is walked
  bool sgd_sources = false;     ///< U's SGD sources (U_wd, U_mom) apply
  int64_t whole_begin = 0;      ///< the whole range's first step (shards count from it)
  const std::map<int64_t, StepVerification>* verdicts = nullptr;  ///< a recorded run's checked steps
  // ------------------------------------------------------------------------------------------
  int64_t k = 0;
  LoggedStep batch;
  double lr = 0, gs = 1, nb = 1;     ///< a_k, the recorded gradient scale, |B_k|
  ParamMap w0, w1, dw;               ///< float64; dw = w_{k+1} - w_k (w1, dw: analyzed steps)
  ParamMap b0;                       ///< the model's running statistics after k steps (empty: none)
  ParamMap grad_l, applied;          ///< grad L_k(w_k); the gradient applied (gs * grad L_k)
  double loss_before = 0, loss_after = 0;
  at::Tensor f0, f1;                 ///< the probes' outputs [P, num_classes] at w_k, w_{k+1}
  at::Tensor d;                      ///< D = f(w_{k+1}) - f(w_k), [P, C]
  /// U_stats = f(w_{k+1}; b_{k+1}) - f(w_{k+1}; b_k), [P, C]: the running statistics' change
  /// (BatchNorm); undefined for a model without running statistics.
  at::Tensor u_stats;
  bool split = false;                ///< the per-example split is formed on this step
  int64_t split_probes = 0;          ///< with split: for the first split_probes probes (all but a check's)
  RowGradients sp, sb;               ///< with split: probe rows, batch loss rows
  at::Tensor k_per, zb;              ///< with split: K_{k,m} [P*C, M]; the batch rows projected
  /// Set by the terms for the ones after them (the order of standard_terms()):
  at::Tensor f, k_direct, r;         ///< F = J dw, -a_k J grad L_k applied, R = D - F: [P, C]
  const ParamMap* kernel_dir = nullptr;  ///< the optimizer's kernel direction (with Kopt)
  StepKinks kinks;                   ///< the kink walk (with --kinks)
  at::Tensor kex_per;                ///< the exact kernel's per-example split (with --exact)
  /// The segment's tallies of the kernel-split check (reset where a segment ends).
  double seg_split_error = 0;
  int64_t seg_checked = 0;

  /// In prepare(): asks for the probes' products with v (kept alive by the caller for the step).
  void need(const ParamMap& v) { dirs.push_back(&v); }
  /// In compute(): J_p v as [P, C] for a direction asked for.
  at::Tensor product(const ParamMap& v) const;
  /// The columns of a [P, num_classes] output.
  at::Tensor select(const at::Tensor& full) const { return full.gather(1, cols); }

  std::vector<const ParamMap*> dirs;  ///< (the driver's) directions asked for, in order
  std::vector<at::Tensor> jv;         ///< (the driver's) forward-mode products, one per direction
};

/// One family of per-step quantities. The phases of an analyzed step, for every term in order:
/// load (before the driver reads w_{k+1}: a trajectory is walked forwards), prepare (w0, w1,
/// dw, the losses, grad_l and applied are there; ask for directions), then, once the products
/// and rows are formed, compute. Steps that are not analyzed but must be walked (optimizers with
/// memory) get walk().
class StepTerm {
 public:
  virtual ~StepTerm() = default;
  /// Once, before the first step (after the probes are chosen).
  virtual void start(StepContext& /*ctx*/) {}
  virtual void walk(StepContext& /*ctx*/) {}
  virtual void load(StepContext& /*ctx*/) {}
  virtual void prepare(StepContext& /*ctx*/) {}
  /// Step k's values: the row's fields (or StepRow::extra columns) and arrays.
  virtual void compute(StepContext& ctx, StepRow& row, StepArrays& arrays) = 0;
};

/// The terms every analysis runs, in order (one line each).
std::vector<std::shared_ptr<StepTerm>> standard_terms(const AnalyzeConfig& config);

/// Helpers the driver and the terms share.
ParamMap to_double_map(const NamedTensors& t);
/// Copies weights by parameter name into the model.
void set_weights(models::Model& model, const ParamMap& w);
/// Copies buffers (running statistics) by name into the model; nothing for an empty map.
void set_buffers(models::Model& model, const ParamMap& b);
at::Tensor forward_nograd(models::Model& model, const at::Tensor& x);
/// grad L(w) of the batch for the model's current weights, by parameter name; with `value`, L(w)
/// itself from the same forward.
ParamMap batch_gradient(models::Model& model, const at::Tensor& xb, const at::Tensor& yb, LossKind loss,
                        double* value = nullptr);

/// P_k of step k in float64 by parameter name (empty: the identity), from the optimizer's state
/// after step k and, for Adadelta, the state before it.
ParamMap step_preconditioner(Trajectory& traj, int64_t k, OptimizerKind kind);

}  // namespace pathkernel
