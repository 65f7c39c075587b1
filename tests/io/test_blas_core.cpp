// The OpenBLAS core rules (blas_core.h) and the start-up self-check of the BLAS's products.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cctype>
#include <cstdlib>
#include <string>

#include "pathkernel/io/blas_core.h"
#include "pathkernel/io/threads.h"

namespace pathkernel {
namespace {

TEST(BlasCoreTest, TheBestCoreFollowsTheCpuFlags) {
  EXPECT_EQ(best_core_for_flags("fpu sse2 ssse3 avx avx2 fma avx512f avx512dq avx512bw avx512vl"), "SkylakeX");
  EXPECT_EQ(best_core_for_flags("fpu sse2 avx avx2 fma avx512f"), "Haswell");  // AVX-512 F alone is not enough
  EXPECT_EQ(best_core_for_flags("sse2 avx avx2"), "SandyBridge");               // AVX2 without FMA
  EXPECT_EQ(best_core_for_flags("sse2 sse3 ssse3"), "");
  EXPECT_EQ(best_core_for_flags("sse2 avx2fma"), "");  // whole words only
  EXPECT_TRUE(is_generic_core("Prescott"));
  EXPECT_FALSE(is_generic_core("Haswell"));
}

TEST(BlasCoreTest, TheEnvironmentIsNeverOverriddenAndARunKeepsItsCore) {
  const std::string avx2 = "sse2 avx avx2 fma";
  const char* env = "Haswell";
  // Set in the environment: kept, whatever the run or the CPU say.
  EXPECT_EQ(choose_blas_core(env, false, "Prescott", "Prescott", avx2).core, "");
  EXPECT_EQ(choose_blas_core(env, false, "Prescott", "Prescott", avx2).reason, "environment");
  // PATHKERNEL_BLAS_CORE=keep: OpenBLAS detects as it would.
  EXPECT_EQ(choose_blas_core(nullptr, true, "", "Prescott", avx2).core, "");
  // A run's recorded core is pinned (replay bit for bit), even a generic one on a better CPU.
  EXPECT_EQ(choose_blas_core(nullptr, false, "Prescott", "Cooperlake", avx2).core, "Prescott");
  EXPECT_EQ(choose_blas_core(nullptr, false, "Haswell", "Haswell", avx2).core, "");  // already so
  // A generic core on a CPU that supports better: the better one; a specific one is kept.
  EXPECT_EQ(choose_blas_core(nullptr, false, "", "Prescott", avx2).core, "Haswell");
  EXPECT_EQ(choose_blas_core(nullptr, false, "", "Prescott", "sse2 sse3").core, "");
  EXPECT_EQ(choose_blas_core(nullptr, false, "", "Zen", avx2).core, "");
  // Not OpenBLAS: nothing to choose.
  EXPECT_EQ(choose_blas_core(nullptr, false, "Haswell", "", avx2).core, "");
}

at::Tensor right_product(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }
at::Tensor slightly_wrong_product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor c = at::mm(a, b);
  c[5][7] += 1e-9;  // one entry off far beyond rounding, as a broken kernel would be
  return c;
}
at::Tensor nan_product(const at::Tensor& a, const at::Tensor& b) { return at::full({a.size(0), b.size(1)}, NAN, a.options()); }

TEST(BlasCoreTest, TheSelfCheckPassesTheBlasAndFailsAWrongProduct) {
  EXPECT_LE(blas_product_error(), 1e-12);  // the BLAS in force, at::mm
  EXPECT_LE(blas_product_error(right_product), 1e-12);
  EXPECT_GT(blas_product_error(slightly_wrong_product), 1e-12);
  EXPECT_FALSE(blas_product_error(nan_product) <= 1e-12);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

TEST(BlasCoreTest, TheCoreInForceIsReported) {
  const ThreadInfo t = pin_threads(1);
  if (t.blas.rfind("openblas", 0) != 0) GTEST_SKIP() << "not OpenBLAS: " << t.blas;
  EXPECT_FALSE(t.blas_core.empty());
  if (const char* env = std::getenv("OPENBLAS_CORETYPE")) {
    EXPECT_EQ(lower(t.blas_core), lower(env));
  }
}

}  // namespace
}  // namespace pathkernel
