// Runs recorded in Python (python/pathkernel_record.py through examples/record_mlp.py, with
// Debian's python3-torch, on real Fashion-MNIST) read by RecordedRun: the data, batches, rates,
// weights and Adam's state line up with an independent recomputation in C++, and damaged runs
// are refused with the file named.
#include <ATen/ATen.h>
#include <sys/stat.h>
#include <signal.h>

#include <algorithm>
#include <functional>
#include <tuple>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/nn/module.h>

#include "fixtures.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/models/model.h"
#include "pathkernel/models/model_spec.h"
#include "pathkernel/train/optimizer.h"
#include "pathkernel/train/stepper.h"
#include "pathkernel/trajectory/recorded_run.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

class RecordedRunTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new testing::TempDir();
    run_ = tmp_->path() / "py-mlp";
    const int st = testing::run_program({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/examples/record_mlp.py",
                                         run_.string(), "--steps", "30", "--train-limit", "600"},
                                        tmp_->path() / "record.log");
    ASSERT_EQ(st, 0) << read_file(tmp_->path() / "record.log");
  }
  static void TearDownTestSuite() { delete tmp_; }
  // A copy of the recorded run to damage.
  fs::path copy(const std::string& name) const {
    const fs::path to = tmp_->path() / name;
    fs::copy(run_, to, fs::copy_options::recursive);
    return to;
  }
  static testing::TempDir* tmp_;
  static fs::path run_;
};
testing::TempDir* RecordedRunTest::tmp_ = nullptr;
fs::path RecordedRunTest::run_;

TEST_F(RecordedRunTest, EveryStepLinesUpWithAnIndependentRecomputation) {
  const RecordedRun run(run_);
  ASSERT_EQ(run.logged_steps(), 30);
  EXPECT_EQ(run.analyzable_steps().size(), 30u);
  EXPECT_EQ(run.loss(), "ce");
  EXPECT_EQ(run.optimizer().kind, OptimizerKind::kAdam);
  EXPECT_EQ(run.train_inputs().sizes(), (std::vector<int64_t>{600, 1, 28, 28}));
  // The recorder recognized the nn.Sequential as the zoo's mlp:64:tanh (Flatten, Linear
  // 784-64, tanh, Linear 64-10). Built from that spec, with the weights under the names the
  // recorder mapped, it recomputes each logged loss from the stored data, batch and weights,
  // and Adam from the stored state, gradient and rate predicts the next stored weights.
  ASSERT_EQ(run.zoo_spec(), "mlp:64:tanh");
  auto model = models::build_model(models::parse_model_spec(run.zoo_spec()), {1, 28, 28}, 10);
  std::vector<std::string> names;
  std::vector<at::Tensor> params;
  for (const auto& p : model->named_parameters()) {
    names.push_back(p.key());
    params.push_back(p.value());
  }
  const NamedTensors w0 = run.weights(0);
  for (size_t i = 0; i < w0.size(); ++i) EXPECT_EQ(run.zoo_names().at(w0[i].first), names[i]);
  double worst_loss = 0, worst_step = 0;
  for (int64_t k = 0; k < run.logged_steps(); ++k) {
    const NamedTensors w = run.weights(k);
    ASSERT_EQ(w.size(), params.size());
    {
      at::NoGradGuard ng;
      for (size_t i = 0; i < w.size(); ++i) params[i].copy_(w[i].second);
    }
    const RecordedRun::Step s = run.step(k);
    const at::Tensor idx = at::tensor(s.batch, at::kLong);
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    const at::Tensor loss = batch_loss(model->forward(run.train_inputs().index_select(0, idx)),
                                       run.train_targets().index_select(0, idx), LossKind::kCrossEntropy);
    worst_loss = std::max(worst_loss, std::abs(loss.item<double>() - s.loss) / std::abs(s.loss));
    loss.backward();
    int64_t updates = 0;
    OptimizerState state = run.optimizer_state(k, &updates);
    EXPECT_EQ(updates, k);
    for (auto& [slot, tensors] : state) {  // the zoo's names for the recorded ones, by position
      for (size_t i = 0; i < tensors.size(); ++i) tensors[i].first = names[i];
    }
    auto opt = make_optimizer(run.optimizer(), names, params);
    opt->load_state(state, updates, run.optimizer_file(k).string());
    std::vector<at::Tensor> grads;
    std::vector<double> sq;
    for (auto& p : params) {
      grads.push_back(p.grad());
      sq.push_back(p.grad().pow(2).sum().item<double>());
    }
    opt->step(grads, sq, s.lr);
    const NamedTensors next = run.weights(k + 1);
    for (size_t i = 0; i < params.size(); ++i) {
      const double scale = (next[i].second - w[i].second).abs().max().item<double>();
      worst_step = std::max(worst_step, (params[i] - next[i].second).abs().max().item<double>() / scale);
    }
  }
  // Measured here: both 0 (same float32 arithmetic as torch.optim.Adam); the bounds leave room
  // for another BLAS kernel's rounding of the gradient.
  EXPECT_LT(worst_loss, 1e-6);
  EXPECT_LT(worst_step, 1e-4);
  // StepLR halved the rate at step 20: the recorded rate is the one each step used.
  EXPECT_DOUBLE_EQ(run.step(19).lr, 3e-3);
  EXPECT_DOUBLE_EQ(run.step(20).lr, 1.5e-3);
}

// The seam changes nothing in the analysis: the analyzer, given a recorded run, matches an
// independent float64 computation in Python that uses the run's own TorchScript model.
TEST_F(RecordedRunTest, AnalyzeAndReportARecordedRunMatchAnIndependentPythonComputation) {
  const fs::path out = tmp_->path() / "analysis", log = tmp_->path() / "analyze.log";
  ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, "analyze", run_.string(), "--probes", "8", "--out", out.string()}, log), 0)
      << read_file(log);
  const std::string text = read_file(log);
  EXPECT_NE(text.find("optimizer adam"), std::string::npos) << text;
  EXPECT_NE(text.find("sum Kopt"), std::string::npos) << text;
  const auto summary = nlohmann::json::parse(read_file(out / "summary.json"));
  EXPECT_EQ(summary["steps_analyzed"], 30);
  EXPECT_LT(summary["max_identity_error"].get<double>(), 1e-8);
  EXPECT_LT(summary["max_kernel_split_error"].get<double>(), 1e-10);
  const fs::path check = tmp_->path() / "check.log";
  EXPECT_EQ(testing::run_program({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/scripts/check_analysis.py",
                                  run_.string(), out.string(), "--steps", "0,13,29", "--tol", "1e-9"},
                                 check),
            0)
      << read_file(check);
  const fs::path rep = tmp_->path() / "report";
  EXPECT_EQ(testing::run_program({PATHKERNEL_BIN, "report", out.string(), "--out", rep.string()}, log), 0) << read_file(log);
  EXPECT_TRUE(fs::exists(rep / "report.html"));
  // explain through Adam (backward recursion over the stored weights and states): the sum
  // check closes and the grids show the stored inputs.
  const fs::path ex = tmp_->path() / "explain";
  ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, "explain", run_.string(), "--probes", "3", "--self-influence", "--out",
                                  ex.string()},
                                 log),
            0)
      << read_file(log);
  const auto es = nlohmann::json::parse(read_file(ex / "summary.json"));
  EXPECT_LT(es["max_sum_error"].get<double>(), 1e-10);
  EXPECT_EQ(es["optimizer"], "adam");
  EXPECT_TRUE(fs::exists(ex / "self_influence.npy"));
  EXPECT_EQ(load_npy(ex / "attributions.npy").sizes(), (std::vector<int64_t>{3, 600}));  // the predicted logit

  // A checkpoint missing in the middle: Adam's kernel term needs every step from 0, so the
  // analysis refuses, naming the file and the step, and writes nothing.
  const fs::path gap = copy("analyze-gap");
  fs::remove(gap / "checkpoints" / "step_00000012.pt");
  const fs::path out2 = tmp_->path() / "analysis-gap";
  EXPECT_EQ(testing::run_program({PATHKERNEL_BIN, "analyze", gap.string(), "--range", "20:30", "--out", out2.string()}, log), 2);
  EXPECT_NE(read_file(log).find("step_00000012.pt: missing, so step 11 cannot be analyzed"), std::string::npos)
      << read_file(log);
  EXPECT_FALSE(fs::exists(out2));
}

TEST_F(RecordedRunTest, ARunKilledMidwayIsReadableUpToItsLastCompleteStep) {
  const fs::path r = tmp_->path() / "killed";
  const int st = testing::run_program(
      {"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/tests/data/record_killed.py", r.string()},
      tmp_->path() / "killed.log");
  ASSERT_EQ(st, -SIGKILL) << read_file(tmp_->path() / "killed.log");
  EXPECT_FALSE(fs::exists(r / "COMPLETE"));
  const RecordedRun run(r);
  EXPECT_EQ(run.logged_steps(), 10);
  EXPECT_EQ(run.analyzable_steps().size(), 10u);
  EXPECT_EQ(run.zoo_spec(), "mlp:16:relu");
  EXPECT_TRUE(run.optimizer().nesterov);
  int64_t updates = 0;
  const OptimizerState s = run.optimizer_state(10, &updates);
  EXPECT_EQ(updates, 10);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].first, "momentum_buffer");
  EXPECT_EQ(s[0].second.size(), 4u);
  // Killed (or refused by the recorder) before its first step: the analysis says so, not that
  // --range 0:0 lies outside the steps 0:0.
  const fs::path none = tmp_->path() / "killed-at-0";
  fs::copy(r, none, fs::copy_options::recursive);
  atomic_write(none / "steps.jsonl", "");
  const fs::path log = tmp_->path() / "killed-at-0.log";
  EXPECT_EQ(testing::run_program({PATHKERNEL_BIN, "analyze", none.string(), "--out", (tmp_->path() / "none-an").string()}, log), 2);
  EXPECT_NE(read_file(log).find("killed-at-0: the run has no logged step"), std::string::npos) << read_file(log);
}

TEST_F(RecordedRunTest, DamagedRunsAreRefusedWithTheFileNamed) {
  // Each damaged copy is refused by the reader and by `pathkernel analyze`: exit 2, the same
  // message, nothing written.
  auto cli_refuses = [&](const fs::path& r, const std::string& message) {
    const fs::path out = tmp_->path() / (r.filename().string() + "-analysis"), log = tmp_->path() / "cli.log";
    EXPECT_EQ(testing::run_program({PATHKERNEL_BIN, "analyze", r.string(), "--probes", "2", "--out", out.string()}, log), 2);
    EXPECT_NE(read_file(log).find(message), std::string::npos) << read_file(log);
    EXPECT_FALSE(fs::exists(out));
  };
  {  // a checkpoint missing in the middle: the steps next to it cannot be analyzed
    const fs::path r = copy("gap");
    fs::remove(r / "checkpoints" / "step_00000012.pt");
    const RecordedRun run(r);
    const auto& a = run.analyzable_steps();
    EXPECT_EQ(a.size(), 28u);
    EXPECT_EQ(std::count(a.begin(), a.end(), 11), 0);
    EXPECT_EQ(std::count(a.begin(), a.end(), 12), 0);
  }
  {  // replay says what a recorded run is rather than "not a manifest"
    EXPECT_THROW_WITH(RunDir(run_).read_manifest(), InputError, "a run recorded with python/pathkernel_record.py");
  }
  {  // a truncated .npy
    const fs::path r = copy("npy");
    const std::string x = read_file(r / "data" / "train_x.npy");
    atomic_write(r / "data" / "train_x.npy", x.substr(0, x.size() - 100));
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "train_x.npy: data size does not match");
    cli_refuses(r, "train_x.npy: data size does not match");
  }
  {  // labels outside the model's outputs
    const fs::path r = copy("labels");
    at::Tensor y = load_npy(r / "data" / "train_y.npy");
    y[5] = 10;
    save_npy(r / "data" / "train_y.npy", y);
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "train_y.npy: labels must be in 0..9");
    cli_refuses(r, "train_y.npy: labels must be in 0..9");
  }
  {  // inputs of another shape than the manifest says
    const fs::path r = copy("shape");
    save_npy(r / "data" / "test_x.npy", at::zeros({500, 784}, at::kDouble));  // right dtype, wrong shape
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "test_x.npy: inputs must be float32 (or float64, or int64 tokens) 500x1x28x28");
    cli_refuses(r, "test_x.npy: inputs must be float32 (or float64, or int64 tokens) 500x1x28x28");
  }
  {  // a state_dict that does not match the manifest (a renamed key, a changed shape)
    const fs::path r = copy("keys");
    std::string m = read_file(r / "manifest.json");
    m.replace(m.find("\"3.bias\"", m.find("state_dict_keys")), 8, "\"3.beta\"");
    atomic_write(r / "manifest.json", m);
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "parameter '3.bias' is not in state_dict_keys");
    cli_refuses(r, "parameter '3.bias' is not in state_dict_keys");
  }
  {
    const fs::path r = copy("weights");
    const RecordedRun ok(r);
    NamedTensors w = ok.weights(3);
    w[1].second = at::zeros({65});
    save_tensor_dict(r / "checkpoints" / "step_00000003.pt", w);
    EXPECT_THROW_WITH(ok.weights(3), InputError, "step_00000003.pt: '1.bias' has shape 65, the manifest 64");
    cli_refuses(r, "step_00000003.pt: '1.bias' has shape 65, the manifest 64");  // found mid-analysis
  }
  {  // a data path leaving the run directory
    const fs::path r = copy("escape");
    std::string m = read_file(r / "manifest.json");
    m.replace(m.find("data/train_x.npy"), 16, "../py-mlp/data/train_x.npy");
    atomic_write(r / "manifest.json", m);
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "is outside the run directory");
    cli_refuses(r, "is outside the run directory");
  }
  {  // int64 tokens for a split whose training inputs are images
    const fs::path r = copy("tokens-mixed");
    save_npy(r / "data" / "test_x.npy", at::zeros({500, 1, 28, 28}, at::kLong));
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "test_x.npy: test inputs are Long, the training inputs Float");
    cli_refuses(r, "test_x.npy: test inputs are Long, the training inputs Float");
  }
  // Issue 23: parameter groups and per-step settings are read strictly.
  auto edit_manifest = [&](const std::string& name, const std::function<void(nlohmann::json&)>& f) {
    const fs::path r = copy(name);
    nlohmann::json m = read_json(r / "manifest.json");
    f(m);
    atomic_write(r / "manifest.json", m.dump(1));
    return r;
  };
  auto edit_step = [&](const std::string& name, int64_t k, const std::function<void(nlohmann::json&)>& f) {
    const fs::path r = copy(name);
    std::string jsonl;
    int64_t i = 0;
    for (auto rec : read_step_log(r / "steps.jsonl")) {
      if (i++ == k) f(rec);
      jsonl += rec.dump() + "\n";
    }
    atomic_write(r / "steps.jsonl", jsonl);
    return r;
  };
  {  // class names that do not name every output
    const fs::path r = edit_manifest("classes-short", [](nlohmann::json& m) { m["classes"] = {"a", "b"}; });
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "classes must name each of the model's 10 outputs");
  }
  {  // two groups with no record of which parameters each holds
    const fs::path r = edit_manifest("groups-unnamed", [](nlohmann::json& m) {
      auto& g = m["optimizer"]["param_groups"];
      g[0].erase("param_names");
      g.push_back(g[0]);
      g[1]["weight_decay"] = 0.1;
    });
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "2 parameter groups without param_names");
    cli_refuses(r, "2 parameter groups without param_names");
  }
  {  // a parameter in two groups; groups that differ in betas
    const fs::path r = edit_manifest("groups-twice", [](nlohmann::json& m) {
      auto& g = m["optimizer"]["param_groups"];
      g.push_back(g[0]);
      g[1]["param_names"] = {"3.bias"};
    });
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "parameter '3.bias' is in 2 parameter groups");
    const fs::path b = edit_manifest("groups-betas", [](nlohmann::json& m) {
      auto& g = m["optimizer"]["param_groups"];
      g.push_back(g[0]);
      g[1]["betas"] = {0.5, 0.999};
    });
    EXPECT_THROW_WITH(RecordedRun{b}, InputError, "parameter groups with different betas are not supported");
  }
  {  // the optimizer's parameters: at least one, each once
    const fs::path none = edit_manifest("params-none", [](nlohmann::json& m) { m["model"]["parameters"] = nlohmann::json::array(); });
    EXPECT_THROW_WITH(RecordedRun{none}, InputError, "model.parameters is empty (the optimizer trains nothing)");
    cli_refuses(none, "model.parameters is empty");
    const fs::path twice = edit_manifest("params-twice", [](nlohmann::json& m) {
      m["model"]["parameters"].push_back(m["model"]["parameters"][0]);
    });
    EXPECT_THROW_WITH(RecordedRun{twice}, InputError, "model.parameters names '1.weight' twice");
  }
  {  // frozen parameters: each an optimizer's parameter, named once, not all of them, no zoo model
    for (const auto& [name, frozen, message] :
         std::vector<std::tuple<std::string, nlohmann::json, std::string>>{
             {"frozen-unknown", {"9.weight"}, "model.frozen must name each of the optimizer's parameters at most once ('9.weight')"},
             {"frozen-twice", {"3.bias", "3.bias"}, "model.frozen must name each of the optimizer's parameters at most once ('3.bias')"},
             {"frozen-all", {"1.weight", "1.bias", "3.weight", "3.bias"}, "model.frozen lists every trained parameter"},
             {"frozen-zoo", {"1.weight"}, "frozen parameters is not one of pathkernel's own (zoo)"}}) {
      const fs::path r = edit_manifest(name, [&](nlohmann::json& m) { m["model"]["frozen"] = frozen; });
      EXPECT_THROW_WITH(RecordedRun{r}, InputError, message);
      if (name == "frozen-unknown") cli_refuses(r, message);
      fs::remove_all(r);
    }
  }
  {  // label smoothing: a number in [0, 1), for the cross-entropy only
    for (const auto& [name, value, message] : std::vector<std::tuple<std::string, nlohmann::json, std::string>>{
             {"smooth-negative", -0.1, "label_smoothing must be a number in [0, 1), not -0.1"},
             {"smooth-one", 1, "label_smoothing must be a number in [0, 1), not 1"},
             {"smooth-text", "0.1", "label_smoothing must be a number in [0, 1), not \"0.1\""},
             {"smooth-null", nullptr, "label_smoothing must be a number in [0, 1), not null"}}) {
      const fs::path r = edit_manifest(name, [&](nlohmann::json& m) { m["label_smoothing"] = value; });
      EXPECT_THROW_WITH(RecordedRun{r}, InputError, message);
      if (name == "smooth-one") cli_refuses(r, message);
      fs::remove_all(r);
    }
    const fs::path mse = edit_manifest("smooth-mse", [](nlohmann::json& m) {
      m["loss"] = "mse";
      m["label_smoothing"] = 0.1;
    });
    EXPECT_THROW_WITH(RecordedRun{mse}, InputError, "label_smoothing is for loss ce, and the loss is mse");
    const fs::path zero = edit_manifest("smooth-zero", [](nlohmann::json& m) { m["label_smoothing"] = 0; });
    EXPECT_EQ(RecordedRun(zero).label_smoothing(), 0.0);
  }
  {  // a step's rates or settings that do not fit the groups
    const fs::path r = edit_step("lrs-short", 4, [](nlohmann::json& rec) { rec["lrs"] = {rec["lr"], 0.5}; });
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "steps.jsonl:5: lrs must hold a finite positive rate for each of the 1");
    cli_refuses(r, "steps.jsonl:5: lrs must hold a finite positive rate");
    const fs::path b = edit_step("betas-bad", 2, [](nlohmann::json& rec) {
      rec["groups"] = nlohmann::json::array({{{"betas", {1.5, 0.999}}}});
    });
    EXPECT_THROW_WITH(RecordedRun{b}, InputError, "steps.jsonl:3: groups[0]: ");
    // a step's micro-batch count: a whole number, 1 to the batch's size
    for (const auto& bad : {nlohmann::json(0), nlohmann::json(1.5), nlohmann::json("2"), nlohmann::json(100000)}) {
      const fs::path a = edit_step("accumulated-bad", 6, [&](nlohmann::json& rec) { rec["accumulated"] = bad; });
      EXPECT_THROW_WITH(RecordedRun{a}, InputError, "steps.jsonl:7: accumulated must be a whole number of micro-batches");
      fs::remove_all(a);
    }
    const fs::path cast = edit_step("autocast-bad", 6, [](nlohmann::json& rec) { rec["autocast"] = 16; });
    EXPECT_THROW_WITH(RecordedRun{cast}, InputError, "steps.jsonl:7: autocast must name a dtype");
    const fs::path two = edit_step("accumulated-two", 6, [](nlohmann::json& rec) {
      rec["accumulated"] = 2;
      rec["autocast"] = "bfloat16";
    });
    EXPECT_EQ(RecordedRun(two).step(6).accumulated, 2);
    EXPECT_EQ(RecordedRun(two).step(6).autocast, "bfloat16");
    const fs::path ok = edit_step("betas-ok", 2, [](nlohmann::json& rec) {
      rec["groups"] = nlohmann::json::array({{{"betas", {0.8, 0.999}}}});
    });
    const RecordedRun run(ok);
    EXPECT_TRUE(run.settings_vary());
    EXPECT_EQ(run.step(2).settings.options.beta1, 0.8);
    EXPECT_EQ(run.step(3).settings.options.beta1, 0.9);
    EXPECT_FALSE(RecordedRun(run_).settings_vary());
  }
  // Issue 22: a data file that is a link out of the run passed the lexical check; a FIFO hung.
  {
    const fs::path r = copy("linked");
    fs::remove(r / "data" / "train_x.npy");
    fs::create_symlink(run_ / "data" / "train_x.npy", r / "data" / "train_x.npy");
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "train_x.npy: a symbolic link that leads outside the run directory");
    cli_refuses(r, "train_x.npy: a symbolic link that leads outside the run directory");
  }
  {
    const fs::path r = copy("fifo");
    fs::remove(r / "data" / "test_x.npy");
    ASSERT_EQ(::mkfifo((r / "data" / "test_x.npy").c_str(), 0600), 0);
    EXPECT_THROW_WITH(RecordedRun{r}, InputError, "test_x.npy: not a regular file");
    cli_refuses(r, "test_x.npy: not a regular file");
  }
}

// Issue 22: the zoo model a manifest names was never compared with model.pt; a Tanh network
// analyzed as a ReLU one gave exit 0. Now a forward of both on recorded inputs must agree.
TEST_F(RecordedRunTest, AZooModelThatIsNotTheTrainedNetworkIsRefused) {
  const fs::path r = copy("zoo-relu");
  std::string m = read_file(r / "manifest.json");
  const size_t at = m.find("mlp:64:tanh");
  ASSERT_NE(at, std::string::npos) << m;
  m.replace(at, 11, "mlp:64:relu");
  atomic_write(r / "manifest.json", m);
  const fs::path out = tmp_->path() / "zoo-relu-analysis", log = tmp_->path() / "zoo.log";
  EXPECT_EQ(testing::run_program({PATHKERNEL_BIN, "analyze", r.string(), "--probes", "2", "--out", out.string()}, log), 2);
  EXPECT_NE(read_file(log).find("model.pt: the manifest analyzes this run as the zoo model mlp:64:relu, but that "
                                "model's outputs on the recorded inputs differ"),
            std::string::npos)
      << read_file(log);
  EXPECT_FALSE(fs::exists(out));
  {  // model.outputs 100000 for a run of 10 outputs: exit 1 (a LibTorch size error) before
    const fs::path wide = copy("outputs-100k");
    nlohmann::json mm = read_json(wide / "manifest.json");
    mm["model"]["outputs"] = 100000;
    atomic_write(wide / "manifest.json", mm.dump(1));
    const fs::path wlog = tmp_->path() / "wide.log";
    EXPECT_EQ(testing::run_program({PATHKERNEL_BIN, "analyze", wide.string(), "--probes", "2", "--out",
                                    (tmp_->path() / "wide-an").string()},
                                   wlog),
              2)
        << read_file(wlog);
    EXPECT_NE(read_file(wlog).find("with 100000 outputs (model.outputs) has parameter"), std::string::npos)
        << read_file(wlog);
  }
  // Its own model still analyzes it.
  EXPECT_EQ(testing::run_program({PATHKERNEL_BIN, "analyze", r.string(), "--probes", "2", "--kernel-route",
                                  "torchscript", "--out", out.string()},
                                 log),
            0)
      << read_file(log);
}

}  // namespace
}  // namespace pathkernel
