#pragma once
/// \file influence.h
/// `pathkernel influence`: TracInCP (Pruthi et al. 2020, as Captum's TracInCP computes it) from a
/// run's checkpoints, through the factorized kernels. For test examples z' (the probes, with
/// their labels) and training examples z_i,
///     influence[p, i] = sum over the chosen checkpoints t of lr_t * < grad l(z'_p; w_t), grad l(z_i; w_t) >
///     self_influence[i] = sum_t lr_t * |grad l(z_i; w_t)|^2
/// with l the run's per-example loss (cross-entropy or MSE, not divided by a batch size), the
/// gradients over every parameter (all layers) in float64, and lr_t the learning rate of the
/// step taken from checkpoint t (of the last step for the final checkpoint). The orientation is
/// Captum's: [test examples, training examples].

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace pathkernel {

struct InfluenceConfig {
  std::string run, out;
  /// "all" (every stored checkpoint) or steps "0,100,200" (each replayed if not stored).
  std::string checkpoints = "all";
  int64_t train_examples = 0;     ///< the first N training examples (0: all of them)
  int64_t probes = 64;            ///< test examples evenly spaced over the split
  bool balanced = false;          ///< as analyze's --balanced
  std::string probe_indices_file; ///< or these indices
  std::vector<int64_t> probe_indices;
  std::string split = "test";     ///< where the probes come from
  int64_t chunk = 1000;           ///< training examples per product (bounds the memory)
  int threads = 1;
  bool force = false;
  /// Throws InputError naming the flag.
  void validate() const;
};

struct InfluenceResult {
  std::vector<int64_t> probe_indices, probe_labels;
  std::vector<int64_t> checkpoints;  ///< the steps used
  std::vector<double> rates;         ///< lr_t per checkpoint
  at::Tensor influence;              ///< float64 [P, N]
  at::Tensor self_influence;         ///< float64 [N]
  at::Tensor train_labels;           ///< int64 [N]
  std::string route;                 ///< factorized or explicit
  double seconds = 0;
};

inline constexpr const char* kInfluenceFormat = "pathkernel-influence/1";

/// Computes the matrix (no files written). Throws InputError.
InfluenceResult influence(const InfluenceConfig& config);

/// Writes influence.npy, self_influence.npy, probes.npy, probe_labels.npy, train_labels.npy,
/// checkpoints.csv and summary.json into config.out (staged; nothing half-written).
void write_influence(const InfluenceResult& result, const InfluenceConfig& config);

/// Parses --checkpoints: "all" or a comma-separated list of step numbers. Throws InputError.
std::vector<int64_t> parse_checkpoint_list(const std::string& text);

}  // namespace pathkernel
