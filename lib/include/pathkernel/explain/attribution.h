#pragma once
/// \file attribution.h
/// Attribution through an optimizer with memory or a preconditioner (SPEC, "Optimizers with
/// memory or a preconditioner"): for probe row x and training example i,
///
///     aopt_i(x) = sum over k and j <= k with i in B_j of -(a_k c_{k,j} / |B_j|) < g(x; w_k), P_k (.) grad l_i(w_j) >
///
/// over the whole momentum series, never truncated. Computed exactly by walking the steps
/// backwards with Phi_j = a_j alpha_j P_j (.) g(x; w_j) + beta Phi_{j+1} (Phi_N = 0) and
/// Psi_j = s_j Phi_j + a_j nu P_j (.) g(x; w_j); then aopt_i(x) = -sum_{j: i in B_j} (1/|B_j|)
/// < Psi_j(x), grad l_i(w_j) >. The run is replayed one checkpoint stretch at a time (each
/// stretch forwards once, then is walked backwards), so the cost is about two replays.
/// With the segment mean gbar(x) in place of g(x; w_k) the same gives the exact version.
///
/// In parts (explain --shard, --workers): the recursion is linear in Phi, so steps begin .. end-1
/// walked from Phi_end = 0 give their own share and Phi_begin's local part; the steps after them
/// enter only through Phi_end, which reaches step j scaled by the betas in between. A second walk
/// of the same steps from Phi_end (carry_in), without the probes' gradients, adds that share:
/// the two walks sum to the one walk over the whole run (to rounding).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace pathkernel {

class Trajectory;

struct OptimizerAttributionConfig {
  std::string run;                     ///< run directory
  Trajectory* trajectory = nullptr;    ///< the run, already open (not owned); else opened from `run`
  std::vector<int64_t> probe_indices;  ///< into the split
  std::string split = "test";
  at::Tensor cols;                     ///< int64 [P, C']: the outputs of each probe (rows p*C' + j)
  int64_t begin = 0;                   ///< steps begin .. end-1 are attributed
  int64_t end = 0;
  /// Defined: only the share of the steps after end-1, which enters as Phi_end = carry_in (and
  /// Phi_exact,end = carry_in_exact with exact_nodes); no probe gradients, self-influence or draws.
  at::Tensor carry_in, carry_in_exact;
  int64_t exact_nodes = 0;             ///< Q > 0: also with the exact path kernel
  std::string kernel_route = "auto";   ///< as AnalyzeConfig::kernel_route
  bool self_influence = false;         ///< also sum over steps of a_j <grad l_i, P_j (.) grad l_i>
  /// > 0: Phi, Psi and the gradients in the projected space of projection.h (no preconditioner)
  int64_t project = 0;
  uint64_t project_seed = 0;
};

struct OptimizerAttribution {
  at::Tensor attr;            ///< float64 [P*C', N_train]: aopt_i
  at::Tensor attr_exact;      ///< with exact_nodes
  at::Tensor self_influence;  ///< float64 [N_train] with self_influence
  at::Tensor times_drawn;     ///< int64 [N_train]
  std::vector<std::vector<int64_t>> drawn_at;  ///< per training example, the steps that drew it
  int64_t project_dims = 0;   ///< with project: a projected row's length
  /// Phi_begin (and Phi_exact,begin) of these steps' own share: what the steps before begin
  /// receive from them. Defined when begin > 0 and no carry_in was given.
  at::Tensor phi_begin, phi_exact_begin;
  /// The factor by which Phi_end enters Phi_begin: the betas of steps begin+1 .. end.
  double carry = 1;
};

/// Runs the backward recursion over steps begin .. end-1. Throws InputError for a bad run.
OptimizerAttribution attribute_through_optimizer(const OptimizerAttributionConfig& config);

}  // namespace pathkernel
