#include <ATen/ATen.h>
#include <sys/stat.h>
#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fstream>

#include "fixtures.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/io/sha256.h"
#include "pathkernel/train/checkpoint.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

TEST(CheckpointTest, TensorDictRoundTripsInOrderWithDtypes) {
  testing::TempDir dir;
  const NamedTensors t = {{"layers.1.weight", at::randn({3, 2})},
                          {"layers.0.bias", at::randn({4}, at::kDouble)},
                          {"x", at::arange(5, at::kLong)}};
  save_tensor_dict(dir / "a.pt", t);
  const NamedTensors back = load_tensor_dict(dir / "a.pt");
  ASSERT_EQ(back.size(), 3u);
  for (size_t i = 0; i < t.size(); ++i) {
    EXPECT_EQ(back[i].first, t[i].first);
    EXPECT_EQ(back[i].second.scalar_type(), t[i].second.scalar_type());
    EXPECT_TRUE(at::equal(back[i].second, t[i].second));
  }
  for (const auto& e : fs::directory_iterator(dir.path())) {
    EXPECT_EQ(e.path().filename(), "a.pt") << "no temporary file is left behind";
  }
}

TEST(CheckpointTest, TrainerStateRoundTrips) {
  testing::TempDir dir;
  TrainerState s;
  s.step = 17;
  s.sampler = {99, 2, 128};
  s.optimizer = "adam";
  s.optimizer_steps = 7;
  s.optimizer_state = {{"exp_avg", {{"w", at::randn({2, 2})}}}, {"exp_avg_sq", {{"w", at::rand({2, 2})}}}};
  save_trainer_state(dir / "s.pt", s);
  const TrainerState b = load_trainer_state(dir / "s.pt");
  EXPECT_EQ(b.step, 17);
  EXPECT_EQ(b.sampler.seed, 99u);
  EXPECT_EQ(b.sampler.epoch, 2);
  EXPECT_EQ(b.sampler.position, 128);
  EXPECT_EQ(b.optimizer, "adam");
  EXPECT_EQ(b.optimizer_steps, 7);
  ASSERT_EQ(b.optimizer_state.size(), 2u);
  EXPECT_EQ(b.optimizer_state[1].first, "exp_avg_sq");
  EXPECT_TRUE(at::equal(b.optimizer_state[1].second[0].second, s.optimizer_state[1].second[0].second));
  EXPECT_THROW_WITH(load_trainer_state(dir / "nothing.pt"), InputError, "no such checkpoint file");
}

TEST(CheckpointTest, PreviousStateFormatStillLoads) {
  // A trainer state as runs made before the optimizer seam wrote it (format /1, SGD buffers).
  testing::TempDir dir;
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  d.insert(std::string("format"), std::string("pathkernel-trainer-state/1"));
  d.insert(std::string("step"), int64_t{5});
  d.insert(std::string("sampler_seed"), int64_t{3});
  d.insert(std::string("sampler_epoch"), int64_t{0});
  d.insert(std::string("sampler_position"), int64_t{50});
  c10::Dict<std::string, at::Tensor> mom;
  mom.insert("layers.0.weight", at::full({2, 3}, 0.5));
  d.insert(std::string("momentum"), c10::IValue(mom));
  const std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(d));
  testing::write_file(dir / "old.pt", std::string(bytes.begin(), bytes.end()), false);
  const TrainerState s = load_trainer_state(dir / "old.pt");
  EXPECT_EQ(s.step, 5);
  EXPECT_EQ(s.optimizer, "sgd");
  EXPECT_EQ(s.optimizer_steps, 5);
  ASSERT_EQ(s.optimizer_state.size(), 1u);
  EXPECT_EQ(s.optimizer_state[0].first, "momentum_buffer");
  EXPECT_TRUE(at::equal(s.optimizer_state[0].second[0].second, at::full({2, 3}, 0.5)));
}

TEST(CheckpointTest, CorruptFilesGiveClearErrors) {
  testing::TempDir dir;
  testing::write_file(dir / "junk.pt", "this is not a pickle", false);
  EXPECT_THROW_WITH(load_tensor_dict(dir / "junk.pt"), InputError, "junk.pt: not a readable checkpoint");
  save_tensor_dict(dir / "w.pt", {{"a", at::ones({2})}});
  EXPECT_THROW_WITH(load_trainer_state(dir / "w.pt"), InputError, "not a pathkernel-trainer-state/2 file");
  const std::string bytes = [&] {
    std::ifstream in(dir / "w.pt", std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }();
  testing::write_file(dir / "cut.pt", bytes.substr(0, bytes.size() / 2), false);
  EXPECT_THROW_WITH(load_tensor_dict(dir / "cut.pt"), InputError, "cut.pt");
}

TEST(RunDirTest, StepLogDropsACrashCutLastLineOnly) {
  testing::TempDir dir;
  testing::write_file(dir / "s.jsonl", "{\"step\":0}\n{\"step\":1}\n{\"step\":2,\"lo", false);
  EXPECT_EQ(read_step_log(dir / "s.jsonl").size(), 2u);
  truncate_step_log(dir / "s.jsonl", 1);
  EXPECT_EQ(read_step_log(dir / "s.jsonl").size(), 1u);
  testing::write_file(dir / "bad.jsonl", "{\"step\":0}\nnot json\n{\"step\":2}\n", false);
  EXPECT_THROW_WITH(read_step_log(dir / "bad.jsonl"), InputError, "bad.jsonl:2: not valid JSON");
  testing::write_file(dir / "gap.jsonl", "{\"step\":0}\n{\"step\":2}\n", false);
  EXPECT_THROW_WITH(read_step_log(dir / "gap.jsonl"), InputError, "expected step 1");
  // Found by the fuzzer in CI: a step number that is a huge float (UBSan: float-to-int overflow).
  testing::write_file(dir / "float.jsonl", "{\"step\":1e41}\n", false);
  EXPECT_THROW_WITH(read_step_log(dir / "float.jsonl"), InputError, "float.jsonl:1: expected step 0");
  testing::write_file(dir / "array.jsonl", "[1]\n", false);
  EXPECT_THROW_WITH(read_step_log(dir / "array.jsonl"), InputError, "array.jsonl:1: expected step 0");
}

TEST(RunDirTest, CheckpointStepsNeedWeightsAndState) {
  testing::TempDir dir;
  RunDir run(dir.path());
  fs::create_directories(run.checkpoints_dir());
  save_tensor_dict(run.checkpoint(0), {{"a", at::ones({1})}});
  save_trainer_state(run.state(0), TrainerState{});
  save_tensor_dict(run.checkpoint(5), {{"a", at::ones({1})}});  // no state: not a checkpoint
  save_trainer_state(run.state(9), TrainerState{});             // no weights: not a checkpoint
  testing::write_file(run.checkpoints_dir() / "step_00000007.pt.tmp-123", "x", false);
  EXPECT_EQ(run.checkpoint_steps(), (std::vector<int64_t>{0}));
  EXPECT_EQ(run.checkpoint(12).filename(), "step_00000012.pt");
  EXPECT_THROW_WITH(run.read_manifest(), InputError, "manifest.json: missing");
}

}  // namespace
}  // namespace pathkernel

#include "pathkernel/io/npy.h"

namespace pathkernel {
namespace {

TEST(NpyTest, RoundTripsAndRejectsOtherFiles) {
  testing::TempDir dir;
  for (const at::Tensor& t : {at::randn({3, 4, 5}, at::kDouble), at::arange(7, at::kLong), at::randn({2, 1})}) {
    save_npy(dir / "a.npy", t);
    const at::Tensor back = load_npy(dir / "a.npy");
    EXPECT_EQ(back.sizes(), t.sizes());
    EXPECT_TRUE(at::equal(back, t));
  }
  // The header numpy expects: magic, version 1.0, and a header padded to 64 bytes.
  const std::string bytes = read_file(dir / "a.npy");
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  EXPECT_EQ((10 + (static_cast<uint8_t>(bytes[8]) | (static_cast<uint8_t>(bytes[9]) << 8))) % 64, 0);
  testing::write_file(dir / "b.npy", "not numpy", false);
  EXPECT_THROW_WITH(load_npy(dir / "b.npy"), InputError, "b.npy: not a .npy file");
}

TEST(NpyTest, ShapesAreParsedStrictlyAndCheckedBeforeAllocating) {
  testing::TempDir dir;
  auto npy = [](const std::string& shape, size_t data_bytes) {
    std::string h = "{'descr': '<f8', 'fortran_order': False, 'shape': " + shape + ", }";
    h.append(63 - (10 + h.size()) % 64, ' ');
    h += '\n';
    return std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(h.size() & 0xFF) + static_cast<char>(h.size() >> 8) + h +
           std::string(data_bytes, '\0');
  };
  testing::write_file(dir / "ok.npy", npy("(2, 3)", 48), false);
  EXPECT_EQ(load_npy(dir / "ok.npy").sizes(), (std::vector<int64_t>{2, 3}));
  testing::write_file(dir / "one.npy", npy("(3,)", 24), false);
  EXPECT_EQ(load_npy(dir / "one.npy").sizes(), (std::vector<int64_t>{3}));
  // The fuzzer's first find (tests/fuzz/regressions/npy): a shape entry that is not a number
  // threw std::invalid_argument, exit 1.
  const std::string crash =
      read_file(fs::path(PATHKERNEL_FUZZ_DIR) / "regressions/npy/crash-b3298b78fbc433bcd4587d3bb2f8fd8cd99e6889");
  testing::write_file(dir / "crash.npy", crash, false);
  EXPECT_THROW_WITH(load_npy(dir / "crash.npy"), InputError, "crash.npy: ");
  testing::write_file(dir / "word.npy", npy("(2, x)", 48), false);
  EXPECT_THROW_WITH(load_npy(dir / "word.npy"), InputError, "shape entry 'x' is not a whole number");
  testing::write_file(dir / "gap.npy", npy("(2,,3)", 48), false);
  EXPECT_THROW_WITH(load_npy(dir / "gap.npy"), InputError, "malformed shape");
  // A terabyte promised by a small file is refused before allocation; a product that wraps too.
  testing::write_file(dir / "huge.npy", npy("(1000000, 1000000)", 8), false);
  EXPECT_THROW_WITH(load_npy(dir / "huge.npy"), InputError, "data size does not match the shape");
  testing::write_file(dir / "wrap.npy", npy("(4294967296, 4294967296, 4)", 0), false);
  EXPECT_THROW_WITH(load_npy(dir / "wrap.npy"), InputError, "shape too large");
  // npy_info (a merge's shards' attributions, read before their data): the same checks, the
  // header's shape and type without the data.
  const NpyInfo info = npy_info(dir / "ok.npy");
  EXPECT_EQ(info.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(info.type, at::kDouble);
  EXPECT_EQ(npy_info(dir / "one.npy").shape, (std::vector<int64_t>{3}));
  testing::write_file(dir / "short.npy", npy("(2, 3)", 40), false);  // truncated data
  EXPECT_THROW_WITH(npy_info(dir / "short.npy"), InputError, "short.npy: data size does not match the shape");
  EXPECT_THROW_WITH(npy_info(dir / "huge.npy"), InputError, "data size does not match the shape");
  EXPECT_THROW_WITH(npy_info(dir / "word.npy"), InputError, "shape entry 'x' is not a whole number");
  testing::write_file(dir / "stub.npy", std::string("\x93NUMPY\x01\x00\xff\x00{", 11), false);  // header cut short
  EXPECT_THROW_WITH(npy_info(dir / "stub.npy"), InputError, "stub.npy: unsupported .npy version or truncated header");
}

// Issue 22: the header was matched by substring, so a header with a key twice was read by
// whichever occurrence a search met first. It is parsed as the dict it is now.
TEST(NpyTest, TheHeaderIsParsedAsADictWithEachKeyOnce) {
  testing::TempDir dir;
  auto npy = [](const std::string& dict, size_t data_bytes) {
    std::string h = dict;
    h.append(63 - (10 + h.size()) % 64, ' ');
    h += '\n';
    return std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(h.size() & 0xFF) + static_cast<char>(h.size() >> 8) + h +
           std::string(data_bytes, '\0');
  };
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", "the key 'descr' twice"},
      {"{'descr': '<f8', 'fortran_order': True, 'fortran_order': False, 'shape': (2,), }",
       "the key 'fortran_order' twice"},
      {"{'descr': '<f8', 'fortran_order': False, 'shape': (2,), 'shape': (1,), }", "the key 'shape' twice"},
      {"{'descr': '<f8', 'fortran_order': False, 'shape': (2,), 'extra': 1}", "an unknown key 'extra'"},
      {"{'descr': '<f8', 'shape': (2,), }", "not all of descr, fortran_order and shape"},
      {"{'descr': '<f8', 'fortran_order': False, 'shape': (2,), } x", "text after the dict"},
      {"{'descr': '<f8' 'fortran_order': False, 'shape': (2,), }", "no ',' or '}' after 'descr'"},
      {"{'descr': '<f8', 'fortran_order': maybe, 'shape': (2,), }", "fortran_order must be True or False"},
      {"'descr': '<f8', 'fortran_order': False, 'shape': (2,)", "expected '{'"},
  };
  for (const auto& [dict, why] : bad) {
    SCOPED_TRACE(dict);
    testing::write_file(dir / "h.npy", npy(dict, 16), false);
    EXPECT_THROW_WITH(load_npy(dir / "h.npy"), InputError, "h.npy: malformed header (" + why);
  }
  // numpy's own spellings still read: double quotes, no trailing comma, keys in another order.
  testing::write_file(dir / "ok.npy", npy("{\"shape\": (2,), \"fortran_order\": False, \"descr\": \"<f8\"}", 16), false);
  EXPECT_EQ(load_npy(dir / "ok.npy").sizes(), (std::vector<int64_t>{2}));
}

// A .npy that is a FIFO hung forever, one linked to /dev/zero ran out of memory: only regular
// files are read, each no larger than it says.
TEST(NpyTest, OnlyRegularFilesAreRead) {
  testing::TempDir dir;
  ASSERT_EQ(::mkfifo((dir / "fifo.npy").c_str(), 0600), 0);
  EXPECT_THROW_WITH(load_npy(dir / "fifo.npy"), InputError, "fifo.npy: not a regular file");
  fs::create_symlink("/dev/zero", dir / "zero.npy");
  EXPECT_THROW_WITH(load_npy(dir / "zero.npy"), InputError, "zero.npy: not a regular file");
  fs::create_directories(dir / "folder.npy");
  EXPECT_THROW_WITH(load_npy(dir / "folder.npy"), InputError, "folder.npy: is a folder");
  EXPECT_THROW_WITH(read_file(dir / "fifo.npy"), InputError, "not a regular file");
  EXPECT_THROW_WITH(read_json(dir / "zero.npy"), InputError, "not a regular file");
  fs::create_symlink("/dev/zero", dir / "steps.jsonl");  // a step log: bad_alloc before
  EXPECT_THROW_WITH(read_step_log(dir / "steps.jsonl"), InputError, "steps.jsonl: not a regular file");
  EXPECT_THROW_WITH(sha256_file(dir / "fifo.npy"), InputError, "fifo.npy: not a regular file");
  EXPECT_THROW_WITH(npy_info(dir / "fifo.npy"), InputError, "fifo.npy: not a regular file");
  EXPECT_THROW_WITH(npy_info(dir / "zero.npy"), InputError, "zero.npy: not a regular file");
}

}  // namespace
}  // namespace pathkernel
