#include "pathkernel/train/checkpoint.h"

#include <set>

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <ATen/Functions.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstring>
#include <memory>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/pickle.h"
#include "pathkernel/io/zip_archive.h"

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

struct StorageDtype {
  const char* name;
  at::ScalarType type;
};
// Numeric storages only: every bit pattern of these is a valid value.
constexpr StorageDtype kStorageDtypes[] = {{"Float", at::kFloat}, {"Double", at::kDouble}, {"Half", at::kHalf},
                                           {"BFloat16", at::kBFloat16}, {"Long", at::kLong}, {"Int", at::kInt}};

int64_t checked_mul(int64_t a, int64_t b, const CheckpointFile& c) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) c.fail("a tensor extent overflows");
  return r;
}

// The tensor a checkpoint describes, copied out of its storage record after every extent was
// checked against the record's size.
at::Tensor materialize(const PickledTensor& t, const CheckpointFile& c, const std::string& name, int64_t& budget) {
  const StorageDtype* dtype = nullptr;
  for (const auto& d : kStorageDtypes) {
    if (t.storage_type == d.name) dtype = &d;
  }
  if (!dtype) c.fail("tensor '" + name + "' has a " + t.storage_type + " storage, which checkpoints do not use");
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype->type));
  const int64_t record = c.archive().size_of("data/" + t.key);
  if (record < 0) c.fail("tensor '" + name + "': no storage record data/" + t.key);
  if (checked_mul(t.storage_numel, element, c) != record) {
    c.fail("tensor '" + name + "': storage data/" + t.key + " holds " + std::to_string(record) + " bytes, not " +
           std::to_string(t.storage_numel) + " elements");
  }
  int64_t last = t.offset, numel = 1;
  if (t.offset < 0) c.fail("tensor '" + name + "' has a negative offset");
  for (size_t d = 0; d < t.sizes.size(); ++d) {
    if (t.sizes[d] < 0 || t.strides[d] < 0) c.fail("tensor '" + name + "' has a negative size or stride");
    numel = checked_mul(numel, t.sizes[d], c);
    if (t.sizes[d] > 0 && __builtin_add_overflow(last, checked_mul(t.sizes[d] - 1, t.strides[d], c), &last)) {
      c.fail("a tensor extent overflows");
    }
  }
  if (numel > t.storage_numel) {
    c.fail("tensor '" + name + "' has more elements than its storage (" + std::to_string(t.storage_numel) + ")");
  }
  if (numel > 0 && last >= t.storage_numel) {
    c.fail("tensor '" + name + "' reaches element " + std::to_string(last) + " of a storage of " +
           std::to_string(t.storage_numel));
  }
  const int64_t bytes = checked_mul(numel, element, c);
  if (bytes > budget) {
    c.fail("its tensors would take more memory than such a file can describe (at '" + name + "': " +
           std::to_string(bytes) + " more bytes, " + std::to_string(budget) + " left of 4x the file's size); one "
           "storage reused by many entries?");
  }
  budget -= bytes;
  // Copied out of the record itself, as the view describes it: nothing but the tensor allocated.
  const std::string_view data = c.archive().read("data/" + t.key);
  const at::Tensor storage = at::from_blob(const_cast<char*>(data.data()), {t.storage_numel},
                                           at::TensorOptions().dtype(dtype->type));
  return storage.as_strided(t.sizes, t.strides, t.offset).clone(at::MemoryFormat::Contiguous);
}

}  // namespace

CheckpointFile::CheckpointFile(const fs::path& file) : path_(file.string()) {
  if (!fs::is_regular_file(file)) throw InputError(path_ + ": no such checkpoint file");
  bytes_ = read_file(file);
  parse();
}

CheckpointFile::CheckpointFile(std::string bytes, std::string name) : path_(std::move(name)), bytes_(std::move(bytes)) {
  parse();
}

CheckpointFile CheckpointFile::from_bytes(std::string bytes, std::string name) {
  return CheckpointFile(std::move(bytes), std::move(name));
}

void CheckpointFile::parse() {
  budget_ = 4 * static_cast<int64_t>(bytes_.size()) + (int64_t{1} << 20);
  zip_ = std::make_unique<ZipArchive>(bytes_, path_);
  if (zip_->has("byteorder") && zip_->read("byteorder") != "little") {
    fail("written on a big-endian machine, which is not supported");
  }
  root_ = unpickle(zip_->read("data.pkl"), path_);
}

CheckpointFile::~CheckpointFile() = default;

void CheckpointFile::fail(const std::string& what) const { throw InputError(path_ + ": " + what); }

at::Tensor CheckpointFile::tensor(const PickleValue& v, const std::string& name) const {
  if (v.kind != PickleValue::Kind::Tensor) fail("'" + name + "' is a " + v.kind_name() + ", not a tensor");
  // Views of one storage (tied weights, slices) are legitimate; their copies together stay within
  // a small multiple of the file.
  return materialize(*v.tensor, *this, name, budget_);
}

namespace {

NamedTensors tensors_of(const PickleValue& v, const CheckpointFile& c) {
  if (v.kind != PickleValue::Kind::Dict) c.fail("checkpoint is not a dict of tensors");
  NamedTensors out;
  std::set<std::string> seen;
  for (const auto& [k, t] : v.entries) {
    if (k->kind != PickleValue::Kind::String || t->kind != PickleValue::Kind::Tensor) {
      c.fail("checkpoint entry is not name -> tensor");
    }
    if (!seen.insert(k->s).second) c.fail("the key '" + k->s.substr(0, 80) + "' twice");
    out.emplace_back(k->s, c.tensor(*t, k->s));
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

int64_t int_field(const PickleValue& d, const std::string& key, const CheckpointFile& c) {
  const PickleValue* v = d.find(key);
  if (!v || v->kind != PickleValue::Kind::Int) c.fail("state has no integer '" + key + "'");
  return v->i;
}

const std::string* string_field(const PickleValue& d, const std::string& key) {
  const PickleValue* v = d.find(key);
  return v && v->kind == PickleValue::Kind::String ? &v->s : nullptr;
}

}  // namespace

void save_tensor_dict(const fs::path& path, const NamedTensors& tensors) {
  write_pickle(path, c10::IValue(dict_of(tensors)));
}

NamedTensors load_tensor_dict(const fs::path& path) {
  const CheckpointFile c(path);
  return tensors_of(c.root(), c);
}

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
  const CheckpointFile c(path);
  const PickleValue& d = c.root();
  if (d.kind != PickleValue::Kind::Dict) c.fail("trainer state is not a dict");
  const std::string* fmt = string_field(d, "format");
  const bool v1 = fmt && *fmt == kStateFormatV1;
  if (!fmt || (!v1 && *fmt != kStateFormat)) c.fail("not a " + std::string(kStateFormat) + " file");
  TrainerState s;
  s.step = int_field(d, "step", c);
  s.sampler.seed = static_cast<uint64_t>(int_field(d, "sampler_seed", c));
  s.sampler.epoch = int_field(d, "sampler_epoch", c);
  s.sampler.position = int_field(d, "sampler_position", c);
  if (v1) {
    const PickleValue* mom = d.find("momentum");
    if (!mom) c.fail("trainer state has no 'momentum'");
    NamedTensors buffers = tensors_of(*mom, c);
    if (!buffers.empty()) s.optimizer_state.emplace_back("momentum_buffer", std::move(buffers));
    s.optimizer = "sgd";
    s.optimizer_steps = s.step;
    return s;
  }
  const std::string* name = string_field(d, "optimizer");
  if (!name) c.fail("trainer state has no 'optimizer'");
  s.optimizer = *name;
  s.optimizer_steps = int_field(d, "optimizer_steps", c);
  const PickleValue* slots = d.find("optimizer_state");
  if (!slots || slots->kind != PickleValue::Kind::Dict) c.fail("trainer state has no 'optimizer_state' dict");
  for (const auto& [k, v] : slots->entries) {
    if (k->kind != PickleValue::Kind::String) c.fail("optimizer_state key is not a string");
    s.optimizer_state.emplace_back(k->s, tensors_of(*v, c));
  }
  return s;
}

}  // namespace pathkernel
