// The step-term seam (step_terms.h, docs/architecture.md's worked example): a term added from
// outside the library through AnalyzeConfig::extra_terms is computed on every analyzed step
// from the shared context and lands in steps.csv as a column of its own, its values equal to
// |D_k|^2 summed from arrays/D.npy as written to disk.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <memory>

#include "fixtures.h"
#include "pathkernel/analysis/step_terms.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/train/trainer.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

/// The worked example: |D_k|^2 over probes and outputs, one extra column.
class DSquaredTerm final : public StepTerm {
 public:
  void compute(StepContext& ctx, StepRow& row, StepArrays& /*arrays*/) override {
    row.extra.emplace_back("D_sq", ctx.d.pow(2).sum().item<double>());
    ++steps;
  }
  int64_t steps = 0;
};

/// A term that asks for a direction of its own: the probes' product with the weights, J w_k.
class WeightProductTerm final : public StepTerm {
 public:
  void prepare(StepContext& ctx) override { ctx.need(ctx.w0); }
  void compute(StepContext& ctx, StepRow& row, StepArrays& /*arrays*/) override {
    row.extra.emplace_back("Jw_norm", ctx.product(ctx.w0).norm().item<double>());
  }
};

TEST(StepTermsTest, ATermAddedThroughTheSeamGetsItsOwnColumn) {
  spdlog::set_level(spdlog::level::warn);
  testing::TempDir tmp;
  testing::write_synthetic_idx(tmp / "data", 60, 20, 8, 3);
  TrainConfig t;
  t.data_dir = (tmp / "data").string();
  t.model = "mlp:5:tanh";
  t.steps = 9;
  t.batch = 10;
  t.lr = 0.3;
  t.momentum = 0.5;
  t.checkpoint_every = 4;
  t.out = (tmp / "run").string();
  train(t, "");

  AnalyzeConfig a;
  a.run = t.out;
  a.out = (tmp / "an").string();
  a.probes = 5;
  auto dsq = std::make_shared<DSquaredTerm>();
  a.extra_terms = {dsq, std::make_shared<WeightProductTerm>()};
  const AnalysisResult r = analyze(a);
  write_analysis(r, a);
  EXPECT_EQ(dsq->steps, 9);

  const Table steps = read_csv(tmp / "an" / "steps.csv");
  ASSERT_TRUE(steps.cols.count("D_sq")) << "the term's column";
  ASSERT_TRUE(steps.cols.count("Jw_norm"));
  const at::Tensor d = load_npy(tmp / "an" / "arrays" / "D.npy");  // [steps, P, C], from disk
  ASSERT_EQ(d.size(0), 9);
  for (int64_t k = 0; k < 9; ++k) {
    const double want = d[k].pow(2).sum().item<double>();
    EXPECT_NEAR(steps.cols.at("D_sq")[static_cast<size_t>(k)], want, 1e-12 * want) << "step " << k;
    EXPECT_GT(steps.cols.at("Jw_norm")[static_cast<size_t>(k)], 0.0);
  }
  // The standard columns are untouched by the extra terms: the same analysis without them.
  AnalyzeConfig plain = a;
  plain.extra_terms.clear();
  plain.out = (tmp / "plain").string();
  write_analysis(analyze(plain), plain);
  const Table base = read_csv(tmp / "plain" / "steps.csv");
  EXPECT_FALSE(base.cols.count("D_sq"));
  EXPECT_EQ(base.cols.at("K_norm"), steps.cols.at("K_norm"));
  EXPECT_EQ(base.cols.at("Kopt_norm"), steps.cols.at("Kopt_norm"));
}

}  // namespace
}  // namespace pathkernel
