// Attention (issue 26, item 2), recorded from PyTorch by examples/record_custom.py on real
// Fashion-MNIST with AdamW: a small ViT (7x7 patches, class token, multi-head self-attention,
// LayerNorm, GELU MLP) and a transformer encoder on int64 token sequences. Each is analyzed
// (with S), explained and reported; D, F, K, R and S (scripts/check_analysis.py), Kopt and
// explain's a_i (tests/python/check_recorded_terms.py) equal an independent float64 computation
// in Python to 1e-9, and explain's sum check closes to 1e-9.
#include <nlohmann/json.hpp>

#include <filesystem>

#include "e2e_support.h"
#include "fixtures.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

using e2e::kSource;
using e2e::run_ok;

nlohmann::json json_of(const fs::path& p) { return nlohmann::json::parse(read_file(p)); }

void check_attention_model(const std::string& model) {
  testing::TempDir tmp;
  const fs::path run = tmp / model, an = tmp / "an", ex = tmp / "ex", log = tmp / "cmd.log";
  run_ok({"/usr/bin/python3", kSource + "/examples/record_custom.py", run.string(), "--model", model, "--adamw",
          "--steps", "8", "--train-limit", "600"},
         log);
  EXPECT_EQ(json_of(run / "manifest.json")["optimizer"]["name"], "adamw");
  run_ok({PATHKERNEL_BIN, "analyze", run.string(), "--probes", "6", "--second-order", "--out", an.string()}, log);
  const nlohmann::json s = json_of(an / "summary.json");
  EXPECT_EQ(s["kernel_route_used"], "torchscript");
  EXPECT_EQ(s["verification"]["steps_failed"], 0);
  run_ok({"/usr/bin/python3", kSource + "/scripts/check_analysis.py", run.string(), an.string(), "--steps", "0,3,7",
          "--tol", "1e-9"},
         log);
  run_ok({PATHKERNEL_BIN, "explain", run.string(), "--probes", "3", "--self-influence", "--out", ex.string()}, log);
  EXPECT_LT(json_of(ex / "summary.json")["max_sum_error"].get<double>(), 1e-9);
  const std::string out =
      run_ok({"/usr/bin/python3", kSource + "/tests/python/check_recorded_terms.py", run.string(), an.string(), ex.string()},
             log);
  const nlohmann::json check = nlohmann::json::parse(out.substr(out.rfind('{')));
  EXPECT_LT(check["kopt_max_error"].get<double>(), 1e-9 * check["kopt_scale"].get<double>()) << check.dump();
  EXPECT_LT(check["attr_max_error"].get<double>(), 1e-9 * check["attr_scale"].get<double>()) << check.dump();
  EXPECT_GT(check["attr_scale"].get<double>(), 0);
  run_ok({PATHKERNEL_BIN, "report", an.string(), "--out", (tmp / "report").string()}, log);
  EXPECT_TRUE(fs::exists(tmp / "report" / "report.html"));
}

TEST(RecordedAttentionTest, ASmallVitIsAnalyzedExplainedAndReportedExactly) { check_attention_model("vit"); }

TEST(RecordedAttentionTest, ATransformerEncoderOnTokensIsAnalyzedExplainedAndReportedExactly) {
  check_attention_model("tokens");
}

}  // namespace
}  // namespace pathkernel
