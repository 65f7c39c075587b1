#pragma once
/// \file explain.h
/// `pathkernel explain`: the kernel-machine view of a run (SPEC, "kernel-machine view and
/// attribution"). For probe x, output c and training example i,
///     a_i(x) = sum over the steps k whose batch held i of K_{k,i}(x),
/// so that f_c(x; w_N) = f_c(x; w_0) + sum_i a_i(x) + sum_k U_k + sum_k R_k; with the exact path
/// kernel no R is left. Also TracIn self-influence: sum over the steps that drew i of
/// (a_k / |B_k|) |grad l(x_i; w_k)|^2 (docs/spec.md).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pathkernel {

struct ExplainConfig {
  std::string run, out;
  std::vector<int64_t> probe_indices;  ///< explicit probes (--probe I, repeatable)
  int64_t probes = 0;                  ///< or N probes evenly spaced over the split
  std::string split = "test";
  int64_t output = -1;                 ///< the logit explained; -1: each probe's final prediction
  int64_t top = 16;                    ///< proponents and opponents shown per probe
  int64_t exact_nodes = 0;             ///< Q > 0: attribute with the exact path kernel too
  bool self_influence = false;
  int64_t grids = 16;                  ///< PNG grids for at most this many probes
  std::string class_names_file;        ///< one class name per line for the grids (as report's)
  bool force = false;
  double tolerance = 1e-8;
  /// auto: plain SGD attributes step by step (a_i); optimizers with memory or a preconditioner
  /// through the backward recursion (aopt_i, attribution.h). backward: always the recursion
  /// (the tests compare both routes on plain SGD).
  std::string route = "auto";
  /// As AnalyzeConfig::kernel_route (auto | factorized | explicit | torchscript).
  std::string kernel_route = "auto";
  int threads = 1;  ///< LibTorch and OpenBLAS threads (pinned, recorded)
  /// attributions.csv holds "top": each probe's top proponents and opponents, or "all": every
  /// training example (P x N rows; attributions.npy always holds them all).
  std::string csv = "top";
  /// --shard I/N: attribute the I-th of N parts of the run only; `pathkernel merge` adds the
  /// parts' attributions up into the whole run's (shards.h). Through the optimizer (momentum,
  /// Adam, per-step settings) a part also stores what earlier parts receive from its steps
  /// (phi_begin.npy), and merge adds that share to them (attribution.h).
  int64_t shard_index = 0, shard_count = 0;
  /// With --shard: split the steps evenly rather than at stored checkpoints (AnalyzeConfig::shard_even;
  /// --workers, whose shards run on one machine, balances them so). The numbers are the same.
  bool shard_even = false;
  /// --workers N (> 1): the command line attributes the run as N shards in N processes at once
  /// and adds them up (pathkernel explain; the library's explain() runs one process).
  int64_t workers = 1;
  /// --probe-part I/N: one worker of `explain --workers N` through the optimizer. It attributes
  /// the I-th of N parts of the probes over the whole run, and analyzes the I-th of N even
  /// stretches of the run's steps for every probe. Its output is for the join only (join_probe_parts): the analysis is what every probe
  /// shares, so no two workers do it twice.
  int64_t part_index = 0, part_count = 0;
  /// --project D (> 0): the per-example split (a_i, K_{k,m}) through a seeded random projection
  /// of the gradients to about D dims per layer (projection.h); D, F, U, R, S and the run's K
  /// stay exact. Factorized route; plain SGD, momentum, Nesterov (no preconditioner).
  int64_t project = 0;
  uint64_t project_seed = 0;

  void validate() const;
};

class Trajectory;

/// A worker's part of `explain --workers` through the optimizer (ExplainConfig::part_index):
/// rows [rows_begin, rows_end) of the probes, attributed over the whole run, and the analysis of
/// steps first .. last (the I-th of N even stretches) for all the probes.
struct ProbePart {
  int64_t index = 0, count = 0, rows_begin = 0, rows_end = 0;
  std::vector<int64_t> probe_indices, probe_labels, outputs;  ///< every probe's, in order
  int64_t first_step = 0, last_step = -1;
  at::Tensor f_initial, f_final;  ///< float64 [P]: the outputs before the first step and after the last
  /// float64 [steps, P]: per step, what the kernel view leaves to the update (U, or Uopt_wd +
  /// Uopt_round, with U_stats), R, and with exact nodes the exact remainder.
  at::Tensor u, r, uexact;
  double max_quad_error = 0, projection_error = 0;
};

/// What explain will do with `c`'s run, before any work: whether it attributes through the
/// optimizer's recursion, and the probes it explains (as the analysis chooses them).
struct ExplainPlan {
  bool through_optimizer = false;
  std::vector<int64_t> probe_indices;
  int64_t steps = 0;  ///< the run's logged steps
};

/// Opens the run. Throws InputError for a bad run or bad probes.
ExplainPlan plan_explain(const ExplainConfig& c);

struct ExplainResult {
  /// The run as explain opened it (once, for the analysis, the attribution and the files).
  std::shared_ptr<Trajectory> trajectory;
  std::vector<int64_t> probe_indices, probe_labels, outputs;  ///< per probe
  at::Tensor attributions;        ///< float64 [P, N_train]: a_i(x)
  at::Tensor attributions_exact;  ///< with exact_nodes
  at::Tensor times_drawn;         ///< int64 [N_train]
  std::vector<std::vector<int64_t>> drawn_at;  ///< per training example, the steps that drew it
  at::Tensor self_influence;      ///< float64 [N_train] with self_influence
  at::Tensor f_initial, f_final, sum_u, sum_r, sum_uexact;  ///< float64 [P]
  /// The attribution went through the optimizer's recursion (aopt_i); sum_u is then
  /// sum(Uopt_wd + Uopt_round) and sum_uexact the exact version's remainder.
  bool through_optimizer = false;
  std::string optimizer;
  double sum_error = 0;           ///< max_p |f_N - f_0 - (sum a + sum U + sum R)| / max_p |f_N - f_0|
  double sum_error_exact = 0;     ///< the same for sum a_exact + sum Uexact (with exact_nodes)
  double max_quad_error = 0;
  /// With --project: the length of a projected gradient row, and (plain SGD) the largest
  /// relative error over the steps of the projected split's batch sum against the exact K
  /// (max_p,c |sum_m K~_{k,m} - K_k| / max |K_k|). The sum check then measures the projection.
  int64_t project_dims = 0;
  double projection_error = 0;
  double seconds = 0;
  /// A shard's place (shard_count 0: the whole run) and the steps it attributes.
  int64_t shard_index = 0, shard_count = 0, whole_begin = 0, whole_end = 0, first_step = 0, last_step = 0;
  /// A shard attributed through the optimizer: its steps' own share only (the earlier steps'
  /// gradients move its steps too), so its sum check is made when the shards are merged.
  bool sum_check_in_merge = false;
  /// A worker's part (--probe-part): what it adds to the join; `part.count` 0 otherwise.
  ProbePart part;
  /// Such a shard after the first: Phi (and Phi_exact) at its first step from its own steps, and
  /// the factor by which the later steps' Phi enters there (OptimizerAttribution).
  at::Tensor phi_begin, phi_exact_begin;
  double carry = 1;
};

/// The format tag of an explanation's summary.json.
inline constexpr const char* kExplainFormat = "pathkernel-explain/1";
/// The format tag of a --probe-part worker's summary.json.
inline constexpr const char* kExplainPartFormat = "pathkernel-explain-part/1";

/// One pass over the run. Throws InputError.
ExplainResult explain(const ExplainConfig& config);

/// Writes attributions.csv/.npy, top.csv, grids/*.png, self_influence.* and summary.json.
void write_explanation(const ExplainResult& result, const ExplainConfig& config);

/// The sum check per probe, for stdout.
std::string explain_table(const ExplainResult& result, const ExplainConfig& config);

}  // namespace pathkernel
