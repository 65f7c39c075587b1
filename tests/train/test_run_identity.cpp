// Issue 22, item 3: results come from the run that was asked for. The data files are the ones the
// manifest's digests name, a --range inside a checkpoint interval is still replayed against a
// checkpoint, a complete run whose log was cut is damaged, the manifest's model and config agree
// and its values are named as its keys, and a report shows the facts of the run it analyzed.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "fixtures.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/idx.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/report/report.h"
#include "pathkernel/train/trainer.h"
#include "pathkernel/trajectory/replay.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

class RunIdentityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::off);
    testing::write_synthetic_idx(tmp_ / "data", 40, 10, 8, 3);
  }
  std::string train_run(const std::string& name, uint64_t seed = 1) {
    TrainConfig c;
    c.data_dir = (tmp_ / "data").string();
    c.model = "mlp:5:tanh";
    c.steps = 20;
    c.batch = 8;
    c.lr = 0.3;
    c.seed = seed;
    c.checkpoint_every = 10;
    c.out = (tmp_ / name).string();
    train(c, "");
    return c.out;
  }
  AnalyzeConfig analysis(const std::string& run, const std::string& out) const {
    AnalyzeConfig a;
    a.run = run;
    a.out = (tmp_ / out).string();
    a.probes = 3;
    return a;
  }
  void edit_json(const fs::path& file, const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = read_json(file);
    edit(j);
    atomic_write(file, j.dump(2));
  }
  testing::TempDir tmp_;
};

// Inverting the test images gave an exit-0 analysis with other numbers, "verified bit for bit".
TEST_F(RunIdentityTest, DataFilesAreTheOnesTheRunWasTrainedOn) {
  const std::string run = train_run("run");
  const fs::path images = find_idx_file(tmp_ / "data", "t10k", "images");
  const IdxArray x = read_idx(images, 3);
  std::vector<uint8_t> inverted(x.data.begin(), x.data.end());
  for (auto& v : inverted) v = static_cast<uint8_t>(255 - v);
  testing::write_file(images, testing::idx_bytes({10, 8, 8}, inverted), /*gz=*/true);
  EXPECT_THROW_WITH(analyze(analysis(run, "an")), InputError,
                    images.string() + ": differs from the file the run was trained on (SHA-256 mismatch with");
  EXPECT_THROW_WITH(Replayer{run}, InputError, "SHA-256 mismatch");
  fs::remove(RunDir(run).complete_marker());  // as if interrupted: resume checks the data too
  EXPECT_THROW_WITH(resume(run, ""), InputError, "SHA-256 mismatch");
}

// `--range 0:5` with checkpoints every 10 replayed steps 0..5 from checkpoint 0 and compared
// nothing: a changed rate in the log was analyzed with exit 0.
TEST_F(RunIdentityTest, ARangeInsideACheckpointIntervalIsStillReplayedAgainstACheckpoint) {
  const std::string run = train_run("run");
  AnalyzeConfig a = analysis(run, "an");
  a.step_begin = 0;
  a.step_end = 5;
  EXPECT_EQ(analyze(a).steps.size(), 5u);  // the run as trained passes
  const RunDir dir(run);
  auto records = read_step_log(dir.steps_log());
  records[2]["lr"] = records[2]["lr"].get<double>() * 1.5;
  std::string text;
  for (const auto& r : records) text += r.dump() + "\n";
  atomic_write(dir.steps_log(), text);
  EXPECT_THROW_WITH(analyze(a), ReplayMismatchError, "does not reproduce " + dir.checkpoint(10).string());
  a.step_begin = 12;  // a range after the change: its own interval replays clean
  a.step_end = 15;
  EXPECT_EQ(analyze(a).steps.size(), 3u);
}

// A complete run whose log was cut before its last checkpoint: replay --verify said "verified: 3
// checkpoints" having checked one, and analyze covered part of the run.
TEST_F(RunIdentityTest, ACompleteRunWhoseLogWasCutShortIsDamaged) {
  const std::string run = train_run("run");
  {
    Replayer r(run);
    EXPECT_EQ(r.verify(), 2);  // checkpoints 10 and 20
  }
  truncate_step_log(RunDir(run).steps_log(), 15);
  EXPECT_THROW_WITH(Replayer{run}, InputError, "steps.jsonl: holds 15 steps, but the run is complete");
  EXPECT_THROW_WITH(analyze(analysis(run, "an")), InputError, "the step log was cut short or damaged");
  fs::remove(RunDir(run).complete_marker());  // a run still training may stop anywhere
  Replayer r(run);
  EXPECT_EQ(r.verify(), 1);
}

TEST_F(RunIdentityTest, TheManifestsModelAndConfigAgreeAndItsValuesAreNamedAsKeys) {
  const std::string run = train_run("run");
  const fs::path manifest = RunDir(run).manifest();
  const std::string original = read_file(manifest);
  edit_json(manifest, [](nlohmann::json& m) { m["model"]["spec"] = "mlp:5:relu"; });
  EXPECT_THROW_WITH(Replayer{run}, InputError, "model.spec 'mlp:5:relu' and config.model 'mlp:5:tanh'");
  for (const auto& [key, value, message] : std::vector<std::tuple<std::string, nlohmann::json, std::string>>{
           {"steps", 30.5, "config.steps must be a whole number, not 30.5"},
           {"batch", "8", "config.batch must be a whole number"},
           {"batch", 0, "config.batch must be at least 1"},
           {"checkpoint_every", 0, "config.checkpoint_every must be at least 1"},
           {"model", "cnn:100000,100000", "config.model: model spec 'cnn:100000,100000': cnn channel counts must be at most"}}) {
    atomic_write(manifest, original);
    const std::string k = key;  // a structured binding cannot be captured in C++17
    const nlohmann::json v = value;
    edit_json(manifest, [&](nlohmann::json& m) { m["config"][k] = v; });
    EXPECT_THROW_WITH(Replayer{run}, InputError, manifest.string() + ": " + message);
  }
}

// report read the run's facts from the path in the summary, resolved against the working
// folder: from another folder, or with another run in its place, it showed another run's facts.
TEST_F(RunIdentityTest, AReportShowsTheFactsOfTheRunItAnalyzedOrRefuses) {
  const std::string run = train_run("run");
  const AnalyzeConfig a = analysis(run, "an");
  write_analysis(analyze(a), a);
  const nlohmann::json s = read_json(fs::path(a.out) / "summary.json");
  EXPECT_EQ(s["run"]["path"], fs::canonical(run).string());
  ReportConfig rc;
  rc.analysis = a.out;
  rc.out = (tmp_ / "report").string();
  write_report(rc);
  EXPECT_NE(read_file(tmp_ / "report" / "report.html").find("mlp:5:tanh"), std::string::npos);

  fs::rename(run, tmp_ / "run-moved");
  train_run("run", /*seed=*/7);  // another run where the analyzed one was
  rc.out = (tmp_ / "report2").string();
  EXPECT_THROW_WITH(write_report(rc), InputError, "is not the one this analysis analyzed");
  EXPECT_FALSE(fs::exists(rc.out));
  fs::remove_all(run);  // no run there at all: the report is made, without the run's facts
  write_report(rc);
  EXPECT_TRUE(fs::exists(fs::path(rc.out) / "report.html"));
}

TEST_F(RunIdentityTest, TheSharpnessSubsetRecordedIsTheOneUsed) {
  const std::string run = train_run("run");
  AnalyzeConfig a = analysis(run, "an");
  a.sharpness_every = 10;
  a.sharpness_examples = 5000;  // the run has 40
  a.sharpness_iterations = 5;
  write_analysis(analyze(a), a);
  EXPECT_EQ(read_json(fs::path(a.out) / "summary.json")["settings"]["sharpness_examples"], 40);
}

}  // namespace
}  // namespace pathkernel
