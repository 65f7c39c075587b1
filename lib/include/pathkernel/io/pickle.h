#pragma once
/// \file pickle.h
/// A restricted unpickler for the `data.pkl` record of PyTorch checkpoints: the subset of
/// pickle (protocols 2 to 5) that `torch.save` of state_dicts and optimizer state and
/// `torch::pickle_save` of dicts write, and nothing else. It calls no code: the only globals
/// it accepts are the handful such files name (OrderedDict, tensor rebuilding, storage types),
/// each turned into plain data. Values nest at most kMaxDepth deep, a file makes at most
/// kMaxValues values, and containers cannot be changed after they are placed in another, so a
/// crafted file can neither overflow the stack, nor exhaust memory, nor build a cycle.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pathkernel {

/// A tensor as a checkpoint describes it: a view into a storage record of the archive.
struct PickledTensor {
  std::string storage_type;  ///< "Float", "Double", "Long", ... (from torch.FloatStorage, ...)
  std::string key;           ///< storage record: data/<key>
  int64_t storage_numel = 0;
  int64_t offset = 0;        ///< in elements
  std::vector<int64_t> sizes, strides;
};

/// One unpickled value. Dict keys are strings or integers.
struct PickleValue {
  enum class Kind { None, Bool, Int, Float, String, Tuple, List, Dict, Global, Storage, Tensor };
  Kind kind = Kind::None;
  int64_t i = 0;       ///< Bool (0/1), Int
  double f = 0.0;      ///< Float
  std::string s;       ///< String; Global as "module name"
  std::vector<std::shared_ptr<PickleValue>> items;  ///< Tuple, List
  std::vector<std::pair<std::shared_ptr<PickleValue>, std::shared_ptr<PickleValue>>> entries;  ///< Dict
  std::shared_ptr<PickledTensor> tensor;  ///< Storage (sizes empty), Tensor
  int depth = 1;
  bool sealed = false;  ///< placed inside another value: no longer changed

  /// The value under a string key of a Dict, or nullptr.
  const PickleValue* find(std::string_view key) const;
  /// A short name of the kind, for messages ("dict", "tensor", ...).
  const char* kind_name() const;
};
using PickleRef = std::shared_ptr<PickleValue>;

inline constexpr int kMaxPickleDepth = 32;
inline constexpr int64_t kMaxPickleValues = 1 << 18;

/// Unpickles `bytes`. `name` is used in messages. Throws InputError naming the file and the
/// byte offset for any opcode, global or structure outside the subset.
PickleRef unpickle(std::string_view bytes, const std::string& name);

}  // namespace pathkernel
