// Models only the generic route serves (examples/record_custom.py, real Fashion-MNIST, SGD with
// momentum): a residual CNN, an LSTM over the image's rows and a CNN with GroupNorm. Their
// first-order terms come from Jacobian-vector products (forward mode, or the double backward);
// each must agree with the gradient-rows route (--products rows) and with an independent float64
// computation in Python to 1e-12 of |F|.
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
using e2e::run_ok;

nlohmann::json read_json(const fs::path& p) { return nlohmann::json::parse(read_file(p)); }

/// Records `model` for 8 steps, analyzes it with the three ways of forming J v (S too when
/// `second_order`), and compares every array with the rows route and with Python.
void check_generic_model(const std::string& model, bool second_order) {
  testing::TempDir tmp;
  const fs::path run = tmp / model, log = tmp / "cmd.log";
  run_ok({"/usr/bin/python3", kSource + "/examples/record_custom.py", run.string(), "--model", model, "--steps", "8",
          "--train-limit", "600"},
         log);
  const char* modes[] = {"auto", "double-backward", "rows"};
  for (const char* mode : modes) {
    std::vector<std::string> argv = {PATHKERNEL_BIN, "analyze", run.string(), "--probes", "6", "--products", mode,
                                     "--out", (tmp / mode).string()};
    if (second_order) argv.push_back("--second-order");
    run_ok(argv, log);
  }
  const auto auto_summary = read_json(tmp / "auto" / "summary.json");
  EXPECT_EQ(auto_summary["kernel_route_used"], "torchscript");
  EXPECT_EQ(auto_summary["products_used"], "forward");  // LibTorch covers these models' operators
  // Every direction of a step in one forward (tangent_rules.cpp: the LSTM's unsafe_split too).
  EXPECT_NE(auto_summary["products_reason"].get<std::string>().find("; every direction in one forward"), std::string::npos)
      << auto_summary["products_reason"];
  EXPECT_NE(auto_summary["kernel_route_reason"].get<std::string>().find("hint"), std::string::npos);
  EXPECT_EQ(read_json(tmp / "double-backward" / "summary.json")["products_used"], "double-backward");
  EXPECT_EQ(read_json(tmp / "rows" / "summary.json")["products_used"], "rows");
  // Kopt, its rest and the exact parts of U against the rows route, relative to |F|.
  const double f_scale = load_npy(tmp / "rows" / "arrays" / "F.npy").abs().max().item<double>();
  ASSERT_GT(f_scale, 0);
  std::vector<std::string> quantities = {"D", "F", "K", "U", "R", "Kopt", "Uopt_wd", "Uopt_round"};
  if (second_order) quantities.push_back("S");
  for (const char* mode : {"auto", "double-backward"}) {
    for (const auto& q : quantities) {
      const std::string f = "arrays/" + q + ".npy";
      const at::Tensor a = load_npy(tmp / mode / f), b = load_npy(tmp / "rows" / f);
      ASSERT_EQ(a.sizes(), b.sizes()) << mode << " " << q;
      EXPECT_LT((a - b).abs().max().item<double>(), 1e-12 * f_scale) << model << " " << mode << " " << q;
    }
  }
  // Python, float64, explicit per-row Jacobians of the run's own model.pt (D, F, K, R, S) and the
  // optimizer's kernel term from torch.optim's own state (Kopt).
  for (const char* mode : {"auto", "double-backward"}) {
    run_ok({"/usr/bin/python3", kSource + "/scripts/check_analysis.py", run.string(), (tmp / mode).string(), "--steps",
            "0,3,7", "--tol", "1e-12"},
           log);
    const std::string out = run_ok(
        {"/usr/bin/python3", kSource + "/tests/python/check_recorded_terms.py", run.string(), (tmp / mode).string()}, log);
    const auto check = nlohmann::json::parse(out.substr(out.rfind('{')));
    EXPECT_LT(check["kopt_max_error"].get<double>(), 1e-12) << model << " " << mode << " " << check.dump();
  }
}

TEST(RecordedGenericTest, AResidualCnnByJacobianVectorProductsAgreesWithRowsAndPython) {
  check_generic_model("rescnn", /*second_order=*/false);
}

TEST(RecordedGenericTest, AnLstmByJacobianVectorProductsAgreesWithRowsAndPython) {
  check_generic_model("lstm", /*second_order=*/true);
}

TEST(RecordedGenericTest, AGroupNormCnnByJacobianVectorProductsAgreesWithRowsAndPython) {
  check_generic_model("gncnn", /*second_order=*/true);
}

// An nn.Sequential MLP with an eval-mode Dropout and an nn.Identity in it: identities in a
// recorded run, so the recorder recognizes the zoo's mlp:64:tanh and the analysis takes the
// factorized route; it agrees with the model's own TorchScript through autograd.
TEST(RecordedGenericTest, AnEvalDropoutMlpIsAnalyzedOnTheFactorizedRoute) {
  testing::TempDir tmp;
  const fs::path run = tmp / "drop", log = tmp / "cmd.log";
  run_ok({"/usr/bin/python3", kSource + "/examples/record_mlp.py", run.string(), "--steps", "8", "--train-limit", "600",
          "--dropout", "0.3"},
         log);
  const auto manifest = read_json(run / "manifest.json");
  ASSERT_EQ(manifest["zoo"]["spec"], "mlp:64:tanh") << manifest["zoo"].dump();
  EXPECT_EQ(manifest["zoo"]["names"]["5.weight"], "layers.1.weight");  // the Linear after Dropout and Identity
  run_ok({PATHKERNEL_BIN, "analyze", run.string(), "--probes", "6", "--out", (tmp / "fact").string()}, log);
  run_ok({PATHKERNEL_BIN, "analyze", run.string(), "--probes", "6", "--kernel-route", "torchscript", "--out",
          (tmp / "script").string()},
         log);
  const auto s = read_json(tmp / "fact" / "summary.json");
  EXPECT_EQ(s["kernel_route_used"], "factorized");
  EXPECT_EQ(s["model"], "mlp:64:tanh");
  EXPECT_EQ(s["kernel_route_reason"].get<std::string>().find("hint"), std::string::npos);
  const double f_scale = load_npy(tmp / "script" / "arrays" / "F.npy").abs().max().item<double>();
  for (const char* q : {"D", "F", "K", "R", "Kopt"}) {
    const std::string f = std::string("arrays/") + q + ".npy";
    EXPECT_LT((load_npy(tmp / "fact" / f) - load_npy(tmp / "script" / f)).abs().max().item<double>(), 1e-12 * f_scale)
        << q;
  }
}

}  // namespace
}  // namespace pathkernel
