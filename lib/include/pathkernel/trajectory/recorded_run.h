#pragma once
/// \file recorded_run.h
/// A training run recorded outside pathkernel (python/pathkernel_record.py, or written by hand
/// as docs/run-format.md describes): the data as fed to the model, one record per step, and
/// state_dict checkpoints of the weights and the optimizer. Everything is read through the
/// bounded readers and checked against the manifest before use.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "pathkernel/train/optimizer.h"

namespace pathkernel {

/// The format tag of a recorded run's manifest.json.
inline constexpr const char* kRecordedRunFormat = "pathkernel-recorded-run/1";

/// +-1 vector j of a recorded run's gradient fingerprint (python/pathkernel_record.py's
/// fingerprint_signs): element i is +1 when the top bit of splitmix64(seed + j * 2^40 + i) is
/// set, else -1. float64 [n].
at::Tensor fingerprint_signs(uint64_t seed, int64_t j, int64_t n);

/// True when `dir` holds a recorded run (its manifest has the recorded-run format tag).
bool is_recorded_run(const std::filesystem::path& dir);

class RecordedRun {
 public:
  /// Reads and checks the manifest, the data (.npy), the step log and the list of checkpoints.
  /// Throws InputError naming the file for anything malformed or inconsistent: inputs that are
  /// not float32 or float64 [N, input_shape...], labels outside 0..outputs-1 (ce) or targets not float32
  /// [N, outputs] (mse), batch indices outside the training set, a rate that is not finite and
  /// positive, parameter groups that differ in more than their rate and weight decay.
  explicit RecordedRun(const std::filesystem::path& dir);

  const nlohmann::json& manifest() const { return manifest_; }
  const std::filesystem::path& dir() const { return dir_; }
  /// "ce" or "mse".
  const std::string& loss() const { return loss_; }
  /// The cross-entropy's label smoothing, in [0, 1) (manifest "label_smoothing"; 0 when absent).
  double label_smoothing() const { return label_smoothing_; }
  /// "sgd", "adam" or "adamw", with its settings from the manifest's first parameter group.
  const OptimizerOptions& optimizer() const { return optimizer_; }
  int64_t outputs() const { return outputs_; }
  /// Steps in the step log (the run's weights exist for at most steps 0 .. logged_steps()).
  int64_t logged_steps() const { return static_cast<int64_t>(log_.size()); }
  /// The steps k whose weights before (k) and after (k + 1) are both stored, ascending: the steps
  /// an analysis can split. A recorded run cannot be replayed, so no other step can be analyzed.
  const std::vector<int64_t>& analyzable_steps() const { return analyzable_; }
  /// The zoo model spec the recorder recognized the model as (an nn.Sequential MLP, e.g.
  /// "mlp:64:tanh"), or "" when it is another model; with it, each recorded parameter name's
  /// name in the zoo model.
  const std::string& zoo_spec() const { return zoo_spec_; }
  const std::map<std::string, std::string>& zoo_names() const { return zoo_names_; }
  /// The optimizer's parameters (the model's trained parameters) in its order, with their shapes.
  std::vector<std::pair<std::string, std::vector<int64_t>>> parameters() const;
  /// The optimizer's parameters the run does not train (requires_grad=False when recorded, a
  /// frozen backbone): constants of the model, as are its parameters outside the optimizer.
  const std::vector<std::string>& frozen() const { return frozen_; }
  /// The state_dict's names in its order, with the trained parameters' shapes ({-1} for others).
  const std::vector<std::pair<std::string, std::vector<int64_t>>>& state_dict() const { return state_dict_; }
  /// Steps with a stored weights file, ascending.
  const std::vector<int64_t>& checkpoints() const { return checkpoints_; }

  /// The weights after k steps, in the manifest's state_dict order, each checked against the
  /// manifest's names and shapes (float32 or float64). Throws InputError naming the file.
  NamedTensors weights(int64_t k) const;
  /// The optimizer's state after k steps as pathkernel's optimizers name it (slot -> parameter
  /// name -> tensor: momentum_buffer; exp_avg, exp_avg_sq), and its number of updates.
  /// Throws InputError naming the file when a slot is missing or mis-shaped.
  OptimizerState optimizer_state(int64_t k, int64_t* updates) const;

  struct Step {
    double lr = 0;
    std::vector<int64_t> batch;
    double loss = 0;
    /// The gradient fingerprint the recorder took when optimizer.step() ran (grad_proj empty
    /// when the run was recorded without one): the applied gradient's norm and its products
    /// with the fixed +-1 vectors of fingerprint_signs().
    double grad_norm = 0;
    std::vector<double> grad_proj;
    /// The inputs the loop fed at this step when they were not the stored rows of the batch
    /// (augmentation): float64 [batch, input_shape...], read from the record's `inputs` file;
    /// undefined otherwise.
    at::Tensor inputs;
    /// The uniform factor the loop applied to the gradient (clipping), recorded as grad_scale; 1
    /// when none was.
    double grad_scale = 1;
    /// How many training forwards the step's gradient accumulated (micro-batches, the record's
    /// `accumulated`); 1 when one.
    int64_t accumulated = 1;
    /// The dtype torch.autocast ran the step's forward in (the record's `autocast`: "bfloat16",
    /// "float16"), empty when none.
    std::string autocast;
    /// The optimizer's settings at this step, by recorded parameter name: a scheduler's momentum
    /// or betas (the record's `groups`), parameter groups' rates (`lrs`) and weight decay.
    StepSettings settings;
    /// The masks of the Dropout sites that were on at this step (uint8 0/1 [batch, ...] by site
    /// name), read from the record's `masks` file; empty when none was.
    std::map<std::string, at::Tensor> masks;
    /// The BatchNorm modules that ran in training mode at this step (the record's
    /// `batchnorm_train`): the batch normalized by its own statistics.
    std::vector<std::string> batchnorm_train;
  };
  /// The model's BatchNorm modules with running statistics (manifest `batchnorm`).
  const std::vector<std::string>& batchnorm_modules() const { return batchnorm_modules_; }
  /// The model's recorded Dropout sites (manifest `dropout`): name and p, in the masks' order.
  const std::vector<std::pair<std::string, double>>& dropout_sites() const { return dropout_sites_; }
  /// True when the settings change between steps or differ between parameter groups.
  bool settings_vary() const { return settings_vary_; }
  /// Step k's settings alone (Step::settings), by recorded parameter name.
  StepSettings settings_at(int64_t k) const;
  /// The record of step k (0 <= k < logged_steps()).
  Step step(int64_t k) const;
  /// The fingerprint's seed and number of projections (0 when the run has none).
  uint64_t fingerprint_seed() const { return fingerprint_seed_; }
  int64_t fingerprint_projections() const { return fingerprint_projections_; }

  /// The data exactly as fed to the model: inputs float32 (or float64) [N, ...], targets int64 [N] (ce) or
  /// float32 [N, outputs] (mse). Test tensors are undefined when the run has no test split.
  const at::Tensor& train_inputs() const { return train_x_; }
  const at::Tensor& train_targets() const { return train_y_; }
  const at::Tensor& test_inputs() const { return test_x_; }
  const at::Tensor& test_targets() const { return test_y_; }

  std::filesystem::path weights_file(int64_t k) const;
  std::filesystem::path optimizer_file(int64_t k) const;
  std::filesystem::path model_file() const { return dir_ / "model.pt"; }

 private:
  void read_split(const std::string& split, at::Tensor& x, at::Tensor& y);
  void read_log();
  /// loss and label_smoothing from the manifest, checked.
  void read_loss(const std::string& mf);
  /// The manifest's Dropout sites and BatchNorm modules (`dropout`, `batchnorm`).
  void read_sites(const std::string& mf);
  void read_frozen(const nlohmann::json& model, const std::string& mf);
  void read_groups(const nlohmann::json& optimizer, const std::string& mf);
  void list_checkpoints();

  std::filesystem::path dir_;
  nlohmann::json manifest_;
  std::string loss_;
  double label_smoothing_ = 0;
  OptimizerOptions optimizer_;
  int64_t outputs_ = 0;
  std::vector<std::pair<std::string, std::vector<int64_t>>> state_dict_;  ///< names and shapes
  /// Step k's fed inputs from `name` (inside the run), checked against the batch and input shape.
  at::Tensor fed_inputs(int64_t k, const std::string& name, size_t rows) const;
  /// Step k's Dropout masks from its record (`masks`, `mask_shapes`), checked against the file.
  std::map<std::string, at::Tensor> step_masks(int64_t k, const nlohmann::json& record, size_t rows) const;
  /// A file a step's record names, which must lie inside the run directory.
  std::filesystem::path file_in_run(int64_t k, const std::string& name, const std::string& what) const;
  std::vector<std::pair<std::string, double>> dropout_sites_;
  std::vector<std::string> batchnorm_modules_;
  std::vector<std::string> param_order_;  ///< the optimizer's parameters, in its order
  std::vector<std::string> frozen_;       ///< those of them the run does not train
  std::vector<OptimizerOptions> groups_;   ///< the manifest's parameter groups
  std::vector<nlohmann::json> group_json_;
  std::vector<size_t> group_of_;           ///< by param_order_ index
  bool settings_vary_ = false;
  uint64_t fingerprint_seed_ = 0;
  int64_t fingerprint_projections_ = 0;
  std::string zoo_spec_;
  std::map<std::string, std::string> zoo_names_;
  std::vector<nlohmann::json> log_;
  std::vector<int64_t> checkpoints_, analyzable_;
  at::Tensor train_x_, train_y_, test_x_, test_y_;
};

}  // namespace pathkernel
