// What each libFuzzer harness does with one input: hand it to one of the tool's readers, which
// may accept it or refuse it as bad input (exit status 2), and nothing else. The harnesses
// (fuzz_<reader>.cpp) and the unit test of the kept inputs (test_fuzz_inputs.cpp) share these.
#include "pathkernel/io/csv.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/idx.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/lr_schedule.h"
#include "pathkernel/train/train_config.h"
#include <ATen/core/Tensor.h>

#include "fuzz_util.h"
#include "readers.h"

namespace pathkernel::fuzz {
namespace {
void touch_all(const pathkernel::CheckpointFile& f, const pathkernel::PickleValue& v, int depth) {
  using Kind = pathkernel::PickleValue::Kind;
  if (depth > pathkernel::kMaxPickleDepth + 1) std::abort();  // the reader bounds nesting
  if (v.kind == Kind::Tensor) (void)f.tensor(v, "t").sum();
  for (const auto& item : v.items) touch_all(f, *item, depth + 1);
  for (const auto& [k, item] : v.entries) touch_all(f, *item, depth + 1);
}
}  // namespace

// Checkpoints: the zip archive, the restricted unpickler, tensor extents; as weights, as a
// trainer state, and every tensor anywhere in the file (Python optimizer state).
void fuzz_checkpoint(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  refuse_only_as_bad_input([&] {
    const CheckpointFile f = CheckpointFile::from_bytes(bytes, "fuzz.pt");
    touch_all(f, f.root(), 0);
  });
  const auto path = scratch("c.pt", data, size);
  refuse_only_as_bad_input([&] { (void)load_tensor_dict(path); });
  refuse_only_as_bad_input([&] { (void)load_trainer_state(path); });
}

// IDX files (raw or gzipped): header, dimensions, data length, as images and as labels.
void fuzz_idx(const uint8_t* data, size_t size) {
  const auto path = scratch("train-images-idx3-ubyte", data, size);
  for (int ndims : {1, 3}) refuse_only_as_bad_input([&] { (void)read_idx(path, ndims); });
}

// NumPy .npy files: magic, header dictionary, shape, dtype, data length; npy_info (the header
// alone) accepts exactly what load_npy accepts, with its shape and type.
void fuzz_npy(const uint8_t* data, size_t size) {
  const auto path = scratch("a.npy", data, size);
  at::Tensor t;
  refuse_only_as_bad_input([&] { t = load_npy(path); });
  if (t.defined()) (void)t.sum();
  bool info = false;
  refuse_only_as_bad_input([&] {
    const NpyInfo i = npy_info(path);
    if (!t.defined() || t.sizes() != at::IntArrayRef(i.shape) || t.scalar_type() != i.type) std::abort();
    info = true;
  });
  if (t.defined() && !info) std::abort();
}

// A run's manifest.json: JSON, the training config inside it, and its validation.
void fuzz_manifest(const uint8_t* data, size_t size) {
  const auto path = scratch("manifest.json", data, size);
  refuse_only_as_bad_input([&] {
    const nlohmann::json j = read_json(path);
    const TrainConfig c = train_config_from_json(j.at("config"), path.string());
    c.validate();
    (void)c.optimizer_options();
  });
}

// A run's steps.jsonl: lines, step order, and each record checked against a run of 256
// training examples in batches of at most 8.
void fuzz_step_log(const uint8_t* data, size_t size) {
  const auto path = scratch("steps.jsonl", data, size);
  refuse_only_as_bad_input([&] {
    const auto log = read_step_log(path);
    check_step_records(log, 256, 8, path.string());
    for (const auto& rec : log) {  // what the replayer reads once the checks passed
      (void)rec.at("lr").get<double>();
      (void)rec.at("batch").get<std::vector<int64_t>>();
    }
  });
}

// The analysis tables report reads (steps.csv, probes.csv).
void fuzz_csv(const uint8_t* data, size_t size) {
  const auto path = scratch("steps.csv", data, size);
  refuse_only_as_bad_input([&] {
    const Table t = read_csv(path);
    for (const auto& [name, col] : t.cols) {
      if (col.size() != t.rows) std::abort();  // every column has every row
    }
  });
}

// A `file:` learning-rate schedule (one rate per line, comments) for a run of 50 steps, and
// the schedule grammar itself (the input's first line as a spec).
void fuzz_lr_schedule(const uint8_t* data, size_t size) {
  const auto path = scratch("rates.txt", data, size);
  refuse_only_as_bad_input([&] {
    const LrSchedule s("file:rates.txt", 0.1, 50, path.parent_path().string());
    for (int64_t k = 0; k < 50; ++k) {
      if (!(s.at(k) > 0)) std::abort();  // a schedule that loads gives positive rates
    }
  });
  const std::string text(reinterpret_cast<const char*>(data), size);
  const std::string spec = text.substr(0, text.find('\n'));
  if (spec.find("file:") == std::string::npos) {
    refuse_only_as_bad_input([&] {
      const LrSchedule s(spec, 0.1, 50);
      for (int64_t k = 0; k < 50; ++k) {
        if (!(s.at(k) > 0)) std::abort();
      }
    });
  }
}

const std::vector<Reader>& readers() {
  static const std::vector<Reader> all = {
     {"checkpoint", fuzz_checkpoint}, {"idx", fuzz_idx}, {"npy", fuzz_npy}, {"manifest", fuzz_manifest}, {"step_log", fuzz_step_log}, {"csv", fuzz_csv}, {"lr_schedule", fuzz_lr_schedule}};
  return all;
}

}  // namespace pathkernel::fuzz
