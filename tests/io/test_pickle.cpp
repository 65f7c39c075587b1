// The bounded checkpoint readers (zip_archive.cpp, pickle.cpp, CheckpointFile): files written by
// Python's torch.save and by LibTorch read the same as LibTorch's own unpickler reads them, and
// each crafted file of issue 8 is refused with the file named, without a crash or a large
// allocation.
#include <ATen/ATen.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <zlib.h>

#include "fixtures.h"
#include "unit_support.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/pickle.h"
#include "pathkernel/io/zip_archive.h"
#include "pathkernel/train/checkpoint.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;
using namespace std::string_literals;

std::string le(uint64_t v, int n) {
  std::string s;
  for (int k = 0; k < n; ++k) s += static_cast<char>((v >> (8 * k)) & 0xFF);
  return s;
}

// A stored zip archive of `records` (names as given), as torch.save lays it out.
std::string zip_of(const std::vector<std::pair<std::string, std::string>>& records) {
  std::string out, dir;
  for (const auto& [name, data] : records) {
    const uint32_t crc = crc32(0L, reinterpret_cast<const Bytef*>(data.data()), static_cast<uInt>(data.size()));
    const std::string common = le(20, 2) + le(0, 2) + le(0, 2) + le(0, 2) + le(0, 2) + le(crc, 4) + le(data.size(), 4) +
                               le(data.size(), 4) + le(name.size(), 2) + le(0, 2);
    dir += le(0x02014b50, 4) + le(20, 2) + common + le(0, 2) + le(0, 2) + le(0, 2) + le(0, 4) + le(out.size(), 4) + name;
    out += le(0x04034b50, 4) + common + name + data;
  }
  return out + dir + le(0x06054b50, 4) + le(0, 4) + le(records.size(), 2) + le(records.size(), 2) +
         le(dir.size(), 4) + le(out.size(), 4) + le(0, 2);
}

// Pickle pieces: a string, a small integer, a float32 tensor of `sizes`/`strides` at `offset`
// into storage `key` of `numel` elements.
std::string str(const std::string& s) { return "X" + le(s.size(), 4) + s; }
std::string i32(int64_t v) { return "J" + le(static_cast<uint64_t>(v), 4); }
std::string tensor(const std::string& key, int64_t numel, int64_t offset, std::vector<int64_t> sizes,
                   std::vector<int64_t> strides) {
  std::string t = "ctorch._utils\n_rebuild_tensor_v2\n((" + str("storage") + "ctorch\nFloatStorage\n" + str(key) +
                  str("cpu") + i32(numel) + "tQ" + i32(offset) + "(";
  for (int64_t s : sizes) t += i32(s);
  t += "t(";
  for (int64_t s : strides) t += i32(s);
  return t + "t\x89}tR";
}
std::string dict_pickle(const std::string& items) { return "\x80\x02}(" + items + "u."; }

std::string floats(int n) { return std::string(4 * static_cast<size_t>(n), '\0'); }

void expect_refused(const std::string& archive, const std::string& why) {
  testing::TempDir dir;
  testing::write_file(dir / "crafted.pt", archive, false);
  EXPECT_THROW_WITH(load_tensor_dict(dir / "crafted.pt"), InputError, "crafted.pt: ");
  EXPECT_THROW_WITH(load_tensor_dict(dir / "crafted.pt"), InputError, why);
}

TEST(PickleTest, PythonStateDictReadsWithItsViews) {
  // Written by tests/data/make_python_checkpoints.py: an OrderedDict with _metadata, a
  // transposed view, slices at an offset into a shared storage, float32 and float64. (LibTorch
  // 1.13's own pickle_load returns None for this file.)
  const NamedTensors t = load_tensor_dict(testing::kTestData / "python_state_dict.pt");
  ASSERT_EQ(t.size(), 5u);
  const std::vector<std::string> names = {"layer.weight", "layer.bias", "transposed", "slice", "same_storage"};
  const std::vector<at::Tensor> want = {
      at::arange(6, at::kFloat).reshape({2, 3}) / 4, at::tensor({0.5, -1.5}, at::kDouble),
      at::arange(12, at::kFloat).reshape({3, 4}).t(), at::arange(3, 7, at::kDouble),
      at::tensor({0.0, 3.0, 6.0, 9.0}, at::kDouble)};
  for (size_t i = 0; i < t.size(); ++i) {
    EXPECT_EQ(t[i].first, names[i]);
    EXPECT_EQ(t[i].second.scalar_type(), want[i].scalar_type()) << names[i];
    EXPECT_TRUE(at::equal(t[i].second, want[i])) << names[i] << "\n" << t[i].second;
    EXPECT_TRUE(t[i].second.is_contiguous());
  }
}

TEST(PickleTest, LibTorchWrittenFilesReadAsLibTorchReadsThem) {
  testing::TempDir dir;
  const NamedTensors t = {{"a", at::randn({3, 2})}, {"b", at::randn({4}, at::kDouble)}, {"c", at::arange(5, at::kLong)}};
  save_tensor_dict(dir / "w.pt", t);
  const std::string bytes = read_file(dir / "w.pt");
  const auto ref = torch::jit::pickle_load(std::vector<char>(bytes.begin(), bytes.end())).toGenericDict();
  const NamedTensors ours = load_tensor_dict(dir / "w.pt");
  ASSERT_EQ(ours.size(), ref.size());
  for (const auto& [name, tensor] : ours) EXPECT_TRUE(at::equal(tensor, ref.at(name).toTensor())) << name;
}

TEST(PickleTest, PythonOptimizerStateIsPlainData) {
  const CheckpointFile f(testing::kTestData / "python_adam_state.pt");
  const PickleValue* state = f.root().find("state");
  const PickleValue* groups = f.root().find("param_groups");
  ASSERT_TRUE(state && groups);
  ASSERT_EQ(state->entries.size(), 2u);
  EXPECT_EQ(state->entries[1].first->i, 1);  // integer keys
  const PickleValue& p0 = *state->entries[0].second;
  EXPECT_EQ(f.tensor(*p0.find("step"), "step").item<float>(), 2.0f);
  EXPECT_EQ(f.tensor(*p0.find("exp_avg"), "exp_avg").sizes(), (std::vector<int64_t>{2, 3}));
  ASSERT_EQ(groups->kind, PickleValue::Kind::List);
  const PickleValue& g = *groups->items.at(0);
  EXPECT_DOUBLE_EQ(g.find("lr")->f, 0.01);
  EXPECT_DOUBLE_EQ(g.find("betas")->items.at(1)->f, 0.99);
  EXPECT_EQ(g.find("amsgrad")->kind, PickleValue::Kind::Bool);
  EXPECT_EQ(g.find("foreach")->kind, PickleValue::Kind::None);
  EXPECT_THROW_WITH(f.tensor(*g.find("lr"), "lr"), InputError, "'lr' is a float, not a tensor");
}

TEST(PickleTest, AHandBuiltArchiveReadsAndLibTorchAgrees) {
  // The test's own writer and pickle pieces are right: a file made from them loads, in both
  // readers, with the view the pickle asks for.
  const float values[6] = {0, 1, 2, 3, 4, 5};
  const std::string data(reinterpret_cast<const char*>(values), sizeof values);
  const std::string file = zip_of({{"a/data.pkl", dict_pickle(str("w") + tensor("0", 6, 1, {2, 2}, {1, 2}))},
                                   {"a/data/0", data}, {"a/version", "3\n"}});
  testing::TempDir dir;
  testing::write_file(dir / "ok.pt", file, false);
  const NamedTensors t = load_tensor_dict(dir / "ok.pt");
  ASSERT_EQ(t.size(), 1u);
  EXPECT_TRUE(at::equal(t[0].second, at::tensor({1.0f, 3.0f, 2.0f, 4.0f}).reshape({2, 2})));
  const auto ref = torch::jit::pickle_load(std::vector<char>(file.begin(), file.end()));
  EXPECT_TRUE(at::equal(ref.toGenericDict().at("w").toTensor(), t[0].second));
}

TEST(PickleTest, CraftedArchivesAreRefusedWithTheFileNamed) {
  const std::string ok_pickle = dict_pickle(str("w") + tensor("0", 4, 0, {4}, {1}));
  // Extents outside the storage: offset, strides, sizes, negative values.
  expect_refused(zip_of({{"a/data.pkl", dict_pickle(str("w") + tensor("0", 4, 2, {4}, {1}))}, {"a/data/0", floats(4)}}),
                 "reaches element 5 of a storage of 4");
  expect_refused(zip_of({{"a/data.pkl", dict_pickle(str("w") + tensor("0", 4, 0, {2, 2}, {3, 1}))}, {"a/data/0", floats(4)}}),
                 "reaches element 4");
  expect_refused(zip_of({{"a/data.pkl", dict_pickle(str("w") + tensor("0", 4, 0, {-1}, {1}))}, {"a/data/0", floats(4)}}),
                 "negative size or stride");
  expect_refused(zip_of({{"a/data.pkl", dict_pickle(str("w") + tensor("0", 4, 0, {1 << 30, 1 << 30, 1 << 30}, {0, 0, 0}))},
                         {"a/data/0", floats(4)}}),
                 "a tensor extent overflows");
  // A broadcast view (zero strides) would allocate far more than the file holds.
  expect_refused(zip_of({{"a/data.pkl", dict_pickle(str("w") + tensor("0", 4, 0, {1 << 20, 1 << 20}, {0, 0}))},
                         {"a/data/0", floats(4)}}),
                 "more elements than its storage");
  // A 40-byte storage record claiming a billion elements: refused before any allocation.
  expect_refused(zip_of({{"a/data.pkl", dict_pickle(str("w") + tensor("0", 1000000000, 0, {10}, {1}))}, {"a/data/0", floats(10)}}),
                 "holds 40 bytes, not 1000000000 elements");
  expect_refused(zip_of({{"a/data.pkl", ok_pickle}}), "no storage record data/0");
  // Code and structure: a global that runs a command, nesting, a cycle, too many values.
  expect_refused(zip_of({{"a/data.pkl", "\x80\x02" "cos\nsystem\n" + str("touch x") + "\x85R."}}), "names os.system");
  expect_refused(zip_of({{"a/data.pkl", "\x80\x02)" + std::string(100000, '\x85') + "."}}), "nested more than 32 deep");
  expect_refused(zip_of({{"a/data.pkl", "\x80\x02}q\x00K\x01h\x00s."s}}), "changed after it was used");
  expect_refused(zip_of({{"a/data.pkl", "\x80\x02(" + std::string(300000, 'N') + "t."}}), "more than 262144 values");
  expect_refused(zip_of({{"a/data.pkl", "\x80\x02}(" + str("w")}}), "truncated");
  expect_refused(zip_of({{"a/data.pkl", "\x80\x02h\x07."}}), "unknown memo entry");
  expect_refused(zip_of({{"a/data.pkl", "\x80\x02" "d."}}), "opcode 0x64 is not used by checkpoints");
  expect_refused(zip_of({{"a/data.pkl", "\x80\x02N."}}), "not a dict of tensors");
  // The archive itself.
  std::string damaged = zip_of({{"a/data.pkl", ok_pickle}, {"a/data/0", floats(4)}});
  damaged[damaged.find(ok_pickle) + 10] ^= 1;
  expect_refused(damaged, "CRC-32 does not match");
  const std::string whole = zip_of({{"a/data.pkl", ok_pickle}, {"a/data/0", floats(4)}});
  expect_refused(whole.substr(0, whole.size() - 30), "no end-of-directory record");
  expect_refused(whole.substr(40), "outside the file");
  expect_refused(zip_of({{"a/data.pkl", ok_pickle}, {"b/data/0", floats(4)}}), "records in two top-level folders");
  expect_refused(zip_of({{"a/data.pkl", ok_pickle}, {"a/data.pkl", ok_pickle}}), "two records named a/data.pkl");
  std::string compressed = whole;
  compressed[8] = 8;  // local header method
  compressed[compressed.rfind(std::string("PK\x01\x02", 4)) + 10] = 8;  // central method of the last record
  expect_refused(compressed, "is compressed");
  // Issue 22: one 256 KB storage memoized once and named by 40 entries (BINPUT, then BINGET):
  // under the value limit, but 10 MB of tensors from a file of 256 KB. The real case, 200,000
  // entries of a 4 MB storage, would have been 800 GB.
  std::string reused = str("w0") + tensor("0", 1 << 16, 0, {1 << 16}, {1}) + "q\x01";
  for (int i = 1; i < 40; ++i) reused += str("w" + std::to_string(i)) + "h\x01";
  expect_refused(zip_of({{"a/data.pkl", dict_pickle(reused)}, {"a/data/0", floats(1 << 16)}}),
                 "one storage reused by many entries?");
  // The same name twice: which tensor would the model get?
  expect_refused(zip_of({{"a/data.pkl", dict_pickle(str("w") + tensor("0", 4, 0, {4}, {1}) + str("w") +
                                                    tensor("0", 4, 0, {2}, {1}))},
                         {"a/data/0", floats(4)}}),
                 "the key 'w' twice");
}

TEST(PickleTest, TrainerStateFieldsAreTyped) {
  testing::TempDir dir;
  testing::write_file(dir / "s.pt", zip_of({{"a/data.pkl", dict_pickle(str("format") + str(kStateFormat) + str("step") + str("7"))}}), false);
  EXPECT_THROW_WITH(load_trainer_state(dir / "s.pt"), InputError, "s.pt: state has no integer 'step'");
}

}  // namespace
}  // namespace pathkernel
