// End-to-end runs of the pathkernel binary on real Fashion-MNIST (subsets, and one full epoch).
#include <ATen/ATen.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "e2e_support.h"
#include "fixtures.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/checkpoint.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

using namespace e2e;

std::vector<std::string> subset_run(const fs::path& out) {
  return {"train", "--model", "mlp:32:tanh", "--train-limit", "3000", "--steps", "400", "--batch", "32",
          "--lr", "0.05", "--momentum", "0.9", "--checkpoint-every", "37", "--log-gradients",
          "--out", out.string()};
}

TEST(E2eTest, KilledAtAnyMomentAndResumedEndsBitIdentical) {
  testing::TempDir tmp;
  ASSERT_EQ(run(subset_run(tmp / "ref"), tmp.path()).status, 0);

  const fs::path cut = tmp / "cut";
  const RunDir dir(cut);
  // The first kill lands while the run directory is being set up; later ones mid-training,
  // each after a resume; the last resume runs to the end.
  int kills = 0;
  kills += kill_when(subset_run(cut), tmp.path(), dir.manifest(), 0);
  for (int64_t at_line : {5, 120, 121, 290}) {
    kills += kill_when({"train", "--resume", cut.string()}, tmp.path(), dir.steps_log(), at_line);
  }
  EXPECT_GE(kills, 3) << "the runs finished before they could be killed";
  const Result fin = run({"train", "--resume", cut.string()}, tmp.path());
  ASSERT_EQ(fin.status, 0) << fin.err;
  EXPECT_TRUE(dir.complete());

  const NamedTensors a = load_tensor_dict(dir.checkpoint(400));
  const NamedTensors b = load_tensor_dict(RunDir(tmp / "ref").checkpoint(400));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << a[i].first;
  EXPECT_EQ(read_file(dir.gradients()), read_file(RunDir(tmp / "ref").gradients()));
  const auto la = read_step_log(dir.steps_log()), lb = read_step_log(RunDir(tmp / "ref").steps_log());
  ASSERT_EQ(la.size(), 400u);
  for (size_t k = 0; k < la.size(); ++k) {
    EXPECT_EQ(la[k]["loss"], lb[k]["loss"]) << "step " << k;
    EXPECT_EQ(la[k]["batch"], lb[k]["batch"]) << "step " << k;
  }

  const Result verify = run({"replay", cut.string(), "--verify"}, tmp.path());
  EXPECT_EQ(verify.status, 0) << verify.err;
  EXPECT_NE(verify.out.find("reproduced bit for bit"), std::string::npos);
}

// A small tmpfs mounted for the test (root only) and unmounted at the end.
class SmallDisk {
 public:
  explicit SmallDisk(const fs::path& at) : at_(at) {
    fs::create_directories(at_);
    mounted_ = ::mount("tmpfs", at_.c_str(), "tmpfs", 0, "size=3M") == 0;
  }
  ~SmallDisk() {
    if (mounted_) ::umount2(at_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }
  bool resize(uint64_t bytes) {
    const std::string opt = "size=" + std::to_string(bytes);
    return ::mount("tmpfs", at_.c_str(), "tmpfs", MS_REMOUNT, opt.c_str()) == 0;
  }
  uint64_t used() const {
    struct statvfs st {};
    ::statvfs(at_.c_str(), &st);
    return (st.f_blocks - st.f_bfree) * st.f_frsize;
  }

 private:
  fs::path at_;
  bool mounted_ = false;
};

TEST(E2eTest, AFullDiskExitsTwoKeepsWhatWasWrittenAndResumesOnceThereIsSpace) {
  if (::geteuid() != 0) GTEST_SKIP() << "mounting a small tmpfs needs root (CI runs as root)";
  testing::TempDir tmp;
  SmallDisk disk(tmp / "disk");
  ASSERT_TRUE(disk.mounted()) << "mount tmpfs: " << std::strerror(errno);
  const std::vector<std::string> train = {"train", "--data", kData, "--model", "mlp:32:tanh", "--train-limit", "2000",
                                          "--steps", "400", "--checkpoint-every", "10"};
  auto with_out = [&](const fs::path& out) {
    auto a = train;
    a.insert(a.end(), {"--out", out.string()});
    return a;
  };
  const fs::path run_path = tmp / "disk" / "run";
  const RunDir dir(run_path);
  // 3 MB hold about 30 checkpoints of this model: training stops with the reason.
  const Result full = run(with_out(run_path), tmp.path());
  EXPECT_EQ(full.status, 2) << full.err;
  EXPECT_NE(full.err.find("No space left on device"), std::string::npos) << full.err;
  const std::vector<int64_t> kept = dir.checkpoint_steps();
  ASSERT_GE(kept.size(), 2u);
  EXPECT_LT(kept.back(), 400);
  for (int64_t k : kept) {
    EXPECT_NO_THROW(dir.check_digest(k)) << "checkpoint " << k;
    EXPECT_NO_THROW(load_tensor_dict(dir.checkpoint(k))) << "checkpoint " << k;
  }
  // Space back: the resumed run ends where an uninterrupted one does, bit for bit.
  ASSERT_TRUE(disk.resize(64u << 20));
  const Result resumed = run({"train", "--resume", run_path.string()}, tmp.path());
  ASSERT_EQ(resumed.status, 0) << resumed.err;
  ASSERT_EQ(run(with_out(tmp / "ref"), tmp.path()).status, 0);
  const NamedTensors a = load_tensor_dict(dir.checkpoint(400)), b = load_tensor_dict(RunDir(tmp / "ref").checkpoint(400));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << a[i].first;

  // An analysis that runs out of space: exit 2, nothing of it left, the run untouched.
  ASSERT_TRUE(disk.resize(disk.used() + (256u << 10)));
  const Result an = run({"analyze", run_path.string(), "--probes", "16", "--out", (tmp / "disk" / "an").string()}, tmp.path());
  EXPECT_EQ(an.status, 2) << an.err;
  EXPECT_NE(an.err.find("No space left on device"), std::string::npos) << an.err;
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(tmp / "disk")) left.push_back(e.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"run"});
  for (int64_t k : dir.checkpoint_steps()) EXPECT_NO_THROW(dir.check_digest(k)) << "checkpoint " << k;
  ASSERT_TRUE(disk.resize(64u << 20));
  const Result again = run({"analyze", run_path.string(), "--probes", "16", "--out", (tmp / "disk" / "an").string()}, tmp.path());
  EXPECT_EQ(again.status, 0) << again.err;
  EXPECT_TRUE(fs::exists(tmp / "disk" / "an" / "summary.json"));
}

TEST(E2eTest, ReplayVerifyNamesTheFirstDifferingStep) {
  testing::TempDir tmp;
  const fs::path out = tmp / "run";
  ASSERT_EQ(run({"train", "--model", "cnn:4,8:relu", "--train-limit", "1000", "--steps", "60", "--checkpoint-every",
                 "20", "--out", out.string()},
                tmp.path()).status, 0);
  const Result ok = run({"replay", out.string(), "--verify"}, tmp.path());
  ASSERT_EQ(ok.status, 0) << ok.err;

  // A log whose step 25 says another loss: replay must name step 25.
  std::string log = read_file(RunDir(out).steps_log());
  auto records = read_step_log(RunDir(out).steps_log());
  records[25]["loss"] = records[25]["loss"].get<double>() * (1 + 1e-12);
  std::string text;
  for (const auto& r : records) text += r.dump() + "\n";
  atomic_write(RunDir(out).steps_log(), text);
  const Result bad = run({"replay", out.string(), "--verify"}, tmp.path());
  EXPECT_EQ(bad.status, 5);
  EXPECT_NE(bad.err.find("step 25 differs"), std::string::npos) << bad.err;
  atomic_write(RunDir(out).steps_log(), log);

  // --step writes a state_dict and never overwrites without --force.
  ASSERT_EQ(run({"replay", out.string(), "--step", "33", "--out", (tmp / "w33.pt").string()}, tmp.path()).status, 0);
  EXPECT_EQ(load_tensor_dict(tmp / "w33.pt").size(), 6u);
  const Result again = run({"replay", out.string(), "--step", "33", "--out", (tmp / "w33.pt").string()}, tmp.path());
  EXPECT_EQ(again.status, 2);
  EXPECT_NE(again.err.find("pass --force"), std::string::npos);
  // --force replaces an earlier weights file (CliTest: never a file of another kind, nor the run's)
  ASSERT_EQ(run({"replay", out.string(), "--step", "20", "--out", (tmp / "w33.pt").string(), "--force"}, tmp.path()).status, 0);
  EXPECT_EQ(load_tensor_dict(tmp / "w33.pt").size(), 6u);
}

TEST(E2eTest, BadInputExitsTwoNamingTheFileAndWritesNothing) {
  testing::TempDir tmp;
  const fs::path data = tmp / "data";
  fs::create_directories(data);
  for (const char* f : {"train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}) {
    fs::copy_file(fs::path(kData) / f, data / f);
  }
  const std::string images = read_file(fs::path(kData) / "train-images-idx3-ubyte.gz");
  testing::write_file(data / "train-images-idx3-ubyte.gz", images.substr(0, images.size() / 3), false);
  const Result r = run({"train", "--data", data.string(), "--steps", "5", "--out", (tmp / "run").string()}, tmp.path());
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("train-images-idx3-ubyte.gz"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp / "run" / "manifest.json"));

  const Result flag = run({"train", "--lr", "-1", "--steps", "5", "--out", (tmp / "run2").string()}, tmp.path());
  EXPECT_EQ(flag.status, 2);
  EXPECT_NE(flag.err.find("--lr"), std::string::npos) << flag.err;
  // Issue 8: numbers parsed whole, specs and levels checked, sizes bounded; all before any work.
  for (const auto& [flags, named] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--lr", "0.1abc"}, "--lr must be a number, got '0.1abc'"},
           {{"--batch", "64x"}, "--batch must be an integer"},
           {{"--model", "mlp:"}, "no widths given"},
           {{"--log-level", "loud"}, "--log-level must be"},
           {{"--threads", "100000"}, "(the cores this process may use), got 100000"},
           {{"--epochs", "9223372036854775807", "--steps", "0"}, "--epochs must be at most"},
           {{"--weight-decay", "1e300"}, "--weight-decay must be below 1e38"},
           // Issue 22: a schedule file that never ends hung; one that is not a schedule was echoed.
           {{"--lr-schedule", "file:/dev/zero"}, "/dev/zero: not a regular file"},
           {{"--lr-schedule", "file:/etc/passwd"}, "/etc/passwd:1: not a learning rate"}}) {
    std::vector<std::string> args = {"train", "--steps", "5", "--out", (tmp / "flags").string()};
    args.insert(args.end(), flags.begin(), flags.end());
    const auto t0 = std::chrono::steady_clock::now();
    const Result bad = run(args, tmp.path());
    EXPECT_EQ(bad.status, 2) << flags[0];
    EXPECT_NE(bad.err.find(named), std::string::npos) << bad.err;
    EXPECT_EQ(bad.err.find("root:"), std::string::npos) << "a file's text in an error: " << bad.err;
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0) << flags[0];
    EXPECT_FALSE(fs::exists(tmp / "flags")) << flags[0];
  }
  ASSERT_EQ(run({"train", "--train-limit", "200", "--steps", "3", "--out", (tmp / "r3").string()}, tmp.path()).status, 0);
  const Result extra = run({"train", "--resume", (tmp / "r3").string(), "--seed", "4"}, tmp.path());
  EXPECT_EQ(extra.status, 2);
  EXPECT_NE(extra.err.find("drop --seed"), std::string::npos) << extra.err;

  const Result no_run = run({"replay", (tmp / "absent").string(), "--verify"}, tmp.path());
  EXPECT_EQ(no_run.status, 2);
  EXPECT_NE(no_run.err.find("absent: no such run directory"), std::string::npos) << no_run.err;
  const Result diverge = run({"train", "--model", "linear", "--loss", "mse", "--train-limit", "500", "--steps", "50", "--lr", "10", "--out",
                              (tmp / "div").string()}, tmp.path());
  EXPECT_EQ(diverge.status, 3) << diverge.err;
  EXPECT_NE(diverge.err.find("diverged"), std::string::npos);
}

// Issue 7: the optimizers through the binary. Adam killed and resumed ends bit-identical;
// analyze reports the optimizer's kernel term and explain attributes through it; bad optimizer
// flags and a damaged optimizer state exit 2 naming the flag or the file, with nothing written.
TEST(E2eTest, OptimizersTrainResumeAnalyzeAndExplain) {
  testing::TempDir tmp;
  auto adam_run = [&](const fs::path& out) {
    return std::vector<std::string>{"train", "--model", "mlp:32:tanh", "--train-limit", "2000", "--steps", "150",
                                    "--optimizer", "adam", "--lr", "1e-3", "--betas", "0.85,0.995", "--checkpoint-every",
                                    "25", "--out", out.string()};
  };
  ASSERT_EQ(run(adam_run(tmp / "ref"), tmp.path()).status, 0);
  const fs::path cut = tmp / "cut";
  int kills = kill_when(adam_run(cut), tmp.path(), RunDir(cut).steps_log(), 60);
  kills += kill_when({"train", "--resume", cut.string()}, tmp.path(), RunDir(cut).steps_log(), 110);
  EXPECT_GE(kills, 1);
  ASSERT_EQ(run({"train", "--resume", cut.string()}, tmp.path()).status, 0);
  const NamedTensors a = load_tensor_dict(RunDir(cut).checkpoint(150));
  const NamedTensors b = load_tensor_dict(RunDir(tmp / "ref").checkpoint(150));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << a[i].first;
  const Result verify = run({"replay", cut.string(), "--verify"}, tmp.path());
  EXPECT_EQ(verify.status, 0) << verify.err;
  const auto manifest = RunDir(cut).read_manifest();
  EXPECT_EQ(manifest["optimizer"]["name"], "adam");
  EXPECT_EQ(manifest["optimizer"]["betas"][0], 0.85);

  const Result an = run({"analyze", cut.string(), "--probes", "16", "--out", (tmp / "an").string()}, tmp.path());
  ASSERT_EQ(an.status, 0) << an.err;
  EXPECT_NE(an.out.find("sum Kopt"), std::string::npos) << an.out;
  EXPECT_NE(read_file(tmp / "an" / "steps.csv").find("Kopt_norm,Uopt_wd_norm,Uopt_round_norm"), std::string::npos);
  EXPECT_TRUE(fs::exists(tmp / "an" / "arrays" / "Kopt.npy"));
  const auto summary = nlohmann::json::parse(read_file(tmp / "an" / "summary.json"));
  EXPECT_EQ(summary["kernel_term"], "Kopt");

  const Result ex = run({"explain", cut.string(), "--probe", "7", "--out", (tmp / "ex").string()}, tmp.path());
  ASSERT_EQ(ex.status, 0) << ex.err;
  EXPECT_NE(ex.out.find("optimizer adam: attribution through it"), std::string::npos) << ex.out;
  const auto es = nlohmann::json::parse(read_file(tmp / "ex" / "summary.json"));
  EXPECT_LT(es["max_sum_error"].get<double>(), 1e-8);

  for (const auto& [flags, named] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--optimizer", "lbfgs"}, "--optimizer"},
           {{"--optimizer", "rmsprop", "--alpha", "1"}, "--alpha"},
           {{"--optimizer", "adadelta", "--momentum", "0.9"}, "--momentum"},
           {{"--optimizer", "adagrad", "--lr-decay", "-1"}, "--lr-decay"},
           {{"--optimizer", "adam", "--betas", "1,0.9"}, "--betas"},
           {{"--optimizer", "adam", "--betas", "0.9"}, "--betas"},
           {{"--optimizer", "adamw", "--eps", "-1e-8"}, "--eps"},
           {{"--optimizer", "adam", "--weight-decay", "-1"}, "--weight-decay"},
           {{"--nesterov"}, "--nesterov"}}) {
    std::vector<std::string> args = {"train", "--steps", "5", "--out", (tmp / "bad").string()};
    args.insert(args.end(), flags.begin(), flags.end());
    const Result r = run(args, tmp.path());
    EXPECT_EQ(r.status, 2) << flags[0];
    EXPECT_NE(r.err.find(named), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(tmp / "bad")) << flags[0];
  }
  // RMSprop, Adagrad and Adadelta through the binary (issue 23, item 4): trained with torch.optim's
  // default eps, analyzed with the optimizer's kernel term closing the update, explained.
  for (const auto& [name, flags] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"adadelta", {"--lr", "1.0", "--weight-decay", "1e-3"}},
           {"rmsprop", {"--lr", "1e-3", "--momentum", "0.9", "--centered"}},
           {"adagrad", {"--lr", "0.05", "--lr-decay", "0.01"}}}) {
    std::vector<std::string> args = {"train", "--model", "mlp:16:tanh", "--train-limit", "500", "--steps", "20",
                                     "--optimizer", name, "--checkpoint-every", "5", "--out", (tmp / name).string()};
    args.insert(args.end(), flags.begin(), flags.end());
    ASSERT_EQ(run(args, tmp.path()).status, 0) << name;
    const auto m = RunDir(tmp / name).read_manifest();
    EXPECT_EQ(m["optimizer"]["eps"], name == "adadelta" ? 1e-6 : name == "adagrad" ? 1e-10 : 1e-8) << name;
    const Result a = run({"analyze", (tmp / name).string(), "--probes", "8", "--out", (tmp / (name + "-an")).string()},
                         tmp.path());
    ASSERT_EQ(a.status, 0) << a.err;
    const Table t = read_csv(tmp / (name + "-an") / "steps.csv");
    double kopt = 0, round = 0;
    for (size_t i = 0; i < t.rows; ++i) {
      kopt = std::max(kopt, t.cols.at("Kopt_norm")[i]);
      round = std::max(round, t.cols.at("Uopt_round_norm")[i]);
    }
    EXPECT_LT(round, 1e-5 * kopt) << name << ": the optimizer's linear form gives every float32 update";
    const Result x = run({"explain", (tmp / name).string(), "--probe", "3", "--out", (tmp / (name + "-ex")).string()},
                         tmp.path());
    ASSERT_EQ(x.status, 0) << x.err;
    EXPECT_LT(nlohmann::json::parse(read_file(tmp / (name + "-ex") / "summary.json"))["max_sum_error"].get<double>(),
              1e-8)
        << name;
  }
  // A damaged optimizer state: the run's second moments cut to the wrong shape.
  TrainerState st = load_trainer_state(RunDir(cut).state(50));
  st.optimizer_state[1].second[2].second = at::zeros({3});
  save_trainer_state(RunDir(cut).state(50), st);
  const Result damaged = run({"analyze", cut.string(), "--probes", "4", "--out", (tmp / "an2").string()}, tmp.path());
  EXPECT_EQ(damaged.status, 2);
  EXPECT_NE(damaged.err.find("step_00000050.state.pt: does not match its digest"), std::string::npos) << damaged.err;
  fs::remove(RunDir(cut).digest(50));  // as a run made before digests: the state itself is checked
  const Result shape = run({"analyze", cut.string(), "--probes", "4", "--out", (tmp / "an2").string()}, tmp.path());
  EXPECT_EQ(shape.status, 2);
  EXPECT_NE(shape.err.find("step_00000050.state.pt: optimizer state 'exp_avg_sq.layers.1.weight' has shape [3]"),
            std::string::npos) << shape.err;
  EXPECT_FALSE(fs::exists(tmp / "an2"));
}

// Issue 7's claim, on a real epoch: with SGD + momentum 0.9 (lr 0.01), the kernel view through
// the optimizer accounts for the change of each explained logit but its Taylor residual, up to
// float32 rounding: |sum_i aopt_i - (f_N - f_0 - sum R)| < 1e-4 |f_N - f_0| for 16 probes.
// (The note's per-step kernel term alone left two thirds of it to the momentum term.)
TEST(E2eTest, MomentumEpochIsExplainedThroughTheOptimizer) {
  testing::TempDir tmp;
  const fs::path out = tmp / "run";
  ASSERT_EQ(run({"train", "--model", "mlp:128:tanh", "--epochs", "1", "--lr", "0.01", "--momentum", "0.9", "--out",
                 out.string()}, tmp.path()).status, 0);
  const Result e = run({"explain", out.string(), "--probes", "16", "--grids", "0", "--out", (tmp / "ex").string()},
                       tmp.path());
  ASSERT_EQ(e.status, 0) << e.err;
  const auto es = nlohmann::json::parse(read_file(tmp / "ex" / "summary.json"));
  ASSERT_EQ(es["per_probe"].size(), 16u);
  for (const auto& p : es["per_probe"]) {
    const double change = p["f_final"].get<double>() - p["f_initial"].get<double>();
    const double gap = p["sum_a"].get<double>() - (change - p["sum_r"].get<double>());
    EXPECT_LT(std::abs(gap), 1e-4 * std::abs(change)) << "probe " << p["probe"];
    // The kernel view carries the change, not the remainder: sum_i aopt_i is most of it.
    EXPECT_GT(p["sum_a"].get<double>() / change, 0.5) << "probe " << p["probe"];
  }
}

// Issue 3's e2e: a 200-step MLP run on a Fashion-MNIST subset, analyzed at 64 probes: the run
// identity holds, and the exported arrays agree with an independent float64 PyTorch computation
// (scripts/check_analysis.py, explicit per-row Jacobians from the checkpoints) to 1e-9.
TEST(E2eTest, AnalyzeSplitsEveryStepAndAgreesWithPyTorch) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run", out = tmp / "analysis";
  ASSERT_EQ(run({"train", "--model", "mlp:32:tanh", "--train-limit", "2000", "--steps", "200", "--checkpoint-every",
                 "1", "--momentum", "0.9", "--weight-decay", "1e-3", "--out", run_dir.string()},
                tmp.path()).status, 0);
  const Result a = run({"analyze", run_dir.string(), "--probes", "64", "--second-order", "--out", out.string()},
                       tmp.path());
  ASSERT_EQ(a.status, 0) << a.err;
  EXPECT_NE(a.out.find("f_N - f_0  =  sum K"), std::string::npos) << a.out;
  const auto summary = nlohmann::json::parse(read_file(out / "summary.json"));
  EXPECT_EQ(summary["steps_analyzed"], 200);
  EXPECT_LT(summary["max_identity_error"].get<double>(), 1e-8);
  EXPECT_LT(summary["max_kernel_split_error"].get<double>(), 1e-10);
  for (const char* f : {"D", "F", "K", "U", "R", "S"}) {
    EXPECT_TRUE(fs::exists(out / "arrays" / (std::string(f) + ".npy"))) << f;
  }
  EXPECT_EQ(testing::run_program({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/scripts/check_analysis.py",
                                  run_dir.string(), out.string(), "--steps", "0,57,199"},
                                 tmp / "check.json"),
            0)
      << read_file(tmp / "check.json");

  const Result again = run({"analyze", run_dir.string(), "--out", out.string()}, tmp.path());
  EXPECT_EQ(again.status, 2) << "an existing analysis is never overwritten without --force";

  const Result rep = run({"report", out.string(), "--out", (tmp / "report").string()}, tmp.path());
  ASSERT_EQ(rep.status, 0) << rep.err;
  EXPECT_NE(rep.out.find("(6 plots)"), std::string::npos) << rep.out;  // r, S, cumulative, D vs F, histogram, by class
  EXPECT_NE(read_file(tmp / "report" / "report.html").find("r_per_step.png"), std::string::npos);

  // Issue 4's explain on the same run: the sum check holds and the grid shows real images.
  const fs::path ex = tmp / "explain";
  const Result e = run({"explain", run_dir.string(), "--probe", "7", "--probe", "1234", "--self-influence", "--out",
                        ex.string()}, tmp.path());
  ASSERT_EQ(e.status, 0) << e.err;
  EXPECT_NE(e.out.find("sum check: max error"), std::string::npos) << e.out;
  const auto es = nlohmann::json::parse(read_file(ex / "summary.json"));
  EXPECT_LT(es["max_sum_error"].get<double>(), 1e-8);
  EXPECT_GT(fs::file_size(ex / "grids" / "probe_7.png"), 10000u);
  EXPECT_GT(fs::file_size(ex / "self_influence.png"), 10000u);
}

// Issue 11's influence: Captum's TracInCP matrix (sum over checkpoints of lr_t <grad l(test),
// grad l(train_i)>) and self-influence, against the same computed by functorch (vmap of grad,
// as Captum does) in Python from the same checkpoints, one of them (step 30) not stored and so
// replayed; in Captum's orientation [test, train].
TEST(E2eTest, InfluenceEqualsTracInCPByFunctorch) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run", out = tmp / "influence";
  ASSERT_EQ(run({"train", "--model", "mlp:32:tanh", "--train-limit", "600", "--steps", "60", "--checkpoint-every", "20",
                 "--lr-schedule", "step:25:0.5", "--out", run_dir.string()},
                tmp.path()).status, 0);
  const Result r = run({"influence", run_dir.string(), "--checkpoints", "0,20,30,60", "--train-examples", "500",
                        "--probes", "12", "--chunk", "128", "--out", out.string()},
                       tmp.path());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("TracInCP over 4 checkpoints: 12 test x 500 training examples"), std::string::npos) << r.out;
  const auto s = nlohmann::json::parse(read_file(out / "summary.json"));
  EXPECT_EQ(s["rates"], nlohmann::json::parse("[0.1, 0.1, 0.05, 0.025]"));  // step:25:0.5; the end takes the last step's
  ASSERT_EQ(run({"replay", run_dir.string(), "--step", "30", "--out", (tmp / "w30.pt").string()}, tmp.path()).status, 0);
  ASSERT_EQ(testing::run_program({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/scripts/check_influence.py",
                                  run_dir.string(), out.string(), "--tol", "1e-9", "--weights",
                                  "30=" + (tmp / "w30.pt").string()},
                                 tmp / "check.json"),
            0)
      << read_file(tmp / "check.json");
  const Result again = run({"influence", run_dir.string(), "--out", out.string()}, tmp.path());
  EXPECT_EQ(again.status, 2) << "an existing output is never overwritten without --force";
  const Result past = run({"influence", run_dir.string(), "--checkpoints", "61", "--out", (tmp / "past").string()},
                          tmp.path());
  EXPECT_EQ(past.status, 2);
  EXPECT_NE(past.err.find("past the run's last step 60"), std::string::npos) << past.err;
  EXPECT_FALSE(fs::exists(tmp / "past"));
}

// The README's recipe: one epoch of mlp:128:tanh on all of Fashion-MNIST reaches 80%, and the
// final checkpoint, loaded by Python's torch.load into the equivalent torch.nn model, scores the same.
TEST(E2eTest, FullEpochReaches80PercentAndLoadsInPyTorch) {
  testing::TempDir tmp;
  const fs::path out = tmp / "run";
  const Result r = run({"train", "--model", "mlp:128:tanh", "--epochs", "1", "--lr", "0.1", "--batch", "64", "--out",
                        out.string()}, tmp.path());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("test accuracy:"), std::string::npos);
  const auto summary = nlohmann::json::parse(read_file(out / "summary.json"));
  EXPECT_GE(summary["test_accuracy"].get<double>(), 0.80);
  EXPECT_EQ(summary["steps_completed"], 938);

  // stdout and stderr share the log: the JSON document starts at its first brace.
  const int st = testing::run_program(
      {"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/scripts/check_checkpoint.py", out.string()}, tmp / "py.json");
  EXPECT_EQ(st, 0) << read_file(tmp / "py.json");
  const std::string py_out = read_file(tmp / "py.json");
  const auto py = nlohmann::json::parse(py_out.substr(py_out.find('{')));
  EXPECT_EQ(py["test_accuracy"].get<double>(), summary["test_accuracy"].get<double>());
}

// Issue 22: two identical analyses on one --out, the second "continued" the first's live
// segments and exited 0 with part of the run. One writer per output: the second is refused.
TEST(E2eTest, OneWriterPerOutput) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run", out = tmp / "an";
  ASSERT_EQ(run({"train", "--model", "mlp:32:tanh", "--train-limit", "1000", "--steps", "400", "--batch", "32",
                 "--checkpoint-every", "20", "--out", run_dir.string()}, tmp.path()).status, 0);
  const std::vector<std::string> analyze = {"analyze", run_dir.string(), "--probes", "64", "--exact", "8",
                                            "--second-order", "--out", out.string()};
  fs::create_directories(tmp / "first");
  const pid_t first = spawn(analyze, tmp / "first");
  const auto t0 = std::chrono::steady_clock::now();
  while (!fs::exists(out / "partial.json") && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(fs::exists(out / "partial.json")) << "the first analysis did not start";
  const Result second = run(analyze, tmp.path());
  int still = 0;
  const pid_t ended = ::waitpid(first, &still, WNOHANG);
  EXPECT_EQ(ended, 0) << "the first analysis ended before the second was tried";
  EXPECT_EQ(second.status, 2) << second.err;
  EXPECT_NE(second.err.find("an: another pathkernel command is writing it"), std::string::npos) << second.err;
  EXPECT_EQ(ended == first ? (WIFEXITED(still) ? WEXITSTATUS(still) : -1) : wait_status(first), 0)
      << read_file(tmp / "first" / "stderr");
  EXPECT_EQ(read_json(out / "summary.json")["steps_analyzed"], 400);
  EXPECT_FALSE(fs::exists(tmp / ".an.lock")) << "the lock file goes with its holder";
  // An --out typed with a trailing slash is the same output: its lock and staging beside it.
  const Result rep = run({"report", out.string() + "/", "--out", (tmp / "rep").string() + "/"}, tmp.path());
  EXPECT_EQ(rep.status, 0) << rep.err;
  EXPECT_TRUE(fs::exists(tmp / "rep" / "report.html"));
  EXPECT_FALSE(fs::exists(tmp / "rep" / ".lock"));
  EXPECT_FALSE(fs::exists(tmp / "rep" / ".rep.lock"));
}

}  // namespace
}  // namespace pathkernel
