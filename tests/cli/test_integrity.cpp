// Issue 8's findings, each as a regression test: run directories whose step log, manifest or
// checkpoints no longer match, output folders that must not be lost or half-written, and
// analysis files that a report must not trust.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <fstream>

#include "fixtures.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/report/report.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/trainer.h"
#include "pathkernel/trajectory/replay.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

class IntegrityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::err);
    testing::write_synthetic_idx(tmp_ / "data", 40, 10, 8, 3);
    TrainConfig c;
    c.data_dir = (tmp_ / "data").string();
    c.model = "mlp:5:tanh";
    c.steps = 12;
    c.batch = 8;
    c.lr = 0.3;
    c.momentum = 0.5;
    c.checkpoint_every = 4;
    c.out = run_ = (tmp_ / "run").string();
    train(c, "");
  }
  AnalyzeConfig analysis(const std::string& out) const {
    AnalyzeConfig a;
    a.run = run_;
    a.out = (tmp_ / out).string();
    a.probes = 3;
    return a;
  }
  /// Rewrites the step log through `edit`.
  void edit_log(const std::function<void(std::vector<nlohmann::json>&)>& edit) {
    const RunDir dir(run_);
    auto records = read_step_log(dir.steps_log());
    edit(records);
    std::string text;
    for (const auto& r : records) text += r.dump() + "\n";
    atomic_write(dir.steps_log(), text);
  }
  void edit_manifest(const std::function<void(nlohmann::json&)>& edit) {
    const RunDir dir(run_);
    nlohmann::json m = dir.read_manifest();
    edit(m);
    atomic_write(dir.manifest(), m.dump(2));
  }
  testing::TempDir tmp_;
  std::string run_;
};

TEST_F(IntegrityTest, AnExtraRecordAfterTheEndIsRefused) {
  edit_log([](auto& r) {
    nlohmann::json extra = r.back();
    extra["step"] = 12;
    r.push_back(extra);
  });
  EXPECT_THROW_WITH(analyze(analysis("a")), InputError, "holds 13 steps, the run has 12 (records after the end)");
}

TEST_F(IntegrityTest, BatchIndicesAndRatesAreCheckedAgainstTheData) {
  edit_log([](auto& r) { r[5]["batch"][2] = 40; });
  EXPECT_THROW_WITH(Replayer{run_}, InputError, "steps.jsonl:6: batch index 40 is outside the training set (0..39)");
  edit_log([](auto& r) { r[5]["batch"][2] = 1, r[6]["lr"] = -0.1; });
  EXPECT_THROW_WITH(Replayer{run_}, InputError, "steps.jsonl:7: learning rate -0.1");
  edit_log([](auto& r) { r[6]["lr"] = "fast"; });
  EXPECT_THROW_WITH(Replayer{run_}, InputError, "steps.jsonl:7: malformed record");
}

TEST_F(IntegrityTest, AManifestThatDisagreesWithTheDataIsRefused) {
  // explain used to trust train_examples and read past the labels.
  edit_manifest([](auto& m) { m["data"]["train_examples"] = 400; });
  ExplainConfig e;
  e.run = run_;
  e.out = (tmp_ / "e").string();
  e.probe_indices = {1};
  EXPECT_THROW_WITH(explain(e), InputError, "records 400 training and 10 test examples, the data has 40 and 10");
}

TEST_F(IntegrityTest, AChangedBatchOrActivationNoLongerMatchesTheCheckpoints) {
  // Step 5's batch swapped for another: replaying into checkpoint 8 no longer reproduces it.
  edit_log([](auto& r) { r[5]["batch"] = r[1]["batch"]; });
  EXPECT_THROW_WITH(analyze(analysis("a")), ReplayMismatchError, "does not reproduce");
  edit_log([](auto& r) { r[5]["batch"] = r[9]["batch"]; });  // still another batch
  EXPECT_THROW(analyze(analysis("b")), ReplayMismatchError);
  // The original log, but the manifest says another activation.
  TrainConfig again;
  fs::remove_all(run_);
  SetUp();
  edit_manifest([](auto& m) {
    m["config"]["model"] = "mlp:5:gelu";
    m["model"]["spec"] = "mlp:5:gelu";  // consistent, else refused before any replay
  });
  EXPECT_THROW_WITH(analyze(analysis("c")), ReplayMismatchError, "does not reproduce");
}

TEST_F(IntegrityTest, ReplayVerifyNeedsSomethingToVerifyAndNamesAMissingTensor) {
  const RunDir dir(run_);
  NamedTensors w = load_tensor_dict(dir.checkpoint(8));
  w.pop_back();
  save_tensor_dict(dir.checkpoint(8), w);
  EXPECT_THROW_WITH(Replayer(run_).verify(), InputError, "step_00000008.pt: holds 3 tensors, the model has 4");
  atomic_write(dir.steps_log(), "");
  fs::remove(dir.complete_marker());  // a complete run with an empty log is damaged (RunIdentityTest)
  EXPECT_THROW_WITH(Replayer(run_).verify(), InputError, "nothing to verify: the step log is empty");
}

TEST_F(IntegrityTest, ForceReplacesOnlyAnEarlierOutputOfTheSameKind) {
  // analyze --force into the run directory would have overwritten the run's summary.json.
  AnalyzeConfig a = analysis("a");
  a.out = run_;
  a.force = true;
  const AnalysisResult r = analyze(a);
  const std::string run_summary = read_file(RunDir(run_).summary());
  EXPECT_THROW_WITH(write_analysis(r, a), InputError, "--force replaces only an earlier output of this command");
  EXPECT_EQ(read_file(RunDir(run_).summary()), run_summary);

  // An earlier analysis is replaced whole: no stale file of it is left (S.npy of an earlier
  // --second-order analysis is gone after one without).
  a = analysis("a");
  a.second_order = true;
  write_analysis(analyze(a), a);
  a.second_order = false;
  ASSERT_TRUE(fs::exists(fs::path(a.out) / "arrays" / "S.npy"));
  EXPECT_THROW_WITH(write_analysis(r, a), InputError, "already exists and is not empty");
  a.force = true;
  write_analysis(r, a);
  EXPECT_FALSE(fs::exists(fs::path(a.out) / "arrays" / "S.npy"));
  EXPECT_TRUE(fs::exists(fs::path(a.out) / "arrays" / "D.npy"));
  // ... but what the user added to it is not pathkernel's to remove: a file in arrays/, a report
  // made inside it, notes beside it. Refused naming the file; nothing changes.
  for (const auto& added : {fs::path("arrays") / "mine.npy", fs::path("report") / "report.html", fs::path("notes.txt")}) {
    fs::create_directories((fs::path(a.out) / added).parent_path());
    atomic_write(fs::path(a.out) / added, "mine");
    const std::string d = read_file(fs::path(a.out) / "arrays" / "D.npy");
    const fs::path named = added.parent_path() == "report" ? fs::path("report") : added;  // the new folder itself
    EXPECT_THROW_WITH(write_analysis(r, a), InputError, "--force would remove " + (fs::path(a.out) / named).string() + ",");
    EXPECT_EQ(read_file(fs::path(a.out) / added), "mine");
    EXPECT_EQ(read_file(fs::path(a.out) / "arrays" / "D.npy"), d);
    fs::remove(fs::path(a.out) / added);
    if (added.parent_path() == "report") fs::remove(fs::path(a.out) / "report");
  }
  // A damaged record vouches for nothing; an output without one (older than the record) is
  // refused too: the user removes it.
  atomic_write(fs::path(a.out) / kWrittenRecord, "{not json");
  EXPECT_THROW_WITH(write_analysis(r, a), InputError, "--force would remove");
  fs::remove(fs::path(a.out) / kWrittenRecord);
  EXPECT_THROW_WITH(write_analysis(r, a), InputError, "holds no record of what pathkernel wrote");
  fs::remove_all(a.out);
  write_analysis(r, a);
  write_analysis(r, a);  // and a record of its own output is always enough

  // explain --force does not take an analysis folder, and a folder of the user's is never touched.
  ExplainConfig e;
  e.run = run_;
  e.out = a.out;
  e.probe_indices = {1};
  e.force = true;
  EXPECT_THROW_WITH(write_explanation(explain(e), e), InputError, "this folder holds something else");
  fs::create_directories(tmp_ / "mine");
  atomic_write(tmp_ / "mine" / "notes.txt", "mine");
  AnalyzeConfig m = analysis("mine");
  m.force = true;
  EXPECT_THROW(check_output_dir(m.out, true, "summary.json", kAnalysisFormat), InputError);
  EXPECT_EQ(read_file(tmp_ / "mine" / "notes.txt"), "mine");
  // Nothing half-written is left beside an output either.
  for (const auto& entry : fs::directory_iterator(tmp_.path())) {
    EXPECT_EQ(entry.path().filename().string().find(".staging"), std::string::npos) << entry.path();
  }
}

TEST_F(IntegrityTest, AFailedWriteLeavesNothing) {
  AnalyzeConfig a = analysis("a");
  AnalysisResult r = analyze(a);
  r.outputs = at::Tensor();  // makes the writer fail midway, after the arrays
  EXPECT_ANY_THROW(write_analysis(r, a));
  EXPECT_FALSE(fs::exists(a.out));
  for (const auto& entry : fs::directory_iterator(tmp_.path())) {
    EXPECT_EQ(entry.path().filename().string().find(".staging"), std::string::npos) << entry.path();
  }
}

// Exit status 4 means a check failed, and each check fails on a wrong input: a NaN anywhere, a
// per-example split that does not add up to autograd's, an identity that does not close.
TEST_F(IntegrityTest, ChecksBehindExitFourFailOnWrongInput) {
  const AnalyzeConfig a = analysis("a");
  const AnalysisResult good = analyze(a);
  EXPECT_TRUE(failed_checks(good, a).empty());
  AnalysisResult r = good;
  r.d = good.d.clone();
  r.d[3][1][2] = NAN;
  ASSERT_EQ(failed_checks(r, a).size(), 1u);
  EXPECT_NE(failed_checks(r, a)[0].find("D holds values that are not finite"), std::string::npos);
  r = good;
  r.kernel_split_error = 1e-4;
  EXPECT_NE(failed_checks(r, a).at(0).find("per-example split"), std::string::npos);
  r = good;
  r.identity_error = NAN;  // NaN used to pass the identity check
  EXPECT_NE(failed_checks(r, a).at(0).find("run identity fails"), std::string::npos);

  // The quadrature behind the exact path kernel: one node (the midpoint rule) is not exact on
  // this tanh model, eight are; across ReLU kinks the check does not apply (documented).
  AnalyzeConfig e = analysis("e");
  e.exact_nodes = 1;
  const AnalysisResult coarse = analyze(e);
  EXPECT_TRUE(coarse.smooth);
  EXPECT_GT(coarse.quad_error_rel, e.quadrature_tolerance);
  ASSERT_EQ(failed_checks(coarse, e).size(), 1u);
  EXPECT_NE(failed_checks(coarse, e)[0].find("quadrature error"), std::string::npos);
  e.exact_nodes = 8;
  const AnalysisResult fine = analyze(e);
  EXPECT_LT(fine.quad_error_rel, 1e-10);
  EXPECT_TRUE(failed_checks(fine, e).empty());
  AnalysisResult kinked = coarse;
  kinked.smooth = false;
  EXPECT_TRUE(failed_checks(kinked, e).empty());
}

TEST_F(IntegrityTest, ANaNPlantedInACheckpointIsNotReproduced) {
  const RunDir dir(run_);
  NamedTensors w = load_tensor_dict(dir.checkpoint(8));
  w[0].second[0][0] = NAN;
  save_tensor_dict(dir.checkpoint(8), w);
  fs::remove(dir.digest(8));
  EXPECT_THROW_WITH(analyze(analysis("a")), ReplayMismatchError, "does not reproduce");
}

TEST_F(IntegrityTest, AStrayLabelDoesNotSilentlyAddOutputs) {
  std::vector<uint8_t> labels(40);
  for (int i = 0; i < 40; ++i) labels[i] = static_cast<uint8_t>(i % 3);
  labels[17] = 200;  // one damaged label would have made a model with 201 outputs
  testing::write_file(tmp_ / "data" / "train-labels-idx1-ubyte.gz", testing::idx_bytes({40}, labels), true);
  TrainConfig c;
  c.data_dir = (tmp_ / "data").string();
  c.steps = 2;
  c.out = (tmp_ / "stray").string();
  EXPECT_THROW_WITH(train(c, ""), InputError, "labels go up to 200 but only 4 distinct values occur");
  EXPECT_FALSE(fs::exists(tmp_ / "stray" / "manifest.json"));
  // A --train-limit that stops before the stray label reads the whole labels file all the same.
  c.train_limit = 10;
  EXPECT_THROW_WITH(train(c, ""), InputError, "labels go up to 200 but only 4 distinct values occur");
  // A limit whose first examples hold few of the classes is no damaged file: the run has the
  // file's three classes (it was refused: 1 distinct value of 0..2 in the first 4 examples).
  for (int i = 0; i < 40; ++i) labels[i] = static_cast<uint8_t>(i < 4 ? 2 : i % 3);
  testing::write_file(tmp_ / "data" / "train-labels-idx1-ubyte.gz", testing::idx_bytes({40}, labels), true);
  c.train_limit = 4;
  c.batch = 2;
  c.out = (tmp_ / "few").string();
  EXPECT_NO_THROW(train(c, ""));
  EXPECT_EQ(open_trajectory(c.out)->num_classes(), 3);
}

class ReportInputTest : public IntegrityTest {
 protected:
  void SetUp() override {
    IntegrityTest::SetUp();
    a_ = analysis("analysis");
    write_analysis(analyze(a_), a_);
    rc_.analysis = a_.out;
    rc_.out = (tmp_ / "report").string();
  }
  void replace_in(const std::string& file, const std::string& from, const std::string& to) {
    std::string text = read_file(fs::path(a_.out) / file);
    const size_t pos = text.find(from);
    ASSERT_NE(pos, std::string::npos);
    text.replace(pos, from.size(), to);
    atomic_write(fs::path(a_.out) / file, text);
  }
  AnalyzeConfig a_;
  ReportConfig rc_;
};

TEST_F(ReportInputTest, AnInfiniteResidualRatioIsBadInputNotACrash) {
  // r = inf in steps.csv indexed an empty histogram (SIGSEGV).
  std::string text = read_file(fs::path(a_.out) / "steps.csv");
  auto rows = text.find('\n') + 1;
  auto line_end = text.find('\n', rows);
  std::string line = text.substr(rows, line_end - rows);
  std::vector<std::string> cells;
  for (size_t s = 0, e; (e = line.find(',', s)), true; s = e + 1) {
    cells.push_back(line.substr(s, e == std::string::npos ? std::string::npos : e - s));
    if (e == std::string::npos) break;
  }
  cells[17] = "inf";  // the r column
  std::string joined;
  for (size_t i = 0; i < cells.size(); ++i) joined += (i ? "," : "") + cells[i];
  text.replace(rows, line_end - rows, joined);
  atomic_write(fs::path(a_.out) / "steps.csv", text);
  EXPECT_THROW_WITH(write_report(rc_), InputError, "steps.csv: row 2, column 'r': inf is not a valid value");
  EXPECT_FALSE(fs::exists(rc_.out));
}

TEST_F(ReportInputTest, ShortOrMalformedTablesAreBadInput) {
  std::string probes = read_file(fs::path(a_.out) / "probes.csv");
  const std::string full = probes;
  probes.erase(probes.rfind('\n', probes.size() - 2) + 1);  // drop the last row
  atomic_write(fs::path(a_.out) / "probes.csv", probes);
  EXPECT_THROW_WITH(write_report(rc_), InputError, "probes.csv: 8 rows, the arrays hold 3 probes x 3 outputs");
  atomic_write(fs::path(a_.out) / "probes.csv", full);
  replace_in("steps.csv", "\n0,", "\n0x,");
  EXPECT_THROW_WITH(write_report(rc_), InputError, "steps.csv: row 2, column 'step': '0x' is not a number");
  EXPECT_FALSE(fs::exists(rc_.out));
}

}  // namespace
}  // namespace pathkernel
