// Recorded habits analyzed exactly (issue 23, items 2-4): per habit, the analysis and explain
// against an independent float64 computation from the files on disk.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>

#include "fixtures.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"
#include "recorded_habits.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

// Per-step settings and parameter groups (issue 23, item 2): OneCycleLR changing SGD's momentum
// or Adam's beta1 every step, and AdamW with no decay on biases, the head at half the rate and a
// cosine schedule, are recorded (each step's settings, each group's rate and decay) and analyzed
// exactly: every step verifies, the optimizer's update closes (Uopt_round within the rounding
// float32 training can reach on that step, a bound the Python check computes per step), and
// Kopt and explain's a_i equal an independent float64 computation from the files on disk
// (tests/python/check_recorded_terms.py: explicit coefficient products, torch.optim's own state
// files) to 1e-9. Clipping by norm goes through the same check, and so do RMSprop (centered, with
// momentum: P inside the buffer), Adagrad and Adadelta with StepLR (issue 23, item 4), and an
// nn.Embedding + LSTM on int64 tokens with AdamW (item 3: tokens recorded and analyzed as they
// are, and reported). One test per habit (each records, analyzes and explains in processes of
// its own). Parameters the run does not train (frozen, head_only, unused) and tied weights (tied)
// go through it as well, and so does weight_norm (a weight a hook computes: it was taken for the
// zoo's Linear and refused naming zoo.names), a label-smoothed cross-entropy declared to the
// Recorder (smoothed), activation checkpointing (checkpointed), a weight average made after the
// Recorder and evaluated every step (ema), and loss "mse" on float targets (mse). The checks can
// fail: the same OneCycleLR run read with its per-step momentum dropped is refused (exit 4), and
// the rounding bound fails on the step of "moved" whose weights moved outside the update
// (both in test_recorded_habits.cpp).
class HabitTermsTest : public RecordedHabitsTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(HabitTermsTest, SchedulesGroupsAndEveryOptimizerAreAnalyzedExactly) {
  const std::string habit = GetParam();
  const fs::path run = record(habit);
  std::string log;
  ASSERT_EQ(analyze(run, habit + "-exact", log), 0) << log;
  const fs::path an = tmp_->path() / (habit + "-exact");
  EXPECT_EQ(read_json(an / "summary.json")["verification"]["steps_failed"], 0);
  const fs::path ex = tmp_->path() / (habit + "-exact-explain");
  ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, "explain", run.string(), "--probes", "2", "--out", ex.string()},
                                 tmp_->path() / "explain.log"),
            0)
      << read_file(tmp_->path() / "explain.log");
  EXPECT_LT(read_json(ex / "summary.json")["max_sum_error"].get<double>(), 1e-8);
  const nlohmann::json check = check_terms(run, an, ex);
  EXPECT_LT(check["kopt_max_error"].get<double>(), 1e-9) << check.dump();
  EXPECT_LT(check["attr_max_error"].get<double>(), 1e-9) << check.dump();
  EXPECT_GT(check["kopt_scale"].get<double>(), 0);
  expect_update_closes(an, check);
  if (habit == "smoothed") {  // the loss the analysis verified and decomposed
    EXPECT_EQ(read_json(an / "summary.json")["loss"], "ce (label smoothing 0.1)");
  }
  if (habit == "tokens") {  // int64 inputs stored as they are, and reported
    EXPECT_EQ(load_npy(run / "data" / "train_x.npy").scalar_type(), at::kLong);
    ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, "report", an.string(), "--out",
                                    (tmp_->path() / "tokens-report").string()},
                                   tmp_->path() / "report.log"),
              0)
        << read_file(tmp_->path() / "report.log");
    EXPECT_TRUE(fs::exists(tmp_->path() / "tokens-report" / "report.html"));
  }
}

INSTANTIATE_TEST_SUITE_P(RecordedHabits, HabitTermsTest,
                         ::testing::Values("onecycle", "onecycle_adam", "groups", "groups_sgd", "clip", "rmsprop",
                                           "adagrad", "adadelta", "tokens", "accumulate", "frozen", "head_only",
                                           "unused", "tied", "weight_norm", "closure", "smoothed", "checkpointed",
                                           "ema", "mse"),
                         [](const ::testing::TestParamInfo<const char*>& info) { return std::string(info.param); });

}  // namespace
}  // namespace pathkernel
