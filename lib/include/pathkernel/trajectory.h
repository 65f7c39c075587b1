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
#include "pathkernel/optimizer.h"
#include "pathkernel/stepper.h"

namespace pathkernel {

/// Logged step k: its learning rate and batch (indices int64 [M], inputs [M, ...] in the asked
/// dtype, labels int64 [M]).
struct LoggedStep {
  double lr = 0;
  at::Tensor indices, x, y;
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

  /// The architecture as a zoo spec ("mlp:128:tanh"), its input geometry and outputs.
  virtual std::string model_spec() const = 0;
  virtual models::InputShape input_shape() const = 0;
  virtual int64_t num_classes() const = 0;
  virtual LossKind loss() const = 0;

  /// Examples in "train" or "test" (0 when the run has no such split).
  virtual int64_t split_size(const std::string& split) const = 0;
  /// Inputs of examples `idx` of a split as the model was fed them, in `dtype`.
  virtual at::Tensor inputs(const std::string& split, const at::Tensor& idx, at::ScalarType dtype) const = 0;
  virtual at::Tensor labels(const std::string& split, const at::Tensor& idx) const = 0;

  /// Example i of a split as a grayscale picture for image grids: uint8 [H, W]; undefined when
  /// the inputs are not single-channel images.
  virtual at::Tensor image(const std::string& split, int64_t i) const = 0;
  /// Steps whose weights are stored (a replay starts from them), ascending.
  virtual const std::vector<int64_t>& checkpoints() const = 0;

  /// The weights after k steps, by the zoo model's state_dict names and order.
  virtual NamedTensors weights_at(int64_t k) = 0;
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
};
RunFacts run_facts(const std::filesystem::path& run);

/// Opens a run directory of either kind. Throws InputError for a missing or malformed run, and
/// for a recorded model the analyzer cannot run (not recognized as a zoo model, MSE targets).
std::unique_ptr<Trajectory> open_trajectory(const std::filesystem::path& run);

}  // namespace pathkernel
