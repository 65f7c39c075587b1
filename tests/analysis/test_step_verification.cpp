// The per-step verification of recorded runs (step_verification.h): the fingerprint's +-1
// vectors equal the recorder's (numpy), and the update check names and marks the steps whose
// weights moved otherwise than the logged optimizer would. The whole check, through a recorded
// run, is in TrajectoryTest and the e2e RecordedHabitsTest.
#include <ATen/ATen.h>

#include "fixtures.h"
#include "pathkernel/analysis/step_verification.h"

namespace pathkernel {
namespace {

TEST(StepVerificationTest, FingerprintVectorsAreTheRecordersOwn) {
  // python3 -c "import pathkernel_record as r; print(r.fingerprint_signs(r.FINGERPRINT_SEED, j, 8))"
  const uint64_t seed = 0x7061746B;
  EXPECT_TRUE(at::equal(fingerprint_signs(seed, 0, 8), at::tensor({-1., -1., -1., -1., 1., 1., -1., -1.}, at::kDouble)));
  EXPECT_TRUE(at::equal(fingerprint_signs(seed, 1, 8), at::tensor({1., -1., -1., 1., 1., 1., 1., -1.}, at::kDouble)));
  // Balanced: a fingerprint's projection of g has the scale of |g|.
  const at::Tensor s = fingerprint_signs(seed, 2, 100000);
  EXPECT_LT(std::abs(s.sum().item<double>()), 1000);
}

TEST(StepVerificationTest, KeptGradientsStayWithinTheirBudgetAndAreTakenOnce) {
  auto gradient = [](double v) { return ParamMap{{"a", at::full({3}, v, at::kDouble)}, {"b", at::full({2, 2}, v, at::kDouble)}}; };
  VerifiedGradients kept(2 * 7 * 8);  // two gradients of 7 float64s
  kept.offer(4, gradient(4), 0.4);
  kept.offer(5, gradient(5), 0.5);
  kept.offer(6, gradient(6), 0.6);  // past the budget: not kept
  EXPECT_EQ(kept.bytes(), 2 * 7 * 8);
  ParamMap g;
  double loss = 0;
  EXPECT_FALSE(kept.take(6, g, loss));
  EXPECT_TRUE(g.empty());
  ASSERT_TRUE(kept.take(5, g, loss));
  EXPECT_EQ(loss, 0.5);
  EXPECT_TRUE(at::equal(g.at("a"), at::full({3}, 5.0, at::kDouble)));
  EXPECT_TRUE(at::equal(g.at("b"), at::full({2, 2}, 5.0, at::kDouble)));
  EXPECT_FALSE(kept.take(5, g, loss)) << "taken once";
  EXPECT_EQ(kept.bytes(), 7 * 8);
  kept.offer(6, gradient(6), 0.6);  // room again
  ASSERT_TRUE(kept.take(6, g, loss));
  EXPECT_EQ(loss, 0.6);
  EXPECT_TRUE(at::equal(g.at("a"), at::full({3}, 6.0, at::kDouble)));
}

TEST(StepVerificationTest, TheUpdateCheckNamesAndMarksTheStepsThatMovedOtherwise) {
  std::vector<StepRow> steps(5);
  for (size_t i = 0; i < steps.size(); ++i) {
    steps[i].step = static_cast<int64_t>(i);
    steps[i].kopt_norm = 1.0 + static_cast<double>(i);
    steps[i].uopt_round_norm = 1e-7;  // float rounding
    steps[i].verified = 1;
  }
  EXPECT_EQ(check_updates(steps, "RUN"), "");
  steps[3].uopt_round_norm = 0.2;  // a fifth of... the run's largest Kopt is 5: 4e-2
  const std::string msg = check_updates(steps, "RUN");
  EXPECT_NE(msg.find("RUN: 1 analyzed steps moved the weights otherwise"), std::string::npos) << msg;
  EXPECT_NE(msg.find("step 3: the logged optimizer's update of the recomputed gradient leaves 0.04"), std::string::npos)
      << msg;
  EXPECT_EQ(steps[3].verified, 0);
  EXPECT_EQ(steps[2].verified, 1);
  steps[3].uopt_round_norm = NAN;  // a NaN is not a pass
  steps[3].verified = 1;
  EXPECT_NE(check_updates(steps, "RUN"), "");
}

}  // namespace
}  // namespace pathkernel
