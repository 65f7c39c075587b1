#pragma once
/// \file trajectory.h
/// The seam between a training run and its analysis: everything the analyzer reads from a run,
/// whether `pathkernel train` made it (replayed from checkpoints and the step log) or it was
/// recorded in another program (python/pathkernel_record.py: every analyzed step's weights
/// stored). Nothing in an analysis depends on which.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "pathkernel/models/model.h"
#include "pathkernel/train/optimizer.h"
#include "pathkernel/train/stepper.h"

namespace pathkernel {

/// Logged step k: its learning rate and batch (indices int64 [M], inputs [M, ...] in the asked
/// dtype or int64 tokens, the loss's targets: labels int64 [M], or float [M, C] for a recorded MSE run).
struct LoggedStep {
  double lr = 0;
  at::Tensor indices, x, y;
  /// The factor the loop applied to the batch gradient before optimizer.step() (a recorded
  /// run's gradient clipping, clip_grad_norm_): the update is the optimizer's of
  /// grad_scale * grad L_k. 1 otherwise.
  double grad_scale = 1;
  /// Micro-batches the loop accumulated into the step's gradient (a recorded run's), 1 otherwise:
  /// the batch is their rows together, its loss and gradient the batch's mean.
  int64_t accumulated = 1;
  /// The dtype torch.autocast ran the step's training forward in (a recorded run's mixed
  /// precision), empty when none: no float64 recomputation reproduces such a step.
  std::string autocast;
  /// The optimizer's settings at this step: a `pathkernel train` run's own; a recorded run's as
  /// they were at the step (a scheduler's momentum or betas, parameter groups' rates and decay).
  StepSettings settings;
  /// What the step's training forward used that a prediction does not (a recorded run's Dropout
  /// masks): the batch's forwards run inside a models::TrainingForward of it.
  models::TrainingContext context;
};

class Trajectory {
 public:
  virtual ~Trajectory() = default;

  /// Steps in the run's log.
  virtual int64_t logged_steps() const = 0;
  /// Throws InputError naming the first step of [begin, end) (every `every`-th; all of
  /// [0, end) when `from_zero`, as optimizers with memory need) whose weights before and after
  /// cannot be had.
  virtual void check_steps(int64_t begin, int64_t end, int64_t every, bool from_zero) const = 0;
  /// Makes sure the weights up to step `end` are the run's own, though `end` may lie inside a
  /// checkpoint interval: a replayed run is replayed on to the first stored checkpoint at or
  /// after `end` and compared with it (ReplayMismatchError, exit 5). Stored weights (a recorded
  /// run) need nothing.
  virtual void verify_through(int64_t /*end*/) {}
  /// A recorded run's record of step k to verify the step by (step_verification.h): its batch
  /// loss and gradient fingerprint. False for a trained run, whose replay checks it.
  virtual bool logged_fingerprint(int64_t /*k*/, double& /*loss*/, double& /*grad_norm*/,
                                  std::vector<double>& /*grad_proj*/) const {
    return false;
  }
  /// The fingerprint's projections of a gradient given by the analyzed model's parameter names
  /// (empty when the run has no fingerprint).
  virtual std::vector<double> fingerprint_of(const ParamMap& /*gradient*/) const { return {}; }

  /// True when the optimizer's settings change between steps or parameters (a recorded run's
  /// scheduled momentum or betas, parameter groups with their own rate or weight decay): the
  /// analysis then takes each step's update from LoggedStep::settings.
  virtual bool settings_vary() const { return false; }

  /// The architecture as a zoo spec ("mlp:128:tanh"), or "torchscript" for a recorded run
  /// analyzed through its own TorchScript model; its input geometry and outputs.
  virtual std::string model_spec() const = 0;
  /// A new instance of the model the analysis runs (float32 parameters, named as weights_at
  /// names them): the zoo's model, or the recorded run's TorchScript model.
  virtual std::shared_ptr<models::Model> make_model() const = 0;
  virtual models::InputShape input_shape() const = 0;
  virtual int64_t num_classes() const = 0;
  virtual LossKind loss() const = 0;

  /// Examples in "train" or "test" (0 when the run has no such split).
  virtual int64_t split_size(const std::string& split) const = 0;
  /// Inputs of examples `idx` of a split as the model was fed them, in `dtype` (int64 tokens of a
  /// recorded run stay int64).
  virtual at::Tensor inputs(const std::string& split, const at::Tensor& idx, at::ScalarType dtype) const = 0;
  /// Class labels int64 [M] of examples `idx` (for MSE targets: each row's largest entry).
  virtual at::Tensor labels(const std::string& split, const at::Tensor& idx) const = 0;

  /// Example i of a split as a grayscale picture for image grids: uint8 [H, W]; undefined when
  /// the inputs are not single-channel images.
  virtual at::Tensor image(const std::string& split, int64_t i) const = 0;
  /// Steps whose weights are stored (a replay starts from them), ascending.
  virtual const std::vector<int64_t>& checkpoints() const = 0;

  /// The weights after k steps, by the zoo model's state_dict names and order.
  virtual NamedTensors weights_at(int64_t k) = 0;
  /// The model's floating buffers after k steps (a recorded model's BatchNorm running
  /// statistics), by name; empty for a model without any (every zoo model).
  virtual NamedTensors buffers_at(int64_t /*k*/) { return {}; }
  virtual LoggedStep logged_step(int64_t k, at::ScalarType dtype) const = 0;
  /// |grad L_k| as the run logged it, or NaN when it did not.
  virtual double logged_grad_norm(int64_t k) const = 0;
  /// The run's optimizer holding its state after k steps (valid until the next call).
  virtual const Optimizer& optimizer_after(int64_t k) = 0;
};

/// What a command needs to know of a run before opening it: its training examples and its
/// optimizer settings, read from the manifest alone (no data decoded, no weights loaded for a
/// `pathkernel train` run). Throws InputError for a missing or malformed run.
struct RunFacts {
  int64_t train_examples = 0;
  OptimizerOptions optimizer;
  /// The zoo spec the run is analyzed with by default ("" for a recorded run's own TorchScript).
  std::string model;
  /// A recorded run whose settings change between steps or parameter groups (Trajectory::settings_vary).
  bool settings_vary = false;
  /// Steps in the run's step log (what an analysis of the whole run covers).
  int64_t logged_steps = 0;
};
RunFacts run_facts(const std::filesystem::path& run);

/// True when the run's training finished (its COMPLETE marker: `pathkernel train` writes it at
/// the end, the Python recorder at rec.close()); false for a run interrupted or still training.
bool run_complete(const std::filesystem::path& run);

/// Opens a run directory of either kind. A run that is not complete (run_complete) is opened as
/// far as its log goes, with a warning naming the steps there are.
/// A recorded run is analyzed through the zoo model the
/// recorder recognized (factorized kernels), or through its own TorchScript model (autograd)
/// when it was not recognized or `own_model` is set. Throws InputError for a missing or
/// malformed run, for `own_model` on a `pathkernel train` run, and for a TorchScript model that
/// does not match the recorded parameters or rejects the recorded inputs.
std::unique_ptr<Trajectory> open_trajectory(const std::filesystem::path& run, bool own_model = false);

}  // namespace pathkernel
