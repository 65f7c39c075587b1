// Training, resume, divergence and replay on tiny synthetic IDX data.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <ATen/core/Dict.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fstream>
#include <functional>

#include "fixtures.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/trainer.h"
#include "pathkernel/trajectory/replay.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    testing::write_synthetic_idx(tmp_ / "data", 90, 30);
  }
  TrainConfig config(const std::string& name) const {
    TrainConfig c;
    c.data_dir = (tmp_ / "data").string();
    c.model = "mlp:6:tanh";
    c.steps = 40;
    c.batch = 16;
    c.lr = 0.2;
    c.momentum = 0.9;
    c.weight_decay = 1e-3;
    c.seed = 11;
    c.checkpoint_every = 10;
    c.out = (tmp_ / name).string();
    return c;
  }
  testing::TempDir tmp_;
};

void expect_same_weights(const fs::path& a, const fs::path& b) {
  const NamedTensors x = load_tensor_dict(a), y = load_tensor_dict(b);
  ASSERT_EQ(x.size(), y.size());
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(x[i].first, y[i].first);
    EXPECT_TRUE(at::equal(x[i].second, y[i].second)) << x[i].first << " differs";
  }
}

TEST_F(TrainerTest, WritesACompleteRunDirectory) {
  const TrainSummary s = train(config("run"), "pathkernel train (test)");
  EXPECT_EQ(s.status, "complete");
  EXPECT_EQ(s.steps_completed, 40);
  EXPECT_GT(s.test_accuracy, 0.9) << "the synthetic classes are separable";
  const RunDir dir(config("run").out);
  EXPECT_TRUE(dir.complete());
  EXPECT_EQ(dir.checkpoint_steps(), (std::vector<int64_t>{0, 10, 20, 30, 40}));
  const auto m = dir.read_manifest();
  EXPECT_EQ(m["model"]["spec"], "mlp:6:tanh");
  EXPECT_EQ(m["model"]["parameters"][0]["name"], "layers.0.weight");
  EXPECT_EQ(m["data"]["files"]["train_images"]["sha256"].get<std::string>().size(), 64u);
  EXPECT_EQ(m["threads"]["torch"], 1);
  EXPECT_EQ(m["command_line"], "pathkernel train (test)");
  const auto log = read_step_log(dir.steps_log());
  ASSERT_EQ(log.size(), 40u);
  for (const char* key : {"lr", "batch", "loss", "accuracy", "grad_norm", "layer_grad_norms", "pe_grad_norm",
                          "update_norm", "step_seconds"}) {
    EXPECT_TRUE(log[5].contains(key)) << key;
  }
  EXPECT_EQ(log[4]["batch"].size(), 16u);
  EXPECT_EQ(log[5]["batch"].size(), 10u) << "90 examples: the last batch of an epoch has 10";
  EXPECT_EQ(log[5]["layer_grad_norms"].size(), 2u);
  const auto summary = nlohmann::json::parse(read_file(dir.summary()));
  EXPECT_EQ(summary["steps_completed"], 40);
  EXPECT_DOUBLE_EQ(summary["final_loss"].get<double>(), log[39]["loss"].get<double>());
  EXPECT_THROW_WITH(train(config("run"), ""), InputError, "already exists and is not empty");
}

TEST_F(TrainerTest, ResumeAfterACrashIsBitIdentical) {
  train(config("full"), "");
  train(config("cut"), "");
  // Make "cut" look killed after step 23: checkpoints past 20 gone, a torn log line, no marker.
  const RunDir cut(config("cut").out);
  for (int64_t s : {30, 40}) {
    fs::remove(cut.checkpoint(s));
    fs::remove(cut.state(s));
  }
  fs::remove(cut.complete_marker());
  fs::remove(cut.summary());
  truncate_step_log(cut.steps_log(), 23);
  std::ofstream(cut.steps_log(), std::ios::app) << "{\"step\":23,\"lr\":0.";
  const TrainSummary s = resume(cut.root(), "");
  EXPECT_EQ(s.status, "complete");
  expect_same_weights(cut.checkpoint(40), RunDir(config("full").out).checkpoint(40));
  const auto a = read_step_log(cut.steps_log()), b = read_step_log(RunDir(config("full").out).steps_log());
  ASSERT_EQ(a.size(), b.size());
  for (size_t k = 0; k < a.size(); ++k) EXPECT_EQ(a[k]["loss"], b[k]["loss"]) << "step " << k;
  // Resuming a complete run changes nothing.
  EXPECT_EQ(resume(cut.root(), "").steps_completed, 40);
}

TEST_F(TrainerTest, DivergenceStopsWithAValidRunDirectory) {
  TrainConfig c = config("div");
  c.lr = 1e35;
  c.momentum = 0;
  EXPECT_THROW_WITH(train(c, ""), DivergenceError, "not finite");
  const RunDir dir(c.out);
  EXPECT_FALSE(dir.complete());
  const auto summary = nlohmann::json::parse(read_file(dir.summary()));
  EXPECT_EQ(summary["status"], "diverged");
  const int64_t k = summary["steps_completed"].get<int64_t>();
  EXPECT_EQ(static_cast<int64_t>(read_step_log(dir.steps_log()).size()), k);
  EXPECT_EQ(dir.checkpoint_steps().back(), k);
  for (const auto& [name, t] : load_tensor_dict(dir.checkpoint(k))) EXPECT_TRUE(at::isfinite(t).all().item<bool>());
  Replayer(dir.root()).verify();  // the valid part replays exactly
  EXPECT_THROW_WITH(resume(dir.root(), ""), InputError, "diverged");
}

TEST_F(TrainerTest, ResumeAndReplayAreBitIdenticalWithEveryOptimizer) {
  struct Case {
    const char* name;
    std::function<void(TrainConfig&)> set;
  };
  const std::vector<Case> cases = {
      {"nesterov", [](TrainConfig& c) { c.nesterov = true; }},
      {"dampening", [](TrainConfig& c) { c.dampening = 0.3; }},
      {"adam", [](TrainConfig& c) { c.optimizer = "adam", c.momentum = 0, c.lr = 0.01; }},
      {"adamw", [](TrainConfig& c) { c.optimizer = "adamw", c.momentum = 0, c.lr = 0.01, c.weight_decay = 0.1; }},
      {"rmsprop", [](TrainConfig& c) { c.optimizer = "rmsprop", c.momentum = 0.5, c.centered = true, c.lr = 0.01; }},
      {"adagrad", [](TrainConfig& c) {
         c.optimizer = "adagrad", c.momentum = 0, c.lr = 0.05, c.lr_decay = 0.01, c.initial_accumulator = 0.1;
         c.eps = 1e-10;
       }},
      {"adadelta", [](TrainConfig& c) { c.optimizer = "adadelta", c.momentum = 0, c.lr = 1.0, c.eps = 1e-6; }}};
  for (const auto& cs : cases) {
    TrainConfig full = config(std::string("full-") + cs.name), cut = config(std::string("cut-") + cs.name);
    cs.set(full);
    cs.set(cut);
    train(full, "");
    train(cut, "");
    const RunDir dir(cut.out);
    for (int64_t s : {30, 40}) {
      fs::remove(dir.checkpoint(s));
      fs::remove(dir.state(s));
    }
    fs::remove(dir.complete_marker());
    fs::remove(dir.summary());
    truncate_step_log(dir.steps_log(), 27);
    EXPECT_EQ(resume(dir.root(), "").status, "complete") << cs.name;
    expect_same_weights(dir.checkpoint(40), RunDir(full.out).checkpoint(40));
    const TrainerState a = load_trainer_state(dir.state(40)), b = load_trainer_state(RunDir(full.out).state(40));
    const std::string kind = cs.name[0] == 'a' || cs.name[0] == 'r' ? std::string(cs.name) : "sgd";
    EXPECT_EQ(a.optimizer, kind);
    ASSERT_EQ(a.optimizer_state.size(), b.optimizer_state.size()) << cs.name;
    ASSERT_FALSE(a.optimizer_state.empty()) << cs.name;
    for (size_t i = 0; i < a.optimizer_state.size(); ++i) {
      for (size_t j = 0; j < a.optimizer_state[i].second.size(); ++j) {
        EXPECT_TRUE(at::equal(a.optimizer_state[i].second[j].second, b.optimizer_state[i].second[j].second))
            << cs.name << " " << a.optimizer_state[i].first;
      }
    }
    Replayer(full.out).verify();
    // The optimizer's manifest entry names its settings.
    const auto m = RunDir(full.out).read_manifest();
    EXPECT_EQ(m["optimizer"]["name"], kind);
  }
}

TEST_F(TrainerTest, TamperedOrMalformedOptimizerStateIsCaughtWithTheFileNamed) {
  TrainConfig c = config("adam");
  c.optimizer = "adam";
  c.momentum = 0;
  c.lr = 0.01;
  train(c, "");
  const RunDir dir(c.out);
  TrainerState st = load_trainer_state(dir.state(20));
  st.optimizer_state[1].second[0].second[0][0] += 1e-7f;  // exp_avg_sq, one entry
  save_trainer_state(dir.state(20), st);
  EXPECT_THROW_WITH(Replayer(dir.root()).verify(), ReplayMismatchError,
                    "checkpoint 20: optimizer state 'exp_avg_sq.layers.0.weight' is not reproduced");
  st.optimizer_state[0].second[0].second = at::zeros({3, 3});
  save_trainer_state(dir.state(20), st);
  // The checkpoint's digest catches any change to its files first ...
  EXPECT_THROW_WITH(Replayer(dir.root()).seek(25), InputError, dir.state(20).string() + ": does not match its digest");
  // ... and without a digest (runs made before digests) the state itself is checked.
  fs::remove(dir.digest(20));
  fs::remove(dir.digest(10));
  EXPECT_THROW_WITH(Replayer(dir.root()).seek(25), InputError, dir.state(20).string() + ": optimizer state 'exp_avg.");
  st = load_trainer_state(dir.state(10));
  st.step = st.optimizer_steps = 20;
  st.optimizer_state.pop_back();
  save_trainer_state(dir.state(20), st);
  EXPECT_THROW_WITH(Replayer(dir.root()).seek(25), InputError, "has no 'exp_avg_sq'");
  st = load_trainer_state(dir.state(10));
  st.optimizer = "sgd";
  save_trainer_state(dir.state(10), st);
  EXPECT_THROW_WITH(Replayer(dir.root()).seek(15), InputError, "holds the state of optimizer 'sgd'");
}

TEST_F(TrainerTest, ADamagedCheckpointIsCaughtByItsDigestAndResumeFallsBack) {
  train(config("run"), "");
  const RunDir dir(config("run").out);
  fs::remove(dir.complete_marker());
  fs::remove(dir.summary());
  // One flipped bit in the newest checkpoint: it still loads, but it is not what was written.
  std::string bytes = read_file(dir.checkpoint(40));
  bytes[bytes.size() / 2] ^= 0x10;
  atomic_write(dir.checkpoint(40), bytes);
  EXPECT_THROW_WITH(Replayer(dir.root()).seek(40), InputError, "step_00000040.pt: does not match its digest");
  // Resume falls back to checkpoint 30 and ends bit-identical to an intact run.
  truncate_step_log(dir.steps_log(), 40);
  train(config("ref"), "");
  EXPECT_EQ(resume(dir.root(), "").status, "complete");
  expect_same_weights(dir.checkpoint(40), RunDir(config("ref").out).checkpoint(40));
  // A checkpoint of another dtype is refused even without a digest.
  NamedTensors w = load_tensor_dict(dir.checkpoint(30));
  for (auto& [name, t] : w) t = t.to(at::kLong);
  save_tensor_dict(dir.checkpoint(30), w);
  fs::remove(dir.digest(30));
  EXPECT_THROW_WITH(Replayer(dir.root()).seek(31), InputError, "is Long, the run's weights are Float");
}

// A short gradient log is never zero-filled: the resume goes back to the newest checkpoint whose
// digest vouches for the records the log holds, and writes the rest as training writes it.
TEST_F(TrainerTest, AShortGradientLogIsNotZeroFilledOnResume) {
  TrainConfig c = config("grads");
  c.log_gradients = true;
  train(c, "");
  const RunDir dir(c.out);
  const std::string logged = read_file(dir.gradients());
  fs::remove(dir.complete_marker());
  for (int64_t s : {30, 40}) {
    fs::remove(dir.checkpoint(s));
    fs::remove(dir.state(s));
    fs::remove(dir.digest(s));
  }
  truncate_step_log(dir.steps_log(), 20);
  fs::resize_file(dir.gradients(), fs::file_size(dir.gradients()) / 4);  // 10 of 40 records
  spdlog::set_level(spdlog::level::off);
  resume(dir.root(), "");  // from step 10: the digest of step 20 covers 20 records
  EXPECT_EQ(read_file(dir.gradients()), logged);
  EXPECT_EQ(read_step_log(dir.steps_log()).size(), 40u);
}

TEST_F(TrainerTest, AScheduleFileIsCopiedIntoTheRunAndChecked) {
  std::string rates;
  for (int k = 0; k < 40; ++k) rates += std::to_string(0.2 / (1 + k)) + "\n";
  atomic_write(tmp_ / "rates.txt", rates);
  TrainConfig c = config("sched");
  c.lr_schedule = "file:" + (tmp_ / "rates.txt").string();
  train(c, "");
  const RunDir dir(c.out);
  EXPECT_EQ(read_file(dir.schedule_copy()), rates);
  EXPECT_EQ(dir.read_manifest()["config"]["lr_schedule"], "file:lr_schedule.txt");
  // The original may go away or change: the run has its own copy.
  atomic_write(tmp_ / "rates.txt", "1\n");
  fs::remove(tmp_ / "rates.txt");
  Replayer(dir.root()).verify();
  EXPECT_DOUBLE_EQ(read_step_log(dir.steps_log())[7]["lr"].get<double>(), 0.2 / 8);
  // An edited copy would change the rates silently: refused.
  atomic_write(dir.schedule_copy(), rates + "# edited\n");
  EXPECT_THROW_WITH(Replayer{dir.root()}, InputError, "lr_schedule.txt: missing or changed since the run was trained");
  fs::remove(dir.complete_marker());
  EXPECT_THROW_WITH(resume(dir.root(), ""), InputError, "lr_schedule.txt: missing or changed");
}

TEST_F(TrainerTest, OneProcessPerRun) {
  TrainConfig c = config("locked");
  train(c, "");
  const RunDir dir(c.out);
  fs::remove(dir.complete_marker());
  {
    const DirLock other(dir.root(), /*exclusive=*/true);  // as a training process holds it
    ASSERT_TRUE(other.held());
    EXPECT_THROW_WITH(resume(dir.root(), ""), InputError, "another pathkernel process");
  }
  {
    const Replayer reading(dir.root());  // readers share the run, and keep resume out meanwhile
    EXPECT_THROW_WITH(resume(dir.root(), ""), InputError, "another pathkernel process");
  }
  EXPECT_EQ(resume(dir.root(), "").status, "complete");
  // A folder left by a training killed during set-up (only the lock file) takes a new run.
  fs::create_directories(tmp_ / "setup" / "checkpoints");
  atomic_write(tmp_ / "setup" / ".lock", "");
  TrainConfig s = config("setup");
  EXPECT_EQ(train(s, "").status, "complete");
}

TEST_F(TrainerTest, RunsOfThePreviousFormatStillReplay) {
  train(config("old"), "");
  // Rewrite the run as the trainer wrote it before the optimizer seam: state files of format /1
  // and no optimizer keys but momentum and weight decay in the manifest's config.
  const RunDir dir(config("old").out);
  for (int64_t s : dir.checkpoint_steps()) {
    const TrainerState st = load_trainer_state(dir.state(s));
    c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
    d.insert(std::string("format"), std::string("pathkernel-trainer-state/1"));
    d.insert(std::string("step"), st.step);
    d.insert(std::string("sampler_seed"), static_cast<int64_t>(st.sampler.seed));
    d.insert(std::string("sampler_epoch"), st.sampler.epoch);
    d.insert(std::string("sampler_position"), st.sampler.position);
    c10::Dict<std::string, at::Tensor> mom;
    for (const auto& [slot, tensors] : st.optimizer_state) {
      for (const auto& [name, t] : tensors) mom.insert(name, t);
    }
    d.insert(std::string("momentum"), c10::IValue(mom));
    const std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(d));
    atomic_write(dir.state(s), std::string(bytes.begin(), bytes.end()));
    fs::remove(dir.digest(s));  // digests came later too
  }
  nlohmann::json m = dir.read_manifest();
  for (const char* key : {"optimizer", "dampening", "nesterov", "betas", "eps"}) m["config"].erase(key);
  atomic_write(dir.manifest(), m.dump(2));
  Replayer(dir.root()).verify();
  EXPECT_EQ(load_trainer_state(dir.state(20)).optimizer_state.size(), 1u);
}

TEST_F(TrainerTest, ReplayReconstructsEveryStepAndDetectsTampering) {
  TrainConfig dense = config("dense");
  dense.checkpoint_every = 1;
  train(dense, "");
  train(config("sparse"), "");
  Replayer r(config("sparse").out);
  for (int64_t k : {0, 7, 13, 14, 29, 40}) {
    const NamedTensors w = r.weights_at(k), ref = load_tensor_dict(RunDir(dense.out).checkpoint(k));
    for (size_t i = 0; i < w.size(); ++i) EXPECT_TRUE(at::equal(w[i].second, ref[i].second)) << "step " << k;
  }
  r.verify();
  EXPECT_THROW_WITH(r.seek(41), InputError, "out of range");

  const RunDir dir(config("sparse").out);
  NamedTensors w = load_tensor_dict(dir.checkpoint(30));
  w[0].second[0][0] += 1e-6f;
  save_tensor_dict(dir.checkpoint(30), w);
  EXPECT_THROW_WITH(Replayer(dir.root()).verify(), ReplayMismatchError, "checkpoint 30 is not reproduced");
}

TEST_F(TrainerTest, GradientLogHoldsTheUpdateDirection) {
  TrainConfig c = config("grads");
  c.momentum = 0;
  c.weight_decay = 0;
  c.log_gradients = true;
  c.checkpoint_every = 1;
  train(c, "");
  const RunDir dir(c.out);
  const int64_t p = dir.read_manifest()["gradient_log"]["record_numel"].get<int64_t>();
  EXPECT_EQ(static_cast<int64_t>(fs::file_size(dir.gradients())), 40 * p * 4);
  const std::string bytes = read_file(dir.gradients());
  const at::Tensor g = at::from_blob(const_cast<char*>(bytes.data()), {40, p}, at::kFloat).to(at::kDouble);
  for (int64_t k : {0, 17, 39}) {
    std::vector<at::Tensor> d;
    const NamedTensors a = load_tensor_dict(dir.checkpoint(k)), b = load_tensor_dict(dir.checkpoint(k + 1));
    for (size_t i = 0; i < a.size(); ++i) d.push_back((b[i].second.to(at::kDouble) - a[i].second.to(at::kDouble)).reshape(-1));
    EXPECT_TRUE(at::allclose(at::cat(d), -0.2 * g[k], 1e-4, 1e-8)) << "step " << k;
  }
}

TEST_F(TrainerTest, BadSettingsAndChangedDataAreRejected) {
  TrainConfig c = config("bad");
  c.steps = 0;
  EXPECT_THROW_WITH(train(c, ""), InputError, "exactly one of --steps N or --epochs N");
  c = config("bad");
  c.model = "mlp:x";
  EXPECT_THROW_WITH(train(c, ""), InputError, "--model");
  c = config("bad");
  c.data_dir = (tmp_ / "nowhere").string();
  EXPECT_THROW_WITH(train(c, ""), InputError, "nowhere: data folder does not exist");
  EXPECT_FALSE(fs::exists(tmp_ / "bad" / "manifest.json")) << "no half-made run directory";

  train(config("changed"), "");
  const RunDir dir(config("changed").out);
  fs::remove(dir.complete_marker());
  testing::write_synthetic_idx(tmp_ / "data", 91, 30);
  EXPECT_THROW_WITH(resume(dir.root(), ""), InputError, "SHA-256 mismatch");
}

}  // namespace
}  // namespace pathkernel
