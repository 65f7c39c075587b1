#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "pathkernel/train/sampler.h"

namespace pathkernel {
namespace {

TEST(SamplerTest, EachEpochIsAPermutationWithAShortLastBatch) {
  BatchSampler s(7, 10, 4);
  EXPECT_EQ(s.steps_per_epoch(), 3);
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::multiset<int64_t> seen;
    for (int k = 0; k < 3; ++k) {
      const auto b = s.batch_for_step(epoch * 3 + k);
      EXPECT_EQ(b.size(), k < 2 ? 4u : 2u);
      seen.insert(b.begin(), b.end());
    }
    std::multiset<int64_t> all;
    for (int64_t i = 0; i < 10; ++i) all.insert(i);
    EXPECT_EQ(seen, all);
  }
  EXPECT_NE(s.batch_for_step(0), s.batch_for_step(3));  // epochs are reshuffled
}

TEST(SamplerTest, AnyStepIsReproducibleOnItsOwn) {
  BatchSampler a(42, 1000, 64), b(42, 1000, 64), c(43, 1000, 64);
  const auto late = a.batch_for_step(40);
  for (int k = 0; k < 40; ++k) b.batch_for_step(k);
  EXPECT_EQ(b.batch_for_step(40), late);
  EXPECT_NE(c.batch_for_step(40), late);
  const SamplerState st = a.state_at(40);
  EXPECT_EQ(st.epoch, 40 / 16);
  EXPECT_EQ(st.position, (40 % 16) * 64);
}

}  // namespace
}  // namespace pathkernel
