#pragma once
/// \file checkpoint.h
/// Checkpoint files. Weights are a pickled dict name -> tensor, which Python's `torch.load`
/// returns as a state_dict. Optimizer and sampler state go in a second pickled dict beside it.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pathkernel/io/pickle.h"
#include "pathkernel/train/optimizer.h"
#include "pathkernel/train/sampler.h"

namespace pathkernel {

class ZipArchive;

/// A PyTorch checkpoint file (`torch.save`, `torch::pickle_save`) read without LibTorch's
/// unpickler: the zip archive and its data.pkl go through the bounded readers of zip_archive.h
/// and pickle.h, and a tensor is materialized only after its dtype, sizes, strides and offset
/// were checked against its storage record. Python's optimizer state dicts read this way too.
class CheckpointFile {
 public:
  /// Reads and parses `file`. Throws InputError naming the file when it is missing or is not
  /// such a checkpoint.
  explicit CheckpointFile(const std::filesystem::path& file);
  /// Parses a checkpoint held in memory; `name` stands for the file in messages.
  static CheckpointFile from_bytes(std::string bytes, std::string name);
  CheckpointFile(CheckpointFile&&) = delete;  // the archive views bytes_
  ~CheckpointFile();
  /// The unpickled value (usually a dict).
  const PickleValue& root() const { return *root_; }
  /// The tensor `v` describes, copied out of the archive (contiguous, its own dtype: float32,
  /// float64, float16, bfloat16, int64 or int32). `name` is used in messages. Throws InputError
  /// when `v` is not a tensor or reaches outside its storage.
  at::Tensor tensor(const PickleValue& v, const std::string& name) const;
  const ZipArchive& archive() const { return *zip_; }
  const std::string& path() const { return path_; }
  /// Throws InputError "<path>: <what>".
  [[noreturn]] void fail(const std::string& what) const;

 private:
  CheckpointFile(std::string bytes, std::string name);
  void parse();

  std::string path_;
  std::string bytes_;
  /// Bytes that tensors copied out of the file may still take: 4x the file's size (tensor()), so
  /// that a file whose many entries reuse one storage through the pickle memo cannot make it
  /// allocate without end.
  mutable int64_t budget_ = 0;
  std::unique_ptr<ZipArchive> zip_;
  PickleRef root_;
};

/// Writes a dict name -> tensor with torch::pickle_save, atomically. Throws InputError.
void save_tensor_dict(const std::filesystem::path& path, const NamedTensors& tensors);

/// Reads a dict written by save_tensor_dict (or by Python's torch.save of a state_dict of CPU
/// tensors). Throws InputError naming the file when it is missing or not such a dict.
NamedTensors load_tensor_dict(const std::filesystem::path& path);

/// What is saved beside the weights of step k so that resume and replay are exact.
struct TrainerState {
  int64_t step = 0;
  SamplerState sampler;
  /// The optimizer's name ("sgd", "adam", "adamw") and its number of updates so far.
  std::string optimizer = "sgd";
  int64_t optimizer_steps = 0;
  /// The optimizer's named state after step - 1 (slot -> parameter name -> tensor); empty
  /// before the first step and for optimizers without state.
  OptimizerState optimizer_state;
};

/// Format tag stored in every state file.
inline constexpr const char* kStateFormat = "pathkernel-trainer-state/2";
/// The previous format (SGD only: {..., momentum: {name: tensor}}), still read.
inline constexpr const char* kStateFormatV1 = "pathkernel-trainer-state/1";

/// Writes a TrainerState as a pickled dict {format, step, sampler_seed, sampler_epoch,
/// sampler_position, optimizer, optimizer_steps, optimizer_state: {slot: {name: tensor}}},
/// atomically.
void save_trainer_state(const std::filesystem::path& path, const TrainerState& state);

/// Reads a TrainerState of either format (a /1 file's momentum buffers become the slot
/// "momentum_buffer"). Throws InputError naming the file when it is missing or malformed.
TrainerState load_trainer_state(const std::filesystem::path& path);

}  // namespace pathkernel
