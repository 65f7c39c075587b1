#include "pathkernel/checkpoint.h"

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include "pathkernel/errors.h"
#include "pathkernel/fs_util.h"

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

c10::IValue unpickle(const fs::path& path) {
  if (!fs::is_regular_file(path)) throw InputError(path.string() + ": no such checkpoint file");
  const std::string bytes = read_file(path);
  try {
    return torch::jit::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  } catch (const std::exception& e) {
    throw InputError(path.string() + ": not a readable checkpoint (" + std::string(e.what()).substr(0, 200) + ")");
  }
}

NamedTensors tensors_of(const c10::IValue& v, const fs::path& path) {
  if (!v.isGenericDict()) throw InputError(path.string() + ": checkpoint is not a dict of tensors");
  NamedTensors out;
  for (const auto& kv : v.toGenericDict()) {
    if (!kv.key().isString() || !kv.value().isTensor()) {
      throw InputError(path.string() + ": checkpoint entry is not name -> tensor");
    }
    out.emplace_back(kv.key().toStringRef(), kv.value().toTensor());
  }
  return out;
}

c10::Dict<std::string, at::Tensor> dict_of(const NamedTensors& tensors) {
  c10::Dict<std::string, at::Tensor> d;
  for (const auto& [name, t] : tensors) d.insert(name, t.detach().contiguous());
  return d;
}

void write_pickle(const fs::path& path, const c10::IValue& v) {
  const std::vector<char> bytes = torch::jit::pickle_save(v);
  // Not fsynced: a killed process cannot leave a torn file behind a rename, and after a power
  // loss resume falls back to the newest checkpoint that still loads.
  atomic_write(path, std::string(bytes.begin(), bytes.end()), /*durable=*/false);
}

int64_t int_field(const c10::impl::GenericDict& d, const std::string& key, const fs::path& path) {
  auto it = d.find(key);
  if (it == d.end() || !it->value().isInt()) throw InputError(path.string() + ": state has no integer '" + key + "'");
  return it->value().toInt();
}

}  // namespace

void save_tensor_dict(const fs::path& path, const NamedTensors& tensors) {
  write_pickle(path, c10::IValue(dict_of(tensors)));
}

NamedTensors load_tensor_dict(const fs::path& path) { return tensors_of(unpickle(path), path); }

void save_trainer_state(const fs::path& path, const TrainerState& state) {
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  d.insert(std::string("format"), std::string(kStateFormat));
  d.insert(std::string("step"), state.step);
  d.insert(std::string("sampler_seed"), static_cast<int64_t>(state.sampler.seed));
  d.insert(std::string("sampler_epoch"), state.sampler.epoch);
  d.insert(std::string("sampler_position"), state.sampler.position);
  d.insert(std::string("optimizer"), state.optimizer);
  d.insert(std::string("optimizer_steps"), state.optimizer_steps);
  c10::impl::GenericDict slots(c10::StringType::get(), c10::AnyType::get());
  for (const auto& [slot, tensors] : state.optimizer_state) slots.insert(slot, c10::IValue(dict_of(tensors)));
  d.insert(std::string("optimizer_state"), c10::IValue(slots));
  write_pickle(path, c10::IValue(d));
}

TrainerState load_trainer_state(const fs::path& path) {
  const c10::IValue v = unpickle(path);
  if (!v.isGenericDict()) throw InputError(path.string() + ": trainer state is not a dict");
  const auto d = v.toGenericDict();
  auto fmt = d.find(std::string("format"));
  const bool v1 = fmt != d.end() && fmt->value().isString() && fmt->value().toStringRef() == kStateFormatV1;
  if (fmt == d.end() || !fmt->value().isString() || (!v1 && fmt->value().toStringRef() != kStateFormat)) {
    throw InputError(path.string() + ": not a " + std::string(kStateFormat) + " file");
  }
  TrainerState s;
  s.step = int_field(d, "step", path);
  s.sampler.seed = static_cast<uint64_t>(int_field(d, "sampler_seed", path));
  s.sampler.epoch = int_field(d, "sampler_epoch", path);
  s.sampler.position = int_field(d, "sampler_position", path);
  if (v1) {
    auto mom = d.find(std::string("momentum"));
    if (mom == d.end()) throw InputError(path.string() + ": trainer state has no 'momentum'");
    NamedTensors buffers = tensors_of(mom->value(), path);
    if (!buffers.empty()) s.optimizer_state.emplace_back("momentum_buffer", std::move(buffers));
    s.optimizer = "sgd";
    s.optimizer_steps = s.step;
    return s;
  }
  auto name = d.find(std::string("optimizer"));
  if (name == d.end() || !name->value().isString()) throw InputError(path.string() + ": trainer state has no 'optimizer'");
  s.optimizer = name->value().toStringRef();
  s.optimizer_steps = int_field(d, "optimizer_steps", path);
  auto slots = d.find(std::string("optimizer_state"));
  if (slots == d.end() || !slots->value().isGenericDict()) {
    throw InputError(path.string() + ": trainer state has no 'optimizer_state' dict");
  }
  for (const auto& kv : slots->value().toGenericDict()) {
    if (!kv.key().isString()) throw InputError(path.string() + ": optimizer_state key is not a string");
    s.optimizer_state.emplace_back(kv.key().toStringRef(), tensors_of(kv.value(), path));
  }
  return s;
}

}  // namespace pathkernel
