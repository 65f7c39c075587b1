#pragma once
/// \file checkpoint.h
/// Checkpoint files. Weights are a pickled dict name -> tensor, which Python's `torch.load`
/// returns as a state_dict. Optimizer and sampler state go in a second pickled dict beside it.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "pathkernel/sampler.h"

namespace pathkernel {

/// Ordered name -> tensor pairs (state_dict order).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

/// Writes a dict name -> tensor with torch::pickle_save, atomically. Throws InputError.
void save_tensor_dict(const std::filesystem::path& path, const NamedTensors& tensors);

/// Reads a dict written by save_tensor_dict (or by Python's torch.save of a state_dict of CPU
/// tensors). Throws InputError naming the file when it is missing or not such a dict.
NamedTensors load_tensor_dict(const std::filesystem::path& path);

/// What is saved beside the weights of step k so that resume and replay are exact.
struct TrainerState {
  int64_t step = 0;
  SamplerState sampler;
  /// Momentum buffers v_{k-1} by parameter name; empty when momentum is off or before step 0.
  NamedTensors momentum;
};

/// Format tag stored in every state file.
inline constexpr const char* kStateFormat = "pathkernel-trainer-state/1";

/// Writes a TrainerState as a pickled dict {format, step, sampler_seed, sampler_epoch,
/// sampler_position, momentum: {name: tensor}}, atomically.
void save_trainer_state(const std::filesystem::path& path, const TrainerState& state);

/// Reads a TrainerState. Throws InputError naming the file when it is missing or malformed.
TrainerState load_trainer_state(const std::filesystem::path& path);

}  // namespace pathkernel
