#include <gtest/gtest.h>

#include <cmath>

#include "fixtures.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/train/lr_schedule.h"

namespace pathkernel {
namespace {

TEST(LrScheduleTest, ConstantStepCosineWarmup) {
  EXPECT_DOUBLE_EQ(LrSchedule("constant", 0.1, 10).at(7), 0.1);
  const LrSchedule step("step:3:0.5", 0.8, 10);
  EXPECT_DOUBLE_EQ(step.at(2), 0.8);
  EXPECT_DOUBLE_EQ(step.at(3), 0.4);
  EXPECT_DOUBLE_EQ(step.at(9), 0.1);
  const LrSchedule cos("cosine:0.1", 1.0, 100);
  EXPECT_DOUBLE_EQ(cos.at(0), 1.0);
  EXPECT_NEAR(cos.at(50), 0.55, 1e-12);
  EXPECT_NEAR(cos.at(100), 0.1, 1e-12);
  const LrSchedule warm("warmup:4+step:2:0.1", 1.0, 10);
  EXPECT_DOUBLE_EQ(warm.at(0), 0.25);
  EXPECT_NEAR(warm.at(2), 0.075, 1e-15);  // 3/4 of 0.1
  EXPECT_NEAR(warm.at(4), 0.01, 1e-15);
  EXPECT_DOUBLE_EQ(LrSchedule("warmup:2", 0.2, 10).at(5), 0.2);
}

TEST(LrScheduleTest, FileOfRates) {
  testing::TempDir dir;
  testing::write_file(dir / "lr.txt", "# rates\n0.5\n0.25  \n\n1e-3 # last\n", false);
  const LrSchedule f("file:" + (dir / "lr.txt").string(), 1.0, 3);
  EXPECT_DOUBLE_EQ(f.at(0), 0.5);
  EXPECT_DOUBLE_EQ(f.at(1), 0.25);
  EXPECT_DOUBLE_EQ(f.at(2), 1e-3);
  EXPECT_THROW_WITH(LrSchedule("file:" + (dir / "lr.txt").string(), 1.0, 4), InputError,
                    "has 3 learning rates, the run needs 4");
  testing::write_file(dir / "bad.txt", "0.1\nfast\n", false);
  EXPECT_THROW_WITH(LrSchedule("file:" + (dir / "bad.txt").string(), 1.0, 2), InputError,
                    "bad.txt:2: not a learning rate (one number per line)");
  EXPECT_THROW_WITH(LrSchedule("file:" + (dir / "none").string(), 1.0, 2), InputError, "cannot open");
}

// Issue 22: `file:/dev/zero` hung; `file:/etc/shadow` printed the file's first line in the error.
// Regular files only, and a line that is not a rate is named by its number, never echoed.
TEST(LrScheduleTest, FilesAreReadBoundedAndNeverEchoed) {
  testing::TempDir dir;
  EXPECT_THROW_WITH(LrSchedule("file:/dev/zero", 1.0, 2), InputError, "/dev/zero: not a regular file");
  testing::write_file(dir / "secret", "root:$6$s3cr3t-hash:19000:0:99999:7:::\n", false);
  try {
    LrSchedule("file:" + (dir / "secret").string(), 1.0, 2);
    ADD_FAILURE() << "a file of secrets read as rates";
  } catch (const InputError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("secret:1: not a learning rate"), std::string::npos) << what;
    EXPECT_EQ(what.find("s3cr3t"), std::string::npos) << what;
    EXPECT_EQ(what.find("root"), std::string::npos) << what;
  }
}

TEST(LrScheduleTest, RejectsBadSpecs) {
  EXPECT_THROW_WITH(LrSchedule("step:0:0.5", 0.1, 10), InputError, "positive integer");
  EXPECT_THROW_WITH(LrSchedule("linear", 0.1, 10), InputError, "expected [warmup:W+]");
  EXPECT_THROW_WITH(LrSchedule("cosine:2", 0.1, 10), InputError, "LR_MIN");
  EXPECT_THROW_WITH(LrSchedule("constant", -1, 10), InputError, "--lr");
  EXPECT_THROW_WITH(LrSchedule("constant", NAN, 10), InputError, "--lr");
}

// A decay whose rate underflows within the run (the fuzzer's step:2:6e-117 reaches zero by step 6),
// a growth that overflows, and a warm-up that takes a subnormal rate to zero are refused, naming
// the first step; the same schedules over fewer steps load.
TEST(LrScheduleTest, RefusesASchedulePastTheRangeOfDoubles) {
  EXPECT_THROW_WITH(LrSchedule("step:2:6e-117", 0.1, 50), InputError, "the rate of step 6 is 0");
  EXPECT_NO_THROW(LrSchedule("step:2:6e-117", 0.1, 4));
  EXPECT_THROW_WITH(LrSchedule("step:1:1e200", 0.1, 3), InputError, "the rate of step 2 is inf");
  EXPECT_THROW_WITH(LrSchedule("warmup:4+constant", 1e-310, 8), InputError, "the rate of step 0");
  EXPECT_THROW_WITH(LrSchedule("step:1:0.5", 0.1, 3000000), InputError, "the rate of step 2999999 is 0");
}

}  // namespace
}  // namespace pathkernel
