#pragma once
/// \file train_config.h
/// The settings of a training run. They are stored in the run's manifest, from which resume and
/// replay rebuild exactly the same model, data, batches and learning rates.

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>

#include "pathkernel/io/data_source.h"
#include "pathkernel/train/optimizer.h"

namespace pathkernel {

/// Bounds on settings that size work: beyond them a run is a typo, not an experiment.
inline constexpr int64_t kMaxSteps = 1000000000, kMaxEpochs = 1000000;
inline constexpr int kMaxThreads = 256;
inline constexpr int64_t kMaxClasses = 1024;

/// The cores this process may run on (its CPU affinity), at least 1.
int usable_cores();

/// Checks a --threads given on the command line: 1 to the cores this process may use (more
/// threads only contend for them, and under a memory limit their creation can fail and hang).
/// Not for a manifest's count, which was the training machine's. Throws InputError.
void check_thread_flag(int threads);

struct TrainConfig {
  std::string data_dir = "/usr/share/datasets/fashion-mnist";  ///< MNIST-style IDX folder
  std::string model = "mlp:128:tanh";                         ///< model spec (models/model_spec.h)
  int64_t steps = 0;            ///< number of SGD steps; 0: use epochs
  int64_t epochs = 0;           ///< number of passes over the (limited) training set
  int64_t batch = 64;           ///< minibatch size |B_k|
  double lr = 0.1;              ///< base learning rate
  std::string lr_schedule = "constant";  ///< see lr_schedule.h
  std::string optimizer = "sgd";  ///< sgd | adam | adamw (optimizer.h)
  double momentum = 0.0;        ///< SGD: mu
  double dampening = 0.0;       ///< SGD: tau
  bool nesterov = false;        ///< SGD: Nesterov momentum
  double beta1 = 0.9, beta2 = 0.999;  ///< Adam/AdamW betas
  double eps = 1e-8;            ///< Adam/AdamW, RMSprop, Adagrad, Adadelta epsilon (read_betas sets the kind's default)
  double alpha = 0.99;          ///< RMSprop smoothing
  bool centered = false;        ///< RMSprop centered
  double rho = 0.9;             ///< Adadelta
  double lr_decay = 0;          ///< Adagrad
  double initial_accumulator = 0;  ///< Adagrad
  double weight_decay = 0.0;    ///< SGD and Adam: L2 lambda; AdamW: decoupled
  uint64_t seed = 0;            ///< seeds weight init and batch order
  int threads = 1;              ///< torch intra-op threads and OpenBLAS threads
  std::string dtype = "float32";  ///< float32 or float64 (weights and arithmetic)
  std::string loss = "ce";      ///< ce or mse
  double label_smoothing = 0;   ///< ce: label smoothing in [0, 1), as torch.nn.CrossEntropyLoss's
  int64_t train_limit = 0;      ///< use only the first N training examples (0: all)
  std::string normalize = "none";  ///< none (pixels/255) or standard (zero mean, unit std)
  int64_t checkpoint_every = 100;  ///< checkpoint every K steps (plus step 0 and the last)
  int64_t eval_every = 0;       ///< test accuracy every K steps (0: only at the end)
  bool log_gradients = false;   ///< append each step's batch gradient to gradients.bin
  std::string out;              ///< run directory

  /// Throws InputError with a message naming the flag when a setting is invalid.
  void validate() const;
  /// The optimizer settings (throws InputError for an unknown --optimizer).
  OptimizerOptions optimizer_options() const;
};

nlohmann::json to_json(const TrainConfig& c);

/// Reads a config written by to_json; throws InputError naming `source` on a missing field.
TrainConfig train_config_from_json(const nlohmann::json& j, const std::string& source);

}  // namespace pathkernel
