// End-to-end runs of the analysis routes added by issues 11-13 on real Fashion-MNIST:
// forward-mode CNN analysis, the OpenBLAS core pinned from a run, explain through a random
// projection (a million-parameter model too), full-batch GD at the stability limit.
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>

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

// Issue 12's model with over a million parameters (mlp:1024,512:tanh, 1.33M) on Fashion-MNIST,
// trained with momentum: explain --project 16384 against the exact route. The projected
// attributions rank the same training examples first and stay within 20% of max |a_i| (bench_project:
// 0.056 and a top-32 share of 0.99 on a longer run).
TEST(E2eTest, AMillionParameterModelIsExplainedThroughAProjection) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run";
  ASSERT_EQ(run({"train", "--model", "mlp:1024,512:tanh", "--train-limit", "1000", "--steps", "12", "--lr", "0.05",
                 "--momentum", "0.9", "--out", run_dir.string()}, tmp.path()).status, 0);
  for (const char* d : {"0", "16384"}) {
    const Result e = run({"explain", run_dir.string(), "--probes", "4", "--grids", "0", "--project", d, "--out",
                          (tmp / (std::string("ex") + d)).string()}, tmp.path());
    ASSERT_EQ(e.status, 0) << e.err;
  }
  const at::Tensor a = load_npy(tmp / "ex0" / "attributions.npy"), b = load_npy(tmp / "ex16384" / "attributions.npy");
  ASSERT_EQ(a.sizes(), b.sizes());
  for (int64_t p = 0; p < a.size(0); ++p) {
    EXPECT_LT((b[p] - a[p]).abs().max().item<double>(), 0.2 * a[p].abs().max().item<double>()) << p;
    const at::Tensor ta = std::get<1>(a[p].topk(32)), tb = std::get<1>(b[p].topk(32));
    int64_t both = 0;
    for (int64_t i = 0; i < 32; ++i) both += (tb == ta[i]).any().item<bool>();
    EXPECT_GE(both, 24) << "probe " << p;
  }
  const auto s = nlohmann::json::parse(read_file(tmp / "ex16384" / "summary.json"));
  EXPECT_GT(s["projection"]["dims"].get<int64_t>(), 16384);
}

// Issue 11's core pinning, end to end: a command that reads a run, started without
// OPENBLAS_CORETYPE, runs on the core the run's manifest records (the launcher sets it), so
// replay --verify reproduces every checkpoint bit for bit and the analysis records that core.
// The run is trained under this environment's own core, so the child computes with the very
// kernels the environment asks for: no core the environment did not choose ever runs.
TEST(E2eTest, ACommandWithoutACoreSetRunsOnTheRunsRecordedCore) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run";
  ASSERT_EQ(run({"train", "--model", "mlp:16:tanh", "--train-limit", "500", "--steps", "30", "--checkpoint-every",
                 "10", "--out", run_dir.string()}, tmp.path()).status, 0);
  const auto manifest = nlohmann::json::parse(read_file(run_dir / "manifest.json"));
  const std::string core = manifest["threads"]["blas_core"].get<std::string>();
  ASSERT_FALSE(core.empty());
  if (const char* env = std::getenv("OPENBLAS_CORETYPE")) {
    ASSERT_EQ(lower(core), lower(env)) << "the run was trained under this environment's core";
  }
  std::vector<std::string> kept;
  for (char** e = environ; *e; ++e) {
    if (std::string(*e).rfind("OPENBLAS_CORETYPE=", 0) != 0) kept.push_back(*e);
  }
  std::vector<char*> env;
  for (auto& e : kept) env.push_back(e.data());
  env.push_back(nullptr);
  auto run_without_core = [&](const std::vector<std::string>& args) {
    return wait_status(spawn(args, tmp.path(), env.data()));
  };
  EXPECT_EQ(run_without_core({"replay", run_dir.string(), "--verify"}), 0) << read_file(tmp / "stderr");
  ASSERT_EQ(run_without_core({"analyze", run_dir.string(), "--probes", "4", "--out", (tmp / "an").string()}), 0)
      << read_file(tmp / "stderr");
  const auto summary = nlohmann::json::parse(read_file(tmp / "an" / "summary.json"));
  EXPECT_EQ(lower(summary["blas_core"].get<std::string>()), lower(core));
}

// A CNN's analysis takes forward-mode AD for K and F and forms the per-example split on every
// --check-every-th step only: both kinds of step (0 and 8 checked, 5 and 11 not) agree with the
// independent float64 PyTorch computation from the checkpoints.
TEST(E2eTest, CnnAnalysisByForwardModeAgreesWithPyTorch) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run", out = tmp / "analysis";
  ASSERT_EQ(run({"train", "--model", "cnn:3,4:relu", "--train-limit", "500", "--steps", "12", "--checkpoint-every",
                 "1", "--momentum", "0.9", "--weight-decay", "1e-3", "--out", run_dir.string()},
                tmp.path()).status, 0);
  const Result a = run({"analyze", run_dir.string(), "--probes", "8", "--check-every", "4", "--out", out.string()},
                       tmp.path());
  ASSERT_EQ(a.status, 0) << a.err;
  const auto summary = nlohmann::json::parse(read_file(out / "summary.json"));
  EXPECT_EQ(summary["kernel_split_checked_steps"], 3);
  EXPECT_LT(summary["max_kernel_split_error"].get<double>(), 1e-10);
  EXPECT_EQ(testing::run_program({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/scripts/check_analysis.py",
                                  run_dir.string(), out.string(), "--steps", "0,5,8,11"},
                                 tmp / "check.json"),
            0)
      << read_file(tmp / "check.json");
}

// Issue 13 through the command line on Fashion-MNIST: a ReLU CNN's steps walked at their kinks
// (the first 8 examples of each batch, steps needing more than 60 pieces skipped), the exact
// kernel then reproducing D, computed by forward passes at both ends, on every walked step;
// summary.json counts the skipped steps as steps.csv shows them.
TEST(E2eTest, CnnStepsWalkedAtTheirKinksThroughTheCommandLine) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run", out = tmp / "analysis";
  ASSERT_EQ(run({"train", "--model", "cnn:3,4:relu", "--train-limit", "500", "--steps", "12", "--lr", "0.2", "--out",
                 run_dir.string()}, tmp.path()).status, 0);
  const Result a = run({"analyze", run_dir.string(), "--probes", "4", "--exact", "2", "--kinks", "--kinks-examples",
                        "8", "--kinks-max", "60", "--out", out.string()}, tmp.path());
  ASSERT_EQ(a.status, 0) << a.err;
  const Table steps = read_csv(out / "steps.csv");
  const auto& kp = steps.at("kinks_probes", out), &kb = steps.at("kinks_batch", out);
  const auto& q = steps.at("quad_error", out), &d = steps.at("D_norm", out);
  int64_t walked = 0, skipped = 0;
  double kinks = 0;
  for (size_t k = 0; k < steps.rows; ++k) {
    if (std::isnan(kp[k])) {
      EXPECT_TRUE(std::isnan(kb[k])) << k;
      ++skipped;
      continue;
    }
    ++walked;
    kinks += kp[k] + kb[k];
    EXPECT_LT(q[k], 1e-10 * d[k]) << "step " << k;
  }
  EXPECT_GT(walked, 0);
  EXPECT_GT(kinks, 0);
  const auto summary = nlohmann::json::parse(read_file(out / "summary.json"));
  EXPECT_EQ(summary["kinks_skipped_steps"].get<int64_t>(), skipped);
  EXPECT_EQ(summary["settings"]["kinks_max"].get<int64_t>(), 60);
}

// explain --project: a projection that keeps every side reproduces the exact attributions; a
// small one is reported with its error (exit 0, the sum check measuring it); Adam is refused.
TEST(E2eTest, ExplainThroughARandomProjection) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run";
  ASSERT_EQ(run({"train", "--model", "mlp:16:tanh", "--train-limit", "500", "--steps", "20", "--momentum", "0.9",
                 "--out", run_dir.string()}, tmp.path()).status, 0);
  auto explain = [&](const std::string& name, const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"explain", run_dir.string(), "--probes", "4", "--grids", "0", "--out",
                                     (tmp / name).string()};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(args, tmp.path());
  };
  ASSERT_EQ(explain("exact", {}).status, 0);
  const Result kept = explain("kept", {"--project", "1000000"});
  ASSERT_EQ(kept.status, 0) << kept.err;
  const Result small = explain("small", {"--project", "64", "--project-seed", "3"});
  ASSERT_EQ(small.status, 0) << small.err;
  EXPECT_NE(small.out.find("the sum check measures the projection"), std::string::npos) << small.out;
  const at::Tensor exact = load_npy(tmp / "exact" / "attributions.npy");
  const double scale = exact.abs().max().item<double>();
  EXPECT_LT((load_npy(tmp / "kept" / "attributions.npy") - exact).abs().max().item<double>(), 1e-12 * scale);
  EXPECT_GT((load_npy(tmp / "small" / "attributions.npy") - exact).abs().max().item<double>(), 1e-4 * scale);
  const auto ss = nlohmann::json::parse(read_file(tmp / "small" / "summary.json"));
  EXPECT_EQ(ss["projection"]["seed"], 3);
  EXPECT_EQ(ss["projection"]["dims"], 64 + 64);  // both layers (16 x 785, 10 x 17) sketched to 64
  EXPECT_GT(ss["max_sum_error"].get<double>(), 1e-6);

  ASSERT_EQ(run({"train", "--model", "mlp:16:tanh", "--train-limit", "500", "--steps", "5", "--optimizer", "adam",
                 "--lr", "1e-3", "--out", (tmp / "adam").string()}, tmp.path()).status, 0);
  const Result adam = run({"explain", (tmp / "adam").string(), "--probes", "2", "--project", "64", "--out",
                           (tmp / "adam-ex").string()}, tmp.path());
  EXPECT_EQ(adam.status, 2);
  EXPECT_NE(adam.err.find("does not commute"), std::string::npos) << adam.err;
  EXPECT_FALSE(fs::exists(tmp / "adam-ex" / "summary.json"));
  const Result neg = run({"explain", run_dir.string(), "--probes", "2", "--project", "-3", "--out",
                          (tmp / "neg").string()}, tmp.path());
  EXPECT_EQ(neg.status, 2);
  EXPECT_NE(neg.err.find("--project"), std::string::npos) << neg.err;
}

// Issue 13's full-batch gradient descent (--batch = --train-limit: every step the whole subset,
// the note's Eq. 2) on a model whose loss is quadratic in w (linear, MSE): its Hessian is
// constant, so GD converges iff lr < 2 / lambda_max. lambda_max from analyze --sharpness (on the
// same subset); training at 0.95 x 2 / lambda_max converges, at 1.05 x it diverges with exit 3.
TEST(E2eTest, FullBatchGdOnAQuadraticLossDivergesJustAboveTwoOverLambdaMax) {
  testing::TempDir tmp;
  const std::vector<std::string> common = {"--model", "linear", "--loss", "mse", "--train-limit", "200", "--batch",
                                           "200", "--checkpoint-every", "1000"};
  auto train = [&](const std::string& name, double lr, int64_t steps) {
    std::vector<std::string> a = {"train", "--lr", fmt::format("{:.17g}", lr), "--steps", std::to_string(steps),
                                  "--out", (tmp / name).string()};
    a.insert(a.end(), common.begin(), common.end());
    return run(a, tmp.path());
  };
  ASSERT_EQ(train("probe", 1e-4, 1).status, 0);
  const Result an = run({"analyze", (tmp / "probe").string(), "--probes", "2", "--sharpness", "1",
                         "--sharpness-examples", "200", "--out", (tmp / "an").string()}, tmp.path());
  ASSERT_EQ(an.status, 0) << an.err;
  EXPECT_NE(an.out.find(",sharpness.csv}"), std::string::npos) << an.out;
  const Table sharp = read_csv(tmp / "an" / "sharpness.csv");
  ASSERT_EQ(sharp.rows, 1u);
  const double lambda = sharp.at("lambda_max_train", tmp / "an")[0];
  ASSERT_GT(lambda, 0);
  EXPECT_LT(sharp.at("residual", tmp / "an")[0], 1e-6);
  // The batch is the subset: one Hessian, its lambda_max reused for the batch.
  EXPECT_EQ(sharp.at("lambda_max_batch", tmp / "an")[0], lambda);

  const Result below = train("below", 0.95 * 2 / lambda, 3000);
  EXPECT_EQ(below.status, 0) << below.err;
  const auto log = read_step_log(RunDir(tmp / "below").steps_log());
  EXPECT_LT(log.back()["loss"].get<double>(), log.front()["loss"].get<double>());
  const Result above = train("above", 1.05 * 2 / lambda, 3000);
  EXPECT_EQ(above.status, 3) << above.err;
  EXPECT_NE(above.err.find("diverged"), std::string::npos) << above.err;
}

// Issue 26 in pathkernel's own training: an MLP with Dropout (`:dropout=P`), an MLP with
// BatchNorm (`:bn`) and a CNN with both, trained on Fashion-MNIST; each step's masks drawn from
// the seed and the step, each BatchNorm on the batch's statistics, moving its running statistics.
// The replay draws the masks again and reproduces every checkpoint (running statistics included)
// bit for bit; the analysis runs each step's batch as it trained (the Dropout MLP on the
// factorized route: masks act per row; BatchNorm's rows by autograd through the batch's one
// forward) and the probes as predicted. D, F, K, R and U_stats agree with
// scripts/check_analysis.py, which builds the network in PyTorch and draws the masks in Python,
// to 1e-9; with the next step's masks and BatchNorm on its running statistics the same check
// fails; explain's sum check holds to 1e-9, U_stats included; the checkpoints load into torch.nn.
TEST(E2eTest, DropoutAndBatchNormRunsAreTrainedReplayedAndAnalyzedAsEachStepRan) {
  testing::TempDir tmp;
  const std::string check = std::string(PATHKERNEL_SOURCE_DIR) + "/scripts/check_analysis.py";
  const std::pair<std::string, std::string> runs[] = {
      {"drop", "mlp:24,16:relu:dropout=0.5"}, {"bn", "mlp:24,16:relu:bn"}, {"cnn", "cnn:3,4:relu:bn:dropout=0.25"}};
  for (const auto& [name, spec] : runs) {
    const fs::path run_dir = tmp / name, out = tmp / (name + "_an");
    ASSERT_EQ(run({"train", "--model", spec, "--train-limit", "600", "--steps", "12", "--checkpoint-every", "1",
                   "--momentum", "0.9", "--out", run_dir.string()},
                  tmp.path()).status, 0) << spec;
    const auto manifest = nlohmann::json::parse(read_file(run_dir / "manifest.json"));
    EXPECT_EQ(manifest["model"]["spec"], spec);
    EXPECT_EQ(manifest["model"]["dropout_sites"].size(), name == "drop" ? 2u : name == "cnn" ? 1u : 0u);
    EXPECT_EQ(manifest["model"]["batchnorm"].size(), name == "drop" ? 0u : 2u) << manifest["model"];
    const Result v = run({"replay", run_dir.string(), "--verify"}, tmp.path());
    EXPECT_EQ(v.status, 0) << spec << ": " << v.err;
    if (name == "bn") {  // the weights replay writes are a checkpoint's state_dict, running statistics included
      ASSERT_EQ(run({"replay", run_dir.string(), "--step", "7", "--out", (tmp / "w7.pt").string()}, tmp.path()).status, 0);
      const NamedTensors got = load_tensor_dict(tmp / "w7.pt"), want = load_tensor_dict(RunDir(run_dir).checkpoint(7));
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(got.size(), 6u + 2 * 5);
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_EQ(got[i].first, want[i].first);
        EXPECT_TRUE(at::equal(got[i].second, want[i].second)) << got[i].first;
      }
    }
    const Result a = run({"analyze", run_dir.string(), "--probes", "12", "--check-every", "1", "--out", out.string()},
                         tmp.path());
    ASSERT_EQ(a.status, 0) << spec << ": " << a.err;
    const auto summary = nlohmann::json::parse(read_file(out / "summary.json"));
    EXPECT_EQ(summary["steps_analyzed"], 12);
    EXPECT_LT(summary["max_kernel_split_error"].get<double>(), 1e-10) << spec;
    EXPECT_EQ(fs::exists(out / "arrays" / "U_stats.npy"), name != "drop") << spec;
    EXPECT_EQ(testing::run_program({"/usr/bin/python3", check, run_dir.string(), out.string(), "--steps", "0,5,11"},
                                   tmp / "check.json"),
              0)
        << spec << ": " << read_file(tmp / "check.json");
    EXPECT_EQ(testing::run_program({"/usr/bin/python3", check, run_dir.string(), out.string(), "--steps", "0,5,11",
                                    "--wrong-context"},
                                   tmp / "wrong.json"),
              1)
        << spec << ": another step's masks, running statistics must fail the check: " << read_file(tmp / "wrong.json");
    EXPECT_EQ(testing::run_program({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/scripts/check_checkpoint.py",
                                    run_dir.string()},
                                   tmp / "ckpt.json"),
              0)
        << spec << ": " << read_file(tmp / "ckpt.json");
  }
  for (const char* name : {"drop", "bn"}) {
    const fs::path ex = tmp / (std::string(name) + "_ex");
    const Result e = run({"explain", (tmp / name).string(), "--probe", "3", "--probe", "40", "--out", ex.string()},
                         tmp.path());
    ASSERT_EQ(e.status, 0) << name << ": " << e.err;
    EXPECT_LT(nlohmann::json::parse(read_file(ex / "summary.json"))["max_sum_error"].get<double>(), 1e-9) << name;
  }
  const Result k = run({"analyze", (tmp / "drop").string(), "--kinks", "--out", (tmp / "kinks").string()}, tmp.path());
  EXPECT_EQ(k.status, 2);
  EXPECT_NE(k.err.find("has Dropout sites"), std::string::npos) << k.err;
}

// Label smoothing in a native run (--label-smoothing, as torch.nn.CrossEntropyLoss's): full-batch
// SGD on the linear model, checked from the checkpoints by PyTorch (F.cross_entropy with
// label_smoothing, in float64: step 0's loss and step 1's weights); the analysis uses it (its K is
// the whole first-order change but rounding) and names it; refused with --loss mse or outside
// [0, 1), nothing written.
TEST(E2eTest, LabelSmoothedTrainingIsTorchsAndAnalyzedWithIt) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run";
  ASSERT_EQ(run({"train", "--model", "linear", "--train-limit", "200", "--batch", "200", "--steps", "3", "--lr", "0.5",
                 "--label-smoothing", "0.1", "--checkpoint-every", "1", "--out", run_dir.string()},
                tmp.path())
                .status,
            0);
  const fs::path check_log = tmp / "check.json";
  ASSERT_EQ(testing::run_program({"/usr/bin/python3",
                                  std::string(PATHKERNEL_SOURCE_DIR) + "/tests/python/check_label_smoothing.py",
                                  run_dir.string(), "0.1", "200"},
                                 check_log),
            0)
      << read_file(check_log);
  const nlohmann::json check = nlohmann::json::parse(read_file(check_log));
  EXPECT_LT(check["loss_error"].get<double>(), 1e-6) << check.dump();
  EXPECT_LT(check["update_error"].get<double>(), 1e-5) << check.dump();
  EXPECT_GT(check["unsmoothed_loss_gap"].get<double>(), 1e-5) << check.dump();  // the check tells them apart
  const Result an = run({"analyze", run_dir.string(), "--probes", "2", "--out", (tmp / "an").string()}, tmp.path());
  ASSERT_EQ(an.status, 0) << an.err;
  EXPECT_EQ(read_json(tmp / "an" / "summary.json")["loss"], "ce (label smoothing 0.1)");
  // Plain SGD: the kernel term is the whole first-order change but the float32 update's rounding,
  // with the smoothed loss's dL/df (measured 4e-8..9e-8; with the unsmoothed one, 3e-2).
  const Table steps = read_csv(tmp / "an" / "steps.csv");
  for (size_t i = 0; i < steps.rows; ++i) {
    EXPECT_LT(steps.cols.at("U_norm")[i], 1e-6 * steps.cols.at("F_norm")[i]) << "step " << i;
  }
  for (const auto& [flags, message] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--label-smoothing", "0.1", "--loss", "mse"}, "--label-smoothing is for --loss ce"},
           {{"--label-smoothing", "1"}, "--label-smoothing must be in [0, 1)"},
           {{"--label-smoothing", "-0.5"}, "--label-smoothing must be in [0, 1)"}}) {
    std::vector<std::string> argv = {"train", "--model", "linear", "--steps", "2", "--out", (tmp / "refused").string()};
    argv.insert(argv.end(), flags.begin(), flags.end());
    const Result r = run(argv, tmp.path());
    EXPECT_EQ(r.status, 2) << r.err;
    EXPECT_NE(r.err.find(message), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(tmp / "refused"));
  }
}

}  // namespace
}  // namespace pathkernel
