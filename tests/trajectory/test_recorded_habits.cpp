// Habits of real training loops recorded by python/pathkernel_record.py (tests/data/
// record_habits.py, examples/record_loader.py, examples/record_examples_mnist.py) on real
// Fashion-MNIST: each clean loop verifies on every step and is analyzed exactly; each broken one
// is refused with its cause named, by the recorder or by the analysis (issue 23).
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>

#include "fixtures.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/run_dir.h"
#include "recorded_habits.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

TEST_F(RecordedHabitsTest, TheCleanLoopVerifiesOnEveryStep) {
  std::string log;
  ASSERT_EQ(analyze(record("clean"), "clean-an", log), 0) << log;
  const nlohmann::json s = read_json(tmp_->path() / "clean-an" / "summary.json");
  EXPECT_EQ(s["verification"]["steps_checked"], 30);
  EXPECT_EQ(s["verification"]["steps_failed"], 0);
  // The report shows the recorded run's final test accuracy (COMPLETE, written by rec.close()).
  const nlohmann::json done = read_json(tmp_->path() / "clean" / "COMPLETE");
  ASSERT_TRUE(done.contains("test_accuracy")) << done.dump();
  ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, "report", (tmp_->path() / "clean-an").string(), "--out",
                                  (tmp_->path() / "clean-report").string()},
                                 tmp_->path() / "report.log"),
            0)
      << read_file(tmp_->path() / "report.log");
  const std::string html = read_file(tmp_->path() / "clean-report" / "report.html");
  EXPECT_NE(html.find(fmt::format("{:.4f}", done["test_accuracy"].get<double>())), std::string::npos);
  EXPECT_NE(html.find("test accuracy at the end"), std::string::npos);
  // Momentum: the optimizer's update term as weight decay and rounding, in columns of their own.
  EXPECT_NE(html.find("<th>sum Uopt_wd</th><th>sum Uopt_round</th>"), std::string::npos);
  EXPECT_NE(html.find("<th>mean sum Uopt_wd</th><th>mean sum Uopt_round</th>"), std::string::npos);
  EXPECT_EQ(s["run"]["complete"], true);
  EXPECT_EQ(html.find("not complete when analyzed"), std::string::npos);
  const Table t = read_csv(tmp_->path() / "clean-an" / "steps.csv");
  for (size_t i = 0; i < t.rows; ++i) {
    EXPECT_EQ(t.cols.at("verified")[i], 1);
    EXPECT_LT(t.cols.at("verify_loss_error")[i], 1e-6) << i;
    EXPECT_LT(t.cols.at("verify_gradient_error")[i], 1e-5) << i;
  }
}

// A run without its COMPLETE marker (the loop interrupted before rec.close(), or still running)
// is analyzed as far as its log goes, and says so: a warning naming the steps there are, the
// summary's run.complete, a row of the report.
TEST_F(RecordedHabitsTest, AnUnfinishedRunIsAnalyzedAndMarkedAsSuch) {
  const fs::path run = tmp_->path() / "unfinished";
  if (!fs::exists(run)) fs::copy(record("clean"), run, fs::copy_options::recursive);
  fs::remove(run / "COMPLETE");
  std::string log;
  ASSERT_EQ(analyze(run, "unfinished-an", log), 0) << log;
  EXPECT_NE(log.find("not complete (no COMPLETE marker): its training was interrupted or is still running; 30 logged "
                     "steps are there to read"),
            std::string::npos)
      << log;
  EXPECT_EQ(read_json(tmp_->path() / "unfinished-an" / "summary.json")["run"]["complete"], false);
  const fs::path report = tmp_->path() / "unfinished-report";
  ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, "report", (tmp_->path() / "unfinished-an").string(), "--out",
                                  report.string()},
                                 tmp_->path() / "report.log"),
            0)
      << read_file(tmp_->path() / "report.log");
  EXPECT_NE(read_file(report / "report.html").find("not complete when analyzed"), std::string::npos);
}

TEST_F(RecordedHabitsTest, EachBrokenHabitIsRefusedWithItsCauseNamed) {
  const std::vector<std::pair<std::string, std::string>> habits = {
      {"functional", "a module's mode changed"},
      {"unstored", "augmented inputs that the recorder did not store"},
      {"clipvalue", "clipping by value (clip_grad_value_)"},
      {"moved", "outside optimizer.step()"},
      {"momentum", "OneCycleLR's cycle_momentum"},  // the clean run, its manifest's momentum changed
      {"accumulate_nodiv", "the step accumulated 2 micro-batches whose losses do not add up to the batch's mean"},
      {"autocast", "the step's forward ran under torch.autocast (bfloat16, mixed precision)"},
      {"unsmoothed", "the loss is not the manifest's (loss, label_smoothing)"},  // smoothed, its smoothing dropped
  };
  {
    const fs::path run = tmp_->path() / "momentum";
    if (!fs::exists(run)) fs::copy(record("clean"), run, fs::copy_options::recursive);
    nlohmann::json m = read_json(run / "manifest.json");
    ASSERT_EQ(m["optimizer"]["param_groups"][0]["momentum"], 0.5);
    m["optimizer"]["param_groups"][0]["momentum"] = 0.9;
    atomic_write(run / "manifest.json", m.dump(1));
  }
  {
    const fs::path run = tmp_->path() / "unsmoothed";
    if (!fs::exists(run)) fs::copy(record("smoothed"), run, fs::copy_options::recursive);
    nlohmann::json m = read_json(run / "manifest.json");
    ASSERT_EQ(m["label_smoothing"], 0.1);
    m.erase("label_smoothing");
    atomic_write(run / "manifest.json", m.dump(1));
  }
  for (const auto& [habit, cause] : habits) {
    std::string log;
    EXPECT_EQ(analyze(record(habit), habit + "-an", log), 4) << habit << "\n" << log;
    EXPECT_NE(log.find("check failed: "), std::string::npos) << log;
    EXPECT_NE(log.find(cause), std::string::npos) << habit << "\n" << log;
    EXPECT_FALSE(fs::exists(tmp_->path() / (habit + "-an"))) << habit << ": output left";
  }
  // --allow-unverified: analyzed, the failed steps marked and counted.
  std::string log;
  ASSERT_EQ(analyze(record("moved"), "moved-allowed", log, /*allow=*/true), 0) << log;
  const nlohmann::json s = read_json(tmp_->path() / "moved-allowed" / "summary.json");
  EXPECT_GE(s["verification"]["steps_failed"].get<int64_t>(), 1);
  const Table t = read_csv(tmp_->path() / "moved-allowed" / "steps.csv");
  EXPECT_EQ(t.cols.at("verified")[10], 0) << "the step whose weights were moved";
  EXPECT_EQ(t.cols.at("verified")[3], 1);
  // The update's rounding bound fails where the weights moved outside the update, and holds on a
  // step where they did not.
  const auto steps = round_and_bound(tmp_->path() / "moved-allowed", check_terms(record("moved"), tmp_->path() / "moved-allowed"));
  ASSERT_EQ(steps.size(), 30u);
  EXPECT_GT(steps[10].first, 10 * steps[10].second);
  EXPECT_LE(steps[3].first, steps[3].second);
}

// The loop people write (issue 23, item 3): a Dataset, a shuffling DataLoader over Indexed(...),
// `for data, target, index in loader`, the Recorder given the datasets themselves. Recorded by
// examples/record_loader.py and analyzed with every step verified.
TEST_F(RecordedHabitsTest, ADataLoaderLoopRecordsAndEveryStepVerifies) {
  const fs::path run = tmp_->path() / "loader";
  const int st = testing::run_program({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/examples/record_loader.py",
                                       run.string(), "--train-limit", "640"},
                                      tmp_->path() / "loader.log");
  ASSERT_EQ(st, 0) << read_file(tmp_->path() / "loader.log");
  std::string log;
  ASSERT_EQ(analyze(run, "loader-an", log), 0) << log;
  const nlohmann::json s = read_json(tmp_->path() / "loader-an" / "summary.json");
  EXPECT_EQ(s["verification"]["steps_checked"], 10);
  EXPECT_EQ(s["verification"]["steps_failed"], 0);
  const auto records = read_step_log(run / "steps.jsonl");
  const auto first = records[0]["batch"].get<std::vector<int64_t>>();
  EXPECT_FALSE(std::is_sorted(first.begin(), first.end())) << "the loader shuffles";
  // The recorded inputs are the dataset's items as the loop saw them (normalized).
  const at::Tensor x = load_npy(run / "data" / "train_x.npy");
  EXPECT_NEAR(x[0].min().item<double>(), -0.1307 / 0.3081, 1e-6);
}

// pytorch/examples' mnist loop (issue 23, item 3): its Net (1.2M parameters, log_softmax and
// nll_loss, Dropout on in training as written: issue 26), Adadelta at lr 1.0 with StepLR,
// model.train() each epoch and `for batch_idx, (data, target) in enumerate(train_loader)` as
// written, plus five marked lines (Tracked(...) around the training set, the Recorder,
// rec.step(loss), rec.close(), the import). Recorded on Fashion-MNIST with each step's Dropout
// masks, every step verified, analyzed with the update closing, reported with the test accuracy.
TEST_F(RecordedHabitsTest, PytorchExamplesMnistLoopRecordsWithFiveAddedLines) {
  const std::string script = std::string(PATHKERNEL_SOURCE_DIR) + "/examples/record_examples_mnist.py";
  const std::string text = read_file(script);
  size_t marked = 0;
  for (size_t at = text.find("# pathkernel"); at != std::string::npos; at = text.find("# pathkernel", at + 1)) ++marked;
  EXPECT_LE(marked, 5u) << "the lines recording adds, marked";
  EXPECT_NE(text.find("for batch_idx, (data, target) in enumerate(train_loader):"), std::string::npos);
  const fs::path run = tmp_->path() / "examples-mnist";
  ASSERT_EQ(testing::run_program({"/usr/bin/python3", script, run.string(), "--train-limit", "320", "--test-limit", "500"},
                                 tmp_->path() / "examples-mnist.log"),
            0)
      << read_file(tmp_->path() / "examples-mnist.log");
  EXPECT_EQ(read_json(run / "manifest.json")["optimizer"]["name"], "adadelta");
  // Dropout on, as main.py has it (issue 26, item 3): both modules' masks kept with every step.
  const nlohmann::json sites = read_json(run / "manifest.json")["dropout"]["sites"];
  ASSERT_EQ(sites.size(), 2u);
  EXPECT_EQ(sites[0]["module"], "dropout1");
  EXPECT_EQ(sites[1]["p"], 0.5);
  for (const auto& r : read_step_log(run / "steps.jsonl")) {
    EXPECT_EQ(r["mask_shapes"]["dropout1"], nlohmann::json({64, 64, 12, 12})) << r.dump();
  }
  std::string log;
  ASSERT_EQ(analyze(run, "examples-mnist-an", log), 0) << log;
  const fs::path an = tmp_->path() / "examples-mnist-an";
  const nlohmann::json s = read_json(an / "summary.json");
  EXPECT_EQ(s["verification"]["steps_checked"], 5);
  EXPECT_EQ(s["verification"]["steps_failed"], 0);
  expect_update_closes(an, check_terms(run, an));
  ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, "report", an.string(), "--out", (tmp_->path() / "examples-mnist-report").string()},
                                 tmp_->path() / "report.log"),
            0)
      << read_file(tmp_->path() / "report.log");
  const std::string html = read_file(tmp_->path() / "examples-mnist-report" / "report.html");
  EXPECT_NE(html.find("test accuracy at the end"), std::string::npos);
  // The dataset's class names (its `classes`), recorded in the manifest and shown by the report.
  EXPECT_EQ(read_json(run / "manifest.json")["classes"][9], "Ankle boot");
  EXPECT_NE(html.find("Ankle boot"), std::string::npos);
}

// Gradient clipping by norm (issue 23, item 2): the recorder records each step's uniform scale
// between the raw gradient (tensor hooks) and the one applied, and Kopt, the per-example terms
// and self-influence use the applied gradient: every step verifies and explain's sum check closes
// (HabitTermsTest/clip: the optimizer's update of it gives every step, to float32 rounding).
TEST_F(RecordedHabitsTest, ClippingByNormIsRecordedAndAnalyzedExactly) {
  const fs::path run = record("clip");
  const auto records = read_step_log(run / "steps.jsonl");
  ASSERT_TRUE(records[0].contains("grad_scale"));
  EXPECT_LT(records[0]["grad_scale"].get<double>(), 1.0);
  std::string log;
  ASSERT_EQ(analyze(run, "clip-an", log), 0) << log;
  const nlohmann::json s = read_json(tmp_->path() / "clip-an" / "summary.json");
  EXPECT_EQ(s["verification"]["steps_failed"], 0);
  const fs::path ex = tmp_->path() / "clip-explain";
  ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, "explain", run.string(), "--probes", "3", "--self-influence",
                                  "--out", ex.string()},
                                 tmp_->path() / "explain.log"),
            0)
      << read_file(tmp_->path() / "explain.log");
  EXPECT_LT(read_json(ex / "summary.json")["max_sum_error"].get<double>(), 1e-8);
}

// Gradient accumulation (micro-batches, one optimizer.step()): the recorder joins the step's
// forwards whose outputs the backward passes reached into one batch (its rows, inputs as fed,
// Dropout masks) and computes the batch's loss from their outputs. Every step verifies against
// it (an independent route: the analysis recomputes loss and gradient from the files), with
// Dropout too; the accumulation is recorded. HabitTermsTest checks "accumulate" against Python in
// float64; BatchNorm in training mode (each micro-batch by its own statistics) is refused by the
// recorder, and losses not divided (accumulate_nodiv) by the analysis, naming the accumulation.
TEST_F(RecordedHabitsTest, GradientAccumulationIsRecordedAsTheBatchOrRefused) {
  for (const std::string habit : {"accumulate", "accumulate_dropout"}) {
    const fs::path run = record(habit);
    const auto records = read_step_log(run / "steps.jsonl");
    ASSERT_EQ(records.size(), 30u);
    for (const auto& r : records) {
      EXPECT_EQ(r["accumulated"], 2) << habit;
      EXPECT_EQ(r["batch"].size(), 32u) << habit;
    }
    EXPECT_EQ(records[0].contains("inputs"), habit == "accumulate") << "the flipped inputs, both halves";
    if (habit == "accumulate") {
      EXPECT_EQ(load_npy(run / records[0]["inputs"].get<std::string>()).size(0), 32);
    }
    if (habit == "accumulate_dropout") {
      EXPECT_TRUE(records[0].contains("masks"));
    }
    std::string log;
    ASSERT_EQ(analyze(run, habit + "-an", log), 0) << habit << "\n" << log;
    const nlohmann::json s = read_json(tmp_->path() / (habit + "-an") / "summary.json");
    EXPECT_EQ(s["verification"]["steps_failed"], 0) << habit;
    EXPECT_GE(s["verification"]["steps_checked"].get<int64_t>(), 20) << habit;
    const Table t = read_csv(tmp_->path() / (habit + "-an") / "steps.csv");
    for (size_t i = 0; i < t.rows; ++i) EXPECT_LT(t.cols.at("verify_loss_error")[i], 1e-6) << habit << " " << i;
  }
  const std::string bn = refused_by_recorder("accumulate_bn");
  EXPECT_NE(bn.find("step 0: gradient accumulation over 2 forwards with BatchNorm in training mode"), std::string::npos) << bn;
}

// A forward with gradients on after backward() and before optimizer.step() (a loop logging
// accuracy on part of the batch without no_grad) was taken as the step's: its 4 rows as the
// batch with rec.step(loss), its Dropout masks as the step's. The step's forward is the one its
// backward reached: every step verifies, with each trained step's masks.
TEST_F(RecordedHabitsTest, AForwardTheBackwardDidNotReachIsNotTheStep) {
  const fs::path run = record("logforward");
  const auto records = read_step_log(run / "steps.jsonl");
  ASSERT_EQ(records.size(), 30u);
  for (const auto& r : records) EXPECT_EQ(r["batch"].size(), 32u);
  EXPECT_TRUE(records[0].contains("masks"));
  EXPECT_FALSE(records[0].contains("accumulated"));
  std::string log;
  ASSERT_EQ(analyze(run, "logforward-an", log), 0) << log;
  const nlohmann::json s = read_json(tmp_->path() / "logforward-an" / "summary.json");
  EXPECT_EQ(s["verification"]["steps_failed"], 0);
}

// Loops whose steps the analysis could only refuse, misnaming the cause, are refused by the
// recorder at the step, saying why, before any file of it is written (the clean loops above pass
// the same checks every step). The loss the loop passes is checked against the declared loss of
// the step's training forward (its outputs as the model computed them): label smoothing was
// recorded and then refused by the analysis as "a module's mode changed"; undeclared, it is
// refused with the epsilon to declare (declared, HabitTermsTest/smoothed analyzes it exactly).
TEST_F(RecordedHabitsTest, StepsTheAnalysisCouldNotVerifyAreRefusedByTheRecorder) {
  const std::string log = refused_by_recorder("smoothing");
  EXPECT_NE(log.find("step 0: the loss passed to rec.step"), std::string::npos) << log;
  EXPECT_NE(log.find("is not the mean cross-entropy of the model's outputs on the batch"), std::string::npos) << log;
  EXPECT_NE(log.find("it is their cross-entropy with label_smoothing=0.1: pass label_smoothing=0.1 to Recorder"),
            std::string::npos)
      << log;
  EXPECT_FALSE(fs::exists(tmp_->path() / "smoothing" / "checkpoints" / "step_00000001.pt"));
  EXPECT_EQ(read_file(tmp_->path() / "smoothing" / "steps.jsonl"), "");
  // A smoothing outside [0, 1), or with loss "mse": refused by Recorder() before anything is written.
  const fs::path bad = tmp_->path() / "smoothing-args";
  ASSERT_EQ(testing::run_program({"/usr/bin/python3", "-c",
                                  "import sys, torch; sys.path.insert(0, sys.argv[1]); "
                                  "from pathkernel_record import Recorder\n"
                                  "m = torch.nn.Linear(4, 3); opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                                  "for loss, e in (('ce', 1.0), ('ce', -0.1), ('ce', '0.1'), ('mse', 0.1)):\n"
                                  "    try:\n"
                                  "        Recorder(sys.argv[2], m, opt, train=(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long)), "
                                  "loss=loss, label_smoothing=e)\n"
                                  "    except ValueError as err:\n"
                                  "        print('refused:', err)\n",
                                  std::string(PATHKERNEL_SOURCE_DIR) + "/python", bad.string()},
                                 tmp_->path() / "smoothing-args.log"),
            0)
      << read_file(tmp_->path() / "smoothing-args.log");
  const std::string args = read_file(tmp_->path() / "smoothing-args.log");
  EXPECT_NE(args.find("refused: label_smoothing must be a number in [0, 1), not 1.0"), std::string::npos) << args;
  EXPECT_NE(args.find("refused: label_smoothing must be a number in [0, 1), not -0.1"), std::string::npos) << args;
  EXPECT_NE(args.find("refused: label_smoothing must be a number in [0, 1), not '0.1'"), std::string::npos) << args;
  EXPECT_NE(args.find("refused: label_smoothing is for loss 'ce' (cross-entropy), not 'mse'"), std::string::npos) << args;
  EXPECT_FALSE(fs::exists(bad));
  // optimizer.zero_grad() left out: the step's gradient is the sum of every one so far.
  const std::string nozero = refused_by_recorder("nozero");
  EXPECT_NE(nozero.find("step 1: parameter '"), std::string::npos) << nozero;
  EXPECT_NE(nozero.find("held a gradient in .grad when this step's backward began"), std::string::npos) << nozero;
  EXPECT_NE(nozero.find("call optimizer.zero_grad()"), std::string::npos) << nozero;
  EXPECT_EQ(read_step_log(tmp_->path() / "nozero" / "steps.jsonl").size(), 1u) << "step 0 was recorded";
  // Sharpness-aware minimization: the gradient applied is taken at other weights (a second
  // forward and backward); it was recorded and then failed the analysis's check as "clipping by
  // value". Two forwards of 32 rows each for a batch of 32: refused at step 0, saying why.
  const std::string sam = refused_by_recorder("sam");
  EXPECT_NE(sam.find("step 0: the backward passes reached 2 training forwards (64 rows in all) for a batch of 32"),
            std::string::npos)
      << sam;
  EXPECT_NE(sam.find("sharpness-aware minimization"), std::string::npos) << sam;
  EXPECT_EQ(read_file(tmp_->path() / "sam" / "steps.jsonl"), "");
  // rec.step left out once: the next step's weights were two updates on, and the analysis
  // refused three steps as "a module's mode changed". Refused by the recorder at that step.
  const std::string skipped = refused_by_recorder("skipped");
  EXPECT_NE(skipped.find("step 3: optimizer.step() ran 2 times since the last rec.step"), std::string::npos) << skipped;
  EXPECT_EQ(read_step_log(tmp_->path() / "skipped" / "steps.jsonl").size(), 3u);
  // A buffer the model updates itself in training mode: the analysis held it as model.pt has it
  // and refused the steps as "the weights were changed outside optimizer.step()". Sparse
  // embedding gradients crashed the recorder (a reshape of a sparse tensor).
  const std::string counting = refused_by_recorder("counting");
  EXPECT_NE(counting.find("step 0: buffer 'seen' of the model changed"), std::string::npos) << counting;
  EXPECT_EQ(read_file(tmp_->path() / "counting" / "steps.jsonl"), "");
  const std::string phase = refused_by_recorder("new_optimizer");
  EXPECT_NE(phase.find("call rec.step() after optimizer.step(), once per step (the step of the optimizer given to "
                       "the Recorder: one made later is not recorded"),
            std::string::npos)
      << phase;
  EXPECT_EQ(read_step_log(tmp_->path() / "new_optimizer" / "steps.jsonl").size(), 10u);
  const std::string mixup = refused_by_recorder("mixup");
  EXPECT_NE(mixup.find("step 0: the loss passed to rec.step"), std::string::npos) << mixup;
  EXPECT_NE(mixup.find("(noisy or mixed labels: mixup, CutMix)"), std::string::npos) << mixup;
  const std::string spectral = refused_by_recorder("spectral");
  EXPECT_NE(spectral.find("step 0: buffer '1.parametrizations.weight.0._u' of the model changed"), std::string::npos)
      << spectral;
  const std::string sparse = refused_by_recorder("sparse");
  EXPECT_NE(sparse.find("module 'embed' has sparse=True"), std::string::npos) << sparse;
  EXPECT_FALSE(fs::exists(tmp_->path() / "sparse"));
}

// Fine-tuning: parameters the run does not train (requires_grad=False, left out of the
// optimizer, unused by the forward) were a crash in the recorder (a hook on a frozen tensor), a
// refusal naming the zoo, or an internal error of the analysis. They are constants of the model
// and the kernel is over the trained ones (HabitTermsTest checks frozen, head_only and unused
// against Python in float64). The analysis checks they stay constant: a checkpoint in which one
// differs is refused, naming it. A loop that trains one after all (progressive unfreezing, a
// second optimizer) is refused by the recorder at that step.
TEST_F(RecordedHabitsTest, ParametersTheRunDoesNotTrainAreConstantsOrRefused) {
  const fs::path run = record("frozen");
  const nlohmann::json m = read_json(run / "manifest.json");
  EXPECT_EQ(m["model"]["frozen"], nlohmann::json({"1.weight", "1.bias"}));
  EXPECT_TRUE(m["zoo"].is_null());
  std::string log;
  ASSERT_EQ(analyze(run, "frozen-an", log), 0) << log;
  const nlohmann::json s = read_json(tmp_->path() / "frozen-an" / "summary.json");
  EXPECT_NE(s["kernel_route_reason"].get<std::string>().find("parameters the run does not train"), std::string::npos);
  // Only the linear head is trained: the output is linear in it, so no residual is left.
  const Table t = read_csv(tmp_->path() / "frozen-an" / "steps.csv");
  for (size_t i = 0; i < t.rows; ++i) EXPECT_LT(t.cols.at("r")[i], 1e-9) << "step " << i;
  // Constants are no running statistics: no U_stats (it was written, all zeros, and reported).
  EXPECT_FALSE(fs::exists(tmp_->path() / "frozen-an" / "arrays" / "U_stats.npy"));
  EXPECT_EQ(log.find("running statistics"), std::string::npos) << log;
  // A frozen weight changed in one checkpoint: refused, naming the parameter and the file.
  const fs::path moved = tmp_->path() / "frozen-moved";
  fs::copy(run, moved, fs::copy_options::recursive);
  const std::string ck = (moved / "checkpoints" / "step_00000007.pt").string();
  ASSERT_EQ(testing::run_program({"/usr/bin/python3", "-c",
                                  "import sys, torch; sd = torch.load(sys.argv[1]); sd['1.weight'][0, 0] += 1e-3; "
                                  "torch.save(sd, sys.argv[1])",
                                  ck},
                                 tmp_->path() / "edit.log"),
            0)
      << read_file(tmp_->path() / "edit.log");
  EXPECT_EQ(analyze(moved, "frozen-moved-an", log), 2) << log;
  EXPECT_NE(log.find("step_00000007.pt: parameter '1.weight', which the run does not train"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(tmp_->path() / "frozen-moved-an"));
  const std::string unfreeze = refused_by_recorder("unfreeze");
  EXPECT_NE(unfreeze.find("step 10: parameter '1.weight' had requires_grad=False when the Recorder was made and is "
                          "trained now"),
            std::string::npos)
      << unfreeze;
  EXPECT_EQ(read_step_log(tmp_->path() / "unfreeze" / "steps.jsonl").size(), 10u);
  const std::string second = refused_by_recorder("two_optimizers");
  EXPECT_NE(second.find("step 0: parameter '1.weight', which this optimizer does not train, changed"), std::string::npos)
      << second;
}

// The per-step momentum dropped from the records: the update no longer closes, exit 4.
TEST_F(RecordedHabitsTest, OneCycleMomentumDroppedFromTheRecordsFailsTheCheck) {
  const fs::path run = tmp_->path() / "onecycle-held";
  if (!fs::exists(run)) fs::copy(record("onecycle"), run, fs::copy_options::recursive);
  std::string jsonl;
  for (auto r : read_step_log(run / "steps.jsonl")) {
    r.erase("groups");
    jsonl += r.dump() + "\n";
  }
  atomic_write(run / "steps.jsonl", jsonl);
  std::string log;
  EXPECT_EQ(analyze(run, "onecycle-held-an", log), 4) << log;
  EXPECT_NE(log.find("check failed: "), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(tmp_->path() / "onecycle-held-an"));
}

// A forward that returns a tuple (logits, features): Recorder(..., output=0) records the model
// with that output, and every step verifies; without output= the Recorder refuses it, naming
// the argument, before any file is written.
TEST_F(RecordedHabitsTest, ATupleOutputIsRecordedByNameOrRefused) {
  std::string log;
  ASSERT_EQ(analyze(record("tuple"), "tuple-an", log), 0) << log;
  EXPECT_EQ(read_json(tmp_->path() / "tuple-an" / "summary.json")["verification"]["steps_failed"], 0);
  const fs::path run = tmp_->path() / "tuple_unnamed";
  EXPECT_NE(testing::run_program({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/tests/data/record_habits.py",
                                  "tuple_unnamed", run.string()},
                                 tmp_->path() / "tuple_unnamed.log"),
            0);
  EXPECT_NE(read_file(tmp_->path() / "tuple_unnamed.log").find("Recorder(..., output=INDEX or KEY)"), std::string::npos)
      << read_file(tmp_->path() / "tuple_unnamed.log");
  EXPECT_FALSE(fs::exists(run));
}

// Augmentation: the recorder stores the inputs the loop fed with each step (taken from the
// model's last training forward), and the analysis uses them, so every step verifies and the
// run identity holds; the stored files are the flipped and shifted batches.
TEST_F(RecordedHabitsTest, AugmentedInputsAreStoredAndAnalyzedAsFed) {
  const fs::path run = record("augment");
  std::string log;
  ASSERT_EQ(analyze(run, "augment-an", log), 0) << log;
  const nlohmann::json s = read_json(tmp_->path() / "augment-an" / "summary.json");
  EXPECT_EQ(s["verification"]["steps_failed"], 0);
  EXPECT_LT(s["max_identity_error"].get<double>(), 1e-8);
  const auto records = read_step_log(run / "steps.jsonl");
  ASSERT_TRUE(records[4].contains("inputs")) << records[4].dump();
  const at::Tensor fed = load_npy(run / records[4]["inputs"].get<std::string>());
  const at::Tensor x = load_npy(run / "data" / "train_x.npy");
  const at::Tensor rows = x.index_select(0, at::tensor(records[4]["batch"].get<std::vector<int64_t>>(), at::kLong));
  EXPECT_TRUE(at::equal(fed, at::roll(at::flip(rows, {3}), {2}, {2}))) << "the batch as fed: flipped, then shifted";
  // An inputs file that is not the batch's shape is refused, naming it.
  save_npy(run / records[4]["inputs"].get<std::string>(), fed.slice(0, 0, 3));
  EXPECT_EQ(analyze(run, "augment-bad", log), 2) << log;
  EXPECT_NE(log.find("the inputs fed at step 4 must be float32 32x1x28x28"), std::string::npos) << log;
  save_npy(run / records[4]["inputs"].get<std::string>(), fed);
}

// The recorder checks module modes at every step: the loop's model.train() re-enabling Dropout
// is refused at the step it happens, naming it; what it cannot record is refused by Recorder().
TEST_F(RecordedHabitsTest, AModeSwitchIsRefusedAtItsStepAndUnsupportedSettingsBeforeTraining) {
  // Refused by Recorder() itself, before training, leaving nothing behind: a sparse checkpoint
  // with momentum, parameter groups that differ in more than rate and decay, a model TorchScript
  // can neither script nor trace (reentrant activation checkpointing: it was torch.jit.trace's
  // "unordered_map::at").
  for (const auto& [habit, cause] :
       {std::pair{"every5", "checkpoint_every=5 with momentum"},
        std::pair{"group_momentum", "parameter groups with different momentum"},
        std::pair{"checkpointed_reentrant",
                  "the model could not be made TorchScript, which pathkernel analyzes: torch.jit.script refused it ("},
        std::pair{"checkpointed_reentrant", "use use_reentrant=False, or no checkpointing while recording"}}) {
    const std::string log = refused_by_recorder(habit);
    EXPECT_NE(log.find(cause), std::string::npos) << log;
    EXPECT_FALSE(fs::exists(tmp_->path() / habit)) << habit << ": a refused Recorder leaves no files";
  }
  // rec.step(loss) needs the Tracked training set to know the batch.
  std::string log = refused_by_recorder("untracked");
  EXPECT_NE(log.find("rec.step(loss) needs the training set wrapped in Tracked"), std::string::npos) << log;
  // model.train() re-enabling Dropout: refused at the step where it happened.
  log = refused_by_recorder("train_mode");
  EXPECT_NE(log.find("step 5: module '3' is Dropout in training mode"), std::string::npos) << log;
}

}  // namespace
}  // namespace pathkernel
