// Networks recorded in Python that pathkernel does not build itself (examples/record_custom.py,
// Debian's python3-torch, real Fashion-MNIST): a small CNN with SGD + Nesterov momentum that the
// recorder recognizes as the zoo's cnn (both routes, factorized and TorchScript by autograd, must
// agree), and a custom residual + LayerNorm module with AdamW and MSE targets (TorchScript only).
// Each analysis is checked against an independent float64 computation in Python through the
// run's own model; models that do not fit their run are refused naming model.pt.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "e2e_support.h"
#include "fixtures.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

using e2e::kSource;

/// Records `steps` steps of examples/record_custom.py into `out`.
void record(const fs::path& out, const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {"/usr/bin/python3", kSource + "/examples/record_custom.py", out.string(),
                                   "--steps", "32", "--train-limit", "600"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  const fs::path log = out.parent_path() / (out.filename().string() + ".log");
  ASSERT_EQ(testing::run_program(argv, log), 0) << read_file(log);
}

/// Runs pathkernel with `args`; returns its exit status, its output in `text`.
int pathkernel(const std::vector<std::string>& args, const fs::path& log, std::string* text = nullptr) {
  std::vector<std::string> argv = {PATHKERNEL_BIN};
  argv.insert(argv.end(), args.begin(), args.end());
  const int st = testing::run_program(argv, log);
  if (text) *text = read_file(log);
  return st;
}

/// scripts/check_analysis.py: D, F, K, R (and S when analyzed) recomputed in float64 in Python.
void expect_python_agrees(const fs::path& run, const fs::path& analysis, const fs::path& log) {
  EXPECT_EQ(testing::run_program({"/usr/bin/python3", kSource + "/scripts/check_analysis.py", run.string(),
                                  analysis.string(), "--steps", "0,17,31", "--tol", "1e-9"},
                                 log),
            0)
      << read_file(log);
}

double max_rel(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale) {
  return (a - b).abs().max().item<double>() / scale.abs().max().item<double>();
}

TEST(RecordedCustomTest, ACnnWithNesterovAnalyzesTheSameByBothRoutesAndAsPython) {
  testing::TempDir tmp;
  const fs::path run = tmp / "cnn", log = tmp / "cmd.log";
  record(run, {"--model", "cnn"});
  const auto manifest = nlohmann::json::parse(read_file(run / "manifest.json"));
  ASSERT_EQ(manifest["zoo"]["spec"], "cnn:8,16:relu");
  ASSERT_EQ(manifest["optimizer"]["param_groups"][0]["nesterov"], true);
  std::string text;
  ASSERT_EQ(pathkernel({"analyze", run.string(), "--probes", "8", "--out", (tmp / "fact").string()}, log, &text), 0) << text;
  EXPECT_NE(text.find("optimizer sgd"), std::string::npos) << text;
  ASSERT_EQ(pathkernel({"analyze", run.string(), "--probes", "8", "--kernel-route", "torchscript", "--out",
                        (tmp / "script").string()},
                       log, &text),
            0)
      << text;
  const auto sf = nlohmann::json::parse(read_file(tmp / "fact" / "summary.json"));
  const auto ss = nlohmann::json::parse(read_file(tmp / "script" / "summary.json"));
  EXPECT_EQ(sf["model"], "cnn:8,16:relu");
  EXPECT_EQ(ss["model"], "torchscript");
  EXPECT_EQ(sf["kernel_route_used"], "factorized");
  EXPECT_EQ(ss["kernel_route_used"], "torchscript");  // named as such, not "explicit" (issue 23)
  // The zoo's factorized kernels and autograd through the recorded TorchScript model: the same
  // analysis (measured 5e-16; Uopt_round, a difference of nearly equal terms, against |D|).
  const at::Tensor d = load_npy(tmp / "fact" / "arrays" / "D.npy");
  for (const char* q : {"D", "F", "K", "R", "Kopt", "Uopt_round"}) {
    const std::string f = std::string("arrays/") + q + ".npy";
    const at::Tensor a = load_npy(tmp / "fact" / f), b = load_npy(tmp / "script" / f);
    EXPECT_LT(max_rel(a, b, std::string(q) == "Uopt_round" ? d : a), 1e-9) << q;
  }
  expect_python_agrees(run, tmp / "fact", tmp / "check.log");
  ASSERT_EQ(pathkernel({"explain", run.string(), "--probes", "3", "--self-influence", "--out", (tmp / "ex").string()}, log,
                       &text),
            0)
      << text;
  const auto es = nlohmann::json::parse(read_file(tmp / "ex" / "summary.json"));
  EXPECT_LT(es["max_sum_error"].get<double>(), 1e-10);
  EXPECT_EQ(pathkernel({"report", (tmp / "fact").string(), "--out", (tmp / "rep").string()}, log, &text), 0) << text;
  EXPECT_TRUE(fs::exists(tmp / "rep" / "report.html"));
}

TEST(RecordedCustomTest, AResidualLayerNormModuleWithAdamWAndMseTargetsAnalyzesAsPython) {
  testing::TempDir tmp;
  const fs::path run = tmp / "res", log = tmp / "cmd.log";
  record(run, {"--model", "resnorm", "--loss", "mse"});
  const auto manifest = nlohmann::json::parse(read_file(run / "manifest.json"));
  ASSERT_TRUE(manifest["zoo"].is_null());
  EXPECT_EQ(load_npy(run / "data" / "train_y.npy").sizes(), (std::vector<int64_t>{600, 10}));
  std::string text;
  ASSERT_EQ(pathkernel({"analyze", run.string(), "--probes", "8", "--second-order", "--out", (tmp / "an").string()}, log,
                       &text),
            0)
      << text;
  EXPECT_NE(text.find("optimizer adamw"), std::string::npos) << text;
  const auto s = nlohmann::json::parse(read_file(tmp / "an" / "summary.json"));
  EXPECT_EQ(s["model"], "torchscript");
  EXPECT_LT(s["max_identity_error"].get<double>(), 1e-8);
  // S of all rows at once (layer_norm made differentiable to the third order for it: LibTorch
  // 1.13's own is off by 30-50%); Python checks it row by row by Hessian-vector products.
  EXPECT_NE(text.find("S = 1/2 dw^T H dw: all rows at once"), std::string::npos) << text;
  expect_python_agrees(run, tmp / "an", tmp / "check.log");
  ASSERT_EQ(pathkernel({"explain", run.string(), "--probes", "3", "--out", (tmp / "ex").string()}, log, &text), 0) << text;
  const auto es = nlohmann::json::parse(read_file(tmp / "ex" / "summary.json"));
  EXPECT_LT(es["max_sum_error"].get<double>(), 1e-10);
  EXPECT_EQ(es["optimizer"], "adamw");
  EXPECT_EQ(pathkernel({"report", (tmp / "an").string(), "--out", (tmp / "rep").string()}, log, &text), 0) << text;
  EXPECT_TRUE(fs::exists(tmp / "rep" / "report.html"));
}

TEST(RecordedCustomTest, AModelThatDoesNotFitItsRunIsRefusedNamingModelPt) {
  testing::TempDir tmp;
  const fs::path run = tmp / "res", log = tmp / "cmd.log";
  record(run, {"--model", "resnorm", "--steps", "3"});
  auto expect_refused = [&](const fs::path& r, const std::string& message) {
    std::string text;
    const fs::path out = tmp / (r.filename().string() + "-analysis");
    EXPECT_EQ(pathkernel({"analyze", r.string(), "--probes", "2", "--out", out.string()}, log, &text), 2) << text;
    EXPECT_NE(text.find(message), std::string::npos) << text;
    EXPECT_FALSE(fs::exists(out));
  };
  auto copy = [&](const std::string& name) {
    fs::copy(run, tmp / name, fs::copy_options::recursive);
    return tmp / name;
  };
  {  // another network's TorchScript: other parameter names
    const fs::path r = copy("names");
    fs::copy_file(kSource + "/tests/data/scripted_cnn.pt", r / "model.pt", fs::copy_options::overwrite_existing);
    expect_refused(r, "model.pt: has no parameter 'embed.weight', which the run's state_dict trains");
  }
  {  // the same class at another width: the names match, the shapes do not
    const fs::path r = copy("shapes");
    fs::copy_file(kSource + "/tests/data/scripted_resnorm.pt", r / "model.pt", fs::copy_options::overwrite_existing);
    expect_refused(r, "model.pt: parameter 'embed.weight' has shape [5, 16], the run's state_dict has [32, 784]");
  }
  {  // inputs cropped to 28x27 (data and manifest agree): the model's first Linear rejects them
    const fs::path r = copy("cropped");
    auto m = nlohmann::json::parse(read_file(r / "manifest.json"));
    for (const char* split : {"train", "test"}) {
      const fs::path x = r / m["data"][split]["x"].get<std::string>();
      save_npy(x, load_npy(x).narrow(3, 0, 27).contiguous());
      m["data"][split]["input_shape"] = {1, 28, 27};
    }
    atomic_write(r / "manifest.json", m.dump());
    expect_refused(r, "model.pt: the model rejects the run's inputs of shape [2, 1, 28, 27]");
  }
  {  // a damaged archive
    const fs::path r = copy("damaged");
    const std::string bytes = read_file(r / "model.pt");
    atomic_write(r / "model.pt", bytes.substr(0, bytes.size() - 64));
    expect_refused(r, "model.pt: not a readable TorchScript archive");
  }
}

}  // namespace
}  // namespace pathkernel
