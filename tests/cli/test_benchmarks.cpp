// The benchmarks whose figures docs/benchmarks.md cites run to their end and print what they
// measure (a benchmark nothing runs rots unseen: bench_rows' S lines once broke bench_generic's
// parser). At their smallest settings, so the figures themselves are not checked, except what has
// a closed form: the multiply-adds bench_generic counts.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "e2e_support.h"
#include "fixtures.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

#ifdef PATHKERNEL_BENCH_ROWS
// bench_generic.py on the 235k MLP (784-296-10), 4 probes: every route and functorch figure
// measured, and the probes' forward counted as 4 (784 x 296 + 296 x 10) multiply-adds, the first
// layer 4 x 784 x 296.
TEST(BenchmarkTest, TheGenericBenchmarkRunsAndCountsTheMlpsMultiplyAdds) {
  testing::TempDir tmp;
  const fs::path json = tmp / "figures.json";
  const std::string out =
      e2e::run_ok({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/bench/bench_generic.py", "--pathkernel",
                   PATHKERNEL_BIN, "--bench-rows", PATHKERNEL_BENCH_ROWS, "--models", "mlp235k", "--probes", "4",
                   "--steps", "3", "--repeats", "1", "--json", json.string()},
                  tmp / "bench.log");
  EXPECT_NE(out.find("explain's rows / functorch vmap(jacrev): x"), std::string::npos) << out;
  const nlohmann::json figures = nlohmann::json::parse(read_file(json))["results"]["mlp235k"];
  // analyze's figures are marginal times (all steps less step 0 alone, over the steps between):
  // at 3 steps of 4 probes a difference of noise, of either sign; the rest are timed directly.
  for (const char* name : {"pathkernel factorized", "pathkernel torchscript jvp", "pathkernel torchscript rows"}) {
    ASSERT_TRUE(figures.contains(name)) << name << "\n" << out;
    EXPECT_TRUE(figures[name]["seconds"].is_number()) << name;
  }
  for (const char* name : {"pathkernel step products batched", "pathkernel explain rows chosen", "functorch jvp",
                           "functorch step", "functorch rows"}) {
    ASSERT_TRUE(figures.contains(name)) << name << "\n" << out;
    EXPECT_GT(figures[name]["seconds"].get<double>(), 0) << name;
  }
  EXPECT_EQ(figures["multiply_adds"]["forward"], 4 * (784 * 296 + 296 * 10));
  EXPECT_EQ(figures["multiply_adds"]["first"], 4 * 784 * 296);
}
#endif

}  // namespace
}  // namespace pathkernel
