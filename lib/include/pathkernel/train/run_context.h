#pragma once

#include <nlohmann/json.hpp>
/// \file run_context.h
/// Everything a training run computes with, built from a TrainConfig: data, inputs, model,
/// stepper, sampler and learning rates. Training, resume and replay all build it the same way,
/// which is why they agree bit for bit.

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <vector>

#include "pathkernel/io/idx.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/models/model.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/lr_schedule.h"
#include "pathkernel/train/sampler.h"
#include "pathkernel/train/stepper.h"
#include "pathkernel/train/train_config.h"

namespace pathkernel {

struct RunContext {
  TrainConfig config;
  ThreadInfo threads;
  Dataset train, test;
  Normalization normalization;
  at::ScalarType dtype = at::kFloat;
  int64_t num_classes = 0;
  int64_t total_steps = 0;
  std::shared_ptr<models::Model> model;
  std::unique_ptr<Stepper> stepper;
  std::unique_ptr<BatchSampler> sampler;
  std::unique_ptr<LrSchedule> schedule;

  /// Inputs [B, 1, H, W] (dtype) and labels [B] of the given training examples.
  std::pair<at::Tensor, at::Tensor> batch(const std::vector<int64_t>& indices) const;
  /// What step k's training forward of `rows` examples uses that a prediction does not: the
  /// Dropout masks of a `:dropout=P` model, drawn from the seed and the step
  /// (models::draw_dropout_masks), so that a replay draws them again, and every BatchNorm of a
  /// `:bn` model in training mode, moving its running statistics when `moves_statistics` (the
  /// step itself, in training or replay; not in an analysis); empty otherwise.
  models::TrainingContext step_context(int64_t k, int64_t rows, bool moves_statistics) const;
  /// Test-set accuracy of the current weights (chunked, no autograd).
  double test_accuracy() const;
  /// What is saved beside the weights of `step`: the sampler position and the optimizer state.
  TrainerState state_at(int64_t step) const;
  /// Restores the optimizer state of a state file (read from `source`) whose weights the model
  /// already holds. Throws InputError naming `source` when the file records another step or
  /// optimizer, or its state does not fit the model.
  void restore(const TrainerState& state, int64_t step, const std::string& source);
};

/// Builds the context: pins threads, loads and checks the data, seeds torch with config.seed and
/// builds the model (so the initial weights are a function of the seed). `normalization`, when
/// given, is used instead of recomputing it (replay takes it from the manifest). A relative
/// `file:` learning-rate schedule is read from `run_root` (the run's own copy).
/// Throws InputError for bad data or settings.
std::unique_ptr<RunContext> make_run_context(const TrainConfig& config,
                                             std::optional<Normalization> normalization = {},
                                             const std::string& run_root = "");

/// The data files a context read, each with its path and SHA-256, as a manifest records them
/// (`{"synthetic": SPEC}` for generated data).
nlohmann::json data_file_digests(const RunContext& ctx);

/// Checks that the data a context read are the very files the run was trained on: each file's
/// SHA-256 against the manifest's `data.files` (`manifest_path` names it in errors). Throws
/// InputError naming the file that differs; `why` says what needs the same data.
void check_data_files(const nlohmann::json& manifest, const RunContext& ctx, const std::string& manifest_path,
                      const std::string& why);

}  // namespace pathkernel
