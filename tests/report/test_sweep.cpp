#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include "fixtures.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/report/sweep.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

TEST(SweepTest, ResidualGrowsWithLearningRateAndAnInterruptedSweepContinues) {
  spdlog::set_level(spdlog::level::warn);
  testing::TempDir tmp;
  testing::write_synthetic_idx(tmp / "data", 40, 10, 8, 3);
  SweepConfig c;
  c.train.data_dir = (tmp / "data").string();
  c.train.model = "mlp:5:tanh";
  c.train.steps = 6;
  c.train.batch = 8;
  c.train.loss = "mse";  // unbounded in the logits, so the largest rate diverges
  c.analysis.probes = 4;
  c.lrs = {1e-3, 1e-2, 1e-1, 1e30};
  c.out = (tmp / "sweep").string();
  const auto rows = sweep(c);
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_LT(rows[0].median_r, rows[1].median_r);
  EXPECT_LT(rows[1].median_r, rows[2].median_r);
  // Slope about 1 on six steps from the same initialization and batches.
  const double slope = std::log10(rows[2].median_r / rows[0].median_r) / 2.0;
  EXPECT_GT(slope, 0.8);
  EXPECT_LT(slope, 1.2);
  EXPECT_EQ(rows[3].status, "diverged");
  const std::string csv = read_file(fs::path(c.out) / "sweep.csv");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 5);
  EXPECT_TRUE(fs::exists(fs::path(c.out) / "sweep.png"));

  // Run again: every rate is reused, with the same numbers.
  fs::remove_all(fs::path(c.out) / "lr_0.01" / "analysis");
  const auto again = sweep(c);
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(again[i].median_r, rows[i].median_r) << i;
  // A run or an analysis in the sweep's folder made with other settings is not reused.
  SweepConfig other = c;
  other.train.model = "mlp:6:tanh";
  EXPECT_THROW_WITH(sweep(other), InputError, "was trained with model = \"mlp:5:tanh\", this sweep asks for \"mlp:6:tanh\"");
  other = c;
  other.analysis.probes = 5;
  EXPECT_THROW_WITH(sweep(other), InputError, "an analysis with probes = 4, this sweep asks for 5");
  c.lrs = {1e39};
  EXPECT_THROW_WITH(sweep(c), InputError, "below 1e38");
  c.lrs = {};
  EXPECT_THROW_WITH(sweep(c), InputError, "--lr needs at least one");
}

}  // namespace
}  // namespace pathkernel
