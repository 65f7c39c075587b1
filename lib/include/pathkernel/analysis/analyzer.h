#pragma once
/// \file analyzer.h
/// `pathkernel analyze`: replays a run and splits every step's change of the probe outputs into
/// kernel term K, update term U and Taylor residual R (docs/spec.md), in float64.

#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <string>
#include <vector>

namespace pathkernel {

struct RowGradients;
class StepTerm;
class Trajectory;

/// What the analyzer hands a per-step hook: enough to attribute a step to training examples
/// (plain SGD; with memory or a preconditioner see attribution.h).
struct StepTerms {
  int64_t step = 0;
  double lr = 0;                   ///< a_k, times a recorded gradient scale (clipping) when there is one
  const at::Tensor& batch;         ///< int64 [M]: the example indices of B_k
  const at::Tensor& k_per;         ///< float64 [P*C, M]: K_{k,m} for every probe row and example
  const at::Tensor& kexact_per;    ///< the same with the exact path kernel (undefined without exact)
  const RowGradients* batch_rows;  ///< the batch's per-example loss gradients at w_k
};

struct AnalyzeConfig {
  std::string run;                 ///< run directory written by `pathkernel train`
  std::string out;                 ///< analysis directory (must not exist or be empty unless force)
  int64_t probes = 64;             ///< number of probe images, evenly spaced over the split
  /// With `probes`: N/C probes of each class (the first N mod C classes one more), evenly
  /// spaced within the class, in index order.
  bool balanced = false;
  std::string probe_indices_file;  ///< or: one index per line
  std::vector<int64_t> probe_indices;  ///< or: these indices (library use; checked against the split)
  std::string split = "test";      ///< test or train
  std::string outputs = "all";     ///< all (every logit), true (the label's), pred (final prediction's),
                                   ///< class (logit `output_class` of every probe)
  int64_t output_class = 0;        ///< with outputs == "class"
  int64_t step_begin = 0;          ///< first step analyzed
  int64_t step_end = -1;           ///< one past the last (-1: the end of the run)
  int64_t every = 1;               ///< analyze every S-th step
  /// --shard I/N (shard_count > 0): only the I-th (1-based) of N contiguous parts of the range,
  /// split at stored checkpoints (shards.h); `pathkernel merge` joins the parts.
  int64_t shard_index = 0, shard_count = 0;
  /// With shard_count: split the range evenly rather than at stored checkpoints (a shard then
  /// replays from the checkpoint before its first step; --workers, whose shards run on one
  /// machine, balances them so). Not a setting of the analysis: the numbers are the same.
  bool shard_even = false;
  /// --workers N (> 1): the command line analyzes the range as N shards in N processes of its own
  /// at once and joins them (pathkernel analyze; the library's analyze() runs one process).
  int64_t workers = 1;
  bool second_order = false;       ///< also S = 1/2 dw^T H dw (exact, double backward)
  /// auto | factorized | explicit (per-row Jacobians, slow) | torchscript (a recorded run's own
  /// TorchScript model through autograd, even where the recorder recognized a zoo model).
  std::string kernel_route = "auto";
  /// How the probes' products with each step's directions (F, K, Kopt, U's parts, the exact
  /// nodes) are formed: auto | forward (forward-mode AD) | double-backward | rows (the probes'
  /// gradient rows dotted with the direction: the reference). auto: rows for a factorized model
  /// of Linear layers only, forward mode for a zoo model with a convolution, and for any other
  /// model forward mode where LibTorch covers its operators, else the double backward.
  std::string products = "auto";
  /// The explicit route's per-example split (explain on a recorded model) forms the probes' rows
  /// in blocks of probes taking at most this many bytes (at least one probe per block), so that
  /// memory stays bounded however many probes: [P*C, n_params] rows would be 6 GiB for a 1.2M
  /// model at 64 probes.
  int64_t rows_memory = int64_t{256} << 20;
  /// A recorded run's verification computes each analyzed step's float64 batch gradient before
  /// the walk; up to this many bytes of them are kept for the analysis to use instead of forming
  /// them again (0: every step's gradient formed twice, as before).
  int64_t verified_gradients_memory = int64_t{256} << 20;
  int64_t exact_nodes = 0;         ///< Q > 0: the exact path kernel by Q-node Gauss-Legendre quadrature
  std::string tc_rule = "tau";     ///< tau or outlier
  double tau = 0.1;
  int64_t tc_window = 50;
  double tc_kappa = 5.0;
  /// Models with a Conv2d layer: the per-example split formed and checked against forward-mode K
  /// (failed_checks) on every check_every-th analyzed step; other models check every step.
  int64_t check_every = 10;
  /// The per-example split through a random projection (explain --project; projection.h): the
  /// split's check then measures the projection (AnalysisResult::projection_error), ungated.
  int64_t project = 0;
  uint64_t project_seed = 0;
  /// --kinks: walk each step's kinks (ReLU / leaky ReLU / max-pool pattern changes, kinks.h) of
  /// every probe and batch example and count them per step; with exact_nodes, split each probe's
  /// segment at its kinks and integrate each piece with exact_nodes (at least the model's
  /// nodes_needed) nodes, so that the exact path kernel is exact again.
  bool kink_split = false;
  /// --allow-unverified: a recorded run's steps that fail the verification (step_verification.h)
  /// are analyzed anyway and marked (StepRow::verified 0) instead of failing the analysis.
  bool allow_unverified = false;
  /// --kinks-examples N (> 0): walk only the first N examples of each batch (the walk's cost
  /// follows the rows walked; a full batch of a CNN is slow). 0: the whole batch.
  int64_t kinks_examples = 0;
  /// --kinks-max N (> 0): a step on which one walked example would need more than N pieces is not
  /// walked (kinks_max_pieces, kinks.h): its kink columns stay empty, its exact kernel takes the
  /// plain Q-node rule and is left out of the quadrature gate. 0: no limit.
  int64_t kinks_max = 0;
  /// --sharpness EVERY (> 0): lambda_max of the Hessian of the training loss on the first
  /// sharpness_examples training examples and of the step's batch loss, at every EVERY-th step
  /// counted from the whole range's first (sharpness.h), with the subset's loss before and after.
  int64_t sharpness_every = 0;
  int64_t sharpness_examples = 1000;
  int64_t sharpness_iterations = 100;
  /// LibTorch and OpenBLAS threads, pinned for the analysis and recorded in its summary.
  int threads = 1;
  double identity_tolerance = 1e-8;  ///< relative to max |f_N - f_0|; beyond it: exit 4
  double kernel_split_tolerance = 1e-8;  ///< relative; beyond it: exit 4
  /// With exact_nodes on a smooth model: quad_error_rel beyond it is exit 4 (more nodes needed).
  /// Not applied across ReLU or max-pool kinks, where quadrature converges only like 1/Q.
  double quadrature_tolerance = 1e-6;
  bool force = false;              ///< overwrite a non-empty `out`
  /// When set (`pathkernel analyze` sets it to --out): the analysis keeps what it finished there
  /// as it goes, one segment per stretch between stored checkpoints (a documented partial state:
  /// partial.json and segments/), and the same command run again continues from the segments
  /// and ends with the files of an uninterrupted analysis. Another command on that folder is
  /// refused (with force: the segments are discarded and it starts anew).
  std::string progress_dir;
  /// With progress_dir: a segment ends at a stored checkpoint once this many seconds of work
  /// went into it (0: at every checkpoint), so that frequent checkpoints do not mean many writes.
  double segment_seconds = 5;
  /// Called after each analyzed step (library use: `pathkernel explain` attributes through it).
  std::function<void(const StepTerms&)> on_step;
  /// Terms computed after the standard ones on every analyzed step (library use, step_terms.h):
  /// their values go to steps.csv as extra columns (StepRow::extra).
  std::vector<std::shared_ptr<StepTerm>> extra_terms;
  /// Library use: the run, already open (`run` still names it), so that a command opens and
  /// decodes it once (explain: analysis, attribution and the files). Not owned.
  Trajectory* trajectory = nullptr;

  /// Throws InputError naming the flag.
  void validate() const;
};

/// One analyzed step (a row of steps.csv). Norms are over all probes and outputs.
struct StepRow {
  int64_t step = 0;
  double lr = 0, loss_before = 0, loss_after = 0, grad_norm = 0, update_norm = 0;
  double d_norm = 0, f_norm = 0, k_norm = 0, u_norm = 0, u_round_norm = 0, u_wd_norm = 0, u_mom_norm = 0;
  double r_norm = 0, s_norm = 0, higher_norm = 0;
  /// The optimizer's kernel term and its remainder (SPEC, "Optimizers with memory"). u_wd_norm
  /// and u_mom_norm are the SPEC's SGD sources: NaN for Nesterov, dampening, Adam and AdamW.
  double kopt_norm = 0, uopt_wd_norm = 0, uopt_round_norm = 0;
  double r = 0;          ///< |R| / |F|
  double kexact_norm = 0, quad_error = 0;  ///< with exact_nodes: |sum_m Kexact_{k,m}|, |D - gbar . dw|
  bool loss_up = false;  ///< L_k(w_{k+1}) > L_k(w_k)
  bool in_tc = false;
  /// cos(grad L_k(w_k), grad L_{k-1}(w_{k-1})): NaN at step 0.
  double grad_cos = NAN;
  /// With kink_split: kinks crossed along the step, summed over the probes and over the batch
  /// examples (walk_rows, kinks.h), and the probes' pieces of constant pattern, summed over them.
  /// NaN without.
  double kinks_probes = NAN, kinks_batch = NAN, kink_pieces = NAN;
  /// At sharpness steps (NaN elsewhere): lambda_max of the subset's and the batch's loss, the
  /// subset's Lanczos iterations and relative residual, the subset's loss at w_k and w_{k+1}.
  double lambda_train = NAN, lambda_batch = NAN, lanczos_iterations = NAN, lanczos_residual = NAN;
  double subset_loss_before = NAN, subset_loss_after = NAN;
  /// A recorded run's step checked against its logged loss and gradient fingerprint
  /// (step_verification.h): the relative errors, and 1 verified, 2 verified only in float32,
  /// 0 failed (kept with allow_unverified). NaN / -1 for a trained run (its replay checks it) or a value not logged.
  double verify_loss_error = NAN, verify_gradient_error = NAN;
  int verified = -1;
  /// Columns of terms added through AnalyzeConfig::extra_terms: (name, value), the same names in
  /// every row, written after the standard columns.
  std::vector<std::pair<std::string, double>> extra;
};

struct AnalysisResult {
  std::vector<int64_t> probe_indices;  ///< into the split
  std::vector<int64_t> probe_labels;
  at::Tensor outputs;                  ///< int64 [P, C]: which logit each column is
  at::Tensor d, f, k, u, r, s;         ///< float64 [steps, P, C] (s undefined without second order)
  /// U_stats: BatchNorm's running statistics' own change, f(w_{k+1}; b_{k+1}) - f(w_{k+1}; b_k),
  /// a part of U (undefined for a model without running statistics).
  at::Tensor u_stats;
  at::Tensor kexact, uexact;           ///< float64 [steps, P, C] with exact_nodes (else undefined)
  at::Tensor kopt, uopt_wd, uopt_round;  ///< float64 [steps, P, C]: Kopt, Uopt_wd, Uopt_round
  /// With exact_nodes and uses_kopt: Kopt with the segment mean gbar in place of g, and the rest
  /// of gbar . dw (decay and rounding); float64 [steps, P, C].
  at::Tensor koptexact, uoptexact;
  std::string optimizer;               ///< the run's optimizer: sgd, adam, adamw
  std::string loss;                    ///< the run's loss (loss_name): ce, mse, ce with its label smoothing
  std::string model;                   ///< the zoo spec analyzed, or "torchscript"
  std::string route;                   ///< the kernel route taken: factorized, explicit or torchscript
  std::string route_reason;            ///< why that route (and a hint when it is the slow one)
  std::string products;                ///< how J v was formed: forward, double-backward or rows
  std::string products_why;            ///< why that way, and whether forward mode carried all directions at once
  std::string rows_used;               ///< how the explicit route formed probe rows (empty: none formed)
  /// The optimizer has memory (momentum, Adam's moments) or a preconditioner: Eq. 9 uses Kopt.
  bool uses_kopt = false;
  at::Tensor f_initial, f_final;       ///< float64 [P, C] at the first analyzed step and after the last
  std::vector<StepRow> steps;
  bool contiguous = true;              ///< every step in the range analyzed: the run identity applies
  double identity_error = 0;           ///< max |f_final - f_initial - sum(K + U + R)| / max |f_final - f_initial|
  double kernel_split_error = 0;       ///< max relative |sum_m K_{k,m} - (-a_k g . grad L_k)|
  int64_t kernel_split_checked = 0;    ///< the steps that check ran on
  int64_t project_dims = 0;            ///< with project: a projected row's length
  double projection_error = 0;         ///< with project: the split's check, max over its steps
  /// The model is smooth (no ReLU, no max-pool): Gauss-Legendre quadrature converges fast.
  bool smooth = true;
  /// With exact_nodes: max_k |D_k - gbar_k . dw_k| / max_k |D_k| (Frobenius norms over probes;
  /// with kink_split over the steps walked).
  double quad_error_rel = 0;
  /// With kink_split: the steps not walked (kinks_max).
  int64_t kinks_skipped = 0;
  /// A recorded run's steps checked against their logged loss and gradient (step_verification.h)
  /// and those that failed (analyzed with allow_unverified); -1 when nothing was checked.
  int64_t verified_steps = -1, unverified_steps = 0;
  /// Of the verified steps, those that agreed only when recomputed in float32 (StepRow::verified 2).
  int64_t float32_steps = 0;
  /// With sharpness_every: the training examples of the fixed subset (at most the run's).
  int64_t sharpness_examples = 0;
  /// A shard's place: its index and count, and the whole range [whole_begin, whole_end).
  int64_t shard_index = 0, shard_count = 0, whole_begin = 0, whole_end = 0;
  double seconds = 0;
  double startup_seconds = 0;          ///< from the call to the first step (run opened, data decoded)
  int threads = 1;                     ///< threads in force (pin_threads)
  std::string blas;                    ///< the BLAS library in force
  std::string blas_core;               ///< OpenBLAS's kernel set in force ("" for another BLAS)
  /// The run analyzed: its absolute path and its manifest.json's SHA-256, so that a report finds
  /// this run and no other, from any working folder ("" in analyses made before they were kept).
  std::string run_path, run_manifest_sha256;
  /// The run's training had finished (trajectory.h, run_complete) when it was analyzed.
  bool run_complete = true;
};

/// The format tag of an analysis's summary.json.
inline constexpr const char* kAnalysisFormat = "pathkernel-analysis/1";
/// The format tag of an interrupted analysis's partial.json (AnalyzeConfig::progress_dir).
inline constexpr const char* kPartialAnalysisFormat = "pathkernel-analysis-partial/1";

/// True when `dir` holds an interrupted analysis (partial.json of that format).
bool is_partial_analysis(const std::string& dir);

/// The settings of an analysis as its summary.json records them (`probes` is the count chosen).
nlohmann::json analysis_settings(const AnalyzeConfig& c, int64_t probes);

/// Runs the analysis (no files written). Throws InputError for a bad run or settings.
AnalysisResult analyze(const AnalyzeConfig& config);

/// The probes of a split of n examples by c's rule: c.probe_indices, else the indices in
/// c.probe_indices_file, else c.probes evenly spaced (with c.balanced, per class of `labels`,
/// int64 [n]; undefined otherwise). Throws InputError for an index outside the split.
std::vector<int64_t> choose_probes(const AnalyzeConfig& c, int64_t n, const at::Tensor& labels);

/// Throws InputError unless `route` is auto, factorized, explicit or torchscript.
void check_kernel_route(const std::string& route);
/// Throws InputError unless `products` is auto, forward, double-backward or rows.
void check_products(const std::string& products);

/// Gauss-Legendre nodes and weights on [0, 1]: exact for polynomials of degree <= 2q - 1.
std::pair<std::vector<double>, std::vector<double>> gauss_legendre(int64_t q);

/// What is computed over all the analyzed steps once they are there: quad_error_rel (with the
/// exact kernel), T_c (mark_complex_steps) and the run identity error. analyze() ends with it;
/// merging shards calls it on the joined steps.
void finish_analysis(AnalysisResult& result, const AnalyzeConfig& config);

/// Marks T_c in result.steps by the configured rule (SPEC, "Complex timesteps").
void mark_complex_steps(std::vector<StepRow>& steps, const AnalyzeConfig& config);

/// The analysis's own checks that an independent route or plain arithmetic can fail, for exit
/// status 4: every array finite; the kernel term's per-example split against -a_k g . grad L_k
/// with grad L_k by autograd (kernel_split_tolerance, relative); the run identity against the
/// end points' outputs (identity_tolerance; NaN fails). Returns one message per failed check.
/// (The end weights themselves are checked against the checkpoint files by the replay.)
std::vector<std::string> failed_checks(const AnalysisResult& result, const AnalyzeConfig& config);

/// Writes steps.csv, probes.csv, summary.json and arrays/*.npy into config.out (each file
/// written to a temporary name and renamed). Throws InputError.
void write_analysis(const AnalysisResult& result, const AnalyzeConfig& config);

/// The note's Eq. 9 with numbers, averaged over probes and outputs, for stdout.
std::string eq9_table(const AnalysisResult& result, const AnalyzeConfig& config);

}  // namespace pathkernel
