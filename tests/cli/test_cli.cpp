// Every subcommand checks its flags, its output and its inputs before any work: given an unusable
// --out (an earlier output it may not replace, a path below a file, a place it cannot write), a
// bad flag or a missing input it exits 2, writes nothing, and answers in well under a second (the
// `pathkernel` launcher refuses before LibTorch, whose own start-up is 0.7 s, is loaded).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <map>
#include <sstream>

#include "fixtures.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

/// Every entry below `dir` with its size: what "nothing written" is checked against.
std::map<std::string, uintmax_t> listing(const fs::path& dir) {
  std::map<std::string, uintmax_t> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    out[e.path().string()] = e.is_regular_file() ? e.file_size() : 0;
  }
  return out;
}

TEST(CliTest, EverySubcommandRefusesABadOutOrFlagAtOnceWritingNothing) {
  testing::TempDir tmp;
  const fs::path data = tmp / "data", run = tmp / "run", an = tmp / "an", log = tmp / "cmd.log";
  testing::write_synthetic_idx(data, 64, 16);
  const std::string bin = PATHKERNEL_BIN;
  ASSERT_EQ(testing::run_program({bin, "train", "--data", data.string(), "--model", "linear", "--steps", "4", "--batch",
                                  "16", "--out", run.string()},
                                 log),
            0)
      << read_file(log);
  ASSERT_EQ(testing::run_program({bin, "analyze", run.string(), "--probes", "2", "--out", an.string()}, log), 0)
      << read_file(log);
  const fs::path used = tmp / "used";  // a folder holding a user's file
  fs::create_directories(used);
  atomic_write(used / "notes.txt", "mine\n");
  const std::string below_file = (used / "notes.txt" / "out").string();

  // Where a command needs a run, the unusable --out comes with a run that does not exist: the
  // refusal must name the --out, so it was checked before the run was opened.
  const std::string nowhere = (tmp / "no-such-run").string(), notes = (used / "notes.txt").string();
  const std::string proc = "/proc/pathkernel-test/out";
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"train", "--data", nowhere, "--steps", "4", "--out", used.string()}, "already exists and is not empty"},
      {{"train", "--data", nowhere, "--steps", "4", "--out", below_file}, "cannot be created"},
      {{"train", "--data", data.string(), "--steps", "4", "--lr", "0.1x", "--out", (tmp / "t").string()}, "--lr"},
      {{"replay", nowhere, "--step", "2", "--out", notes}, "exists; pass --force"},
      {{"replay", nowhere, "--step", "2", "--out", below_file}, "cannot be created"},
      {{"replay", run.string(), "--step", "2", "--bogus", "--out", (tmp / "w.pt").string()}, "bogus"},
      // --force over the run's own files (the manifest was overwritten with weights: the run lost)
      {{"replay", run.string(), "--step", "2", "--force", "--out", (run / "manifest.json").string()},
       "is inside the run directory"},
      {{"replay", run.string(), "--step", "2", "--out", (run / "checkpoints" / "w.pt").string()}, "is inside the run directory"},
      {{"replay", run.string(), "--step", "2", "--force", "--out", notes}, "replaces only an earlier weights file"},
      {{"analyze", nowhere, "--out", used.string()}, "already exists and is not empty"},
      {{"analyze", nowhere, "--out", below_file}, "cannot be created"},
      {{"analyze", nowhere, "--out", proc}, "cannot be created"},
      {{"analyze", run.string(), "--probes", "many", "--out", (tmp / "a").string()}, "--probes"},
      {{"explain", nowhere, "--probes", "2", "--out", used.string()}, "already exists and is not empty"},
      {{"explain", nowhere, "--probes", "2", "--out", below_file}, "cannot be created"},
      {{"explain", run.string(), "--probes", "2", "--top", "-3", "--out", (tmp / "e").string()}, "--top"},
      {{"influence", nowhere, "--out", used.string()}, "already exists and is not empty"},
      {{"influence", run.string(), "--checkpoints", "0,x", "--out", (tmp / "i").string()}, "--checkpoints"},
      {{"influence", run.string(), "--train-examples", "many", "--out", (tmp / "i").string()}, "--train-examples"},
      {{"influence", nowhere, "--out", (tmp / "i").string()}, "no such run directory"},
      {{"analyze", run.string(), "--shard", "3/2", "--out", (tmp / "a").string()}, "--shard"},
      {{"analyze", run.string(), "--shard-even", "--out", (tmp / "a").string()}, "--shard-even goes with --shard"},
      {{"explain", run.string(), "--probes", "2", "--shard-even", "--out", (tmp / "e").string()}, "--shard-even goes with --shard"},
      {{"explain", run.string(), "--probes", "2", "--probe-part", "0/2", "--out", (tmp / "e").string()}, "--probe-part must be I/N"},
      {{"explain", run.string(), "--probes", "2", "--probe-part", "1/2", "--workers", "2", "--out", (tmp / "e").string()},
       "--probe-part is one worker"},
      {{"analyze", run.string(), "--workers", "0", "--out", (tmp / "a").string()}, "--workers takes 1..64"},
      {{"analyze", run.string(), "--workers", "2", "--every", "2", "--out", (tmp / "a").string()}, "--every 1"},
      {{"analyze", run.string(), "--products", "jvp", "--out", (tmp / "a").string()}, "--products must be"},
      {{"analyze", run.string(), "--kinks", "--kinks-examples", "-1", "--out", (tmp / "a").string()}, "--kinks-examples"},
      {{"analyze", run.string(), "--kinks", "--kinks-examples", "8x", "--out", (tmp / "a").string()}, "--kinks-examples"},
      {{"analyze", run.string(), "--sharpness", "-2", "--out", (tmp / "a").string()}, "--sharpness"},
      {{"analyze", run.string(), "--sharpness", "5", "--sharpness-examples", "0", "--out", (tmp / "a").string()},
       "--sharpness-examples"},
      {{"explain", run.string(), "--probes", "2", "--project", "x", "--out", (tmp / "e").string()}, "--project"},
      {{"merge", an.string(), "--out", used.string()}, "already exists and is not empty"},
      {{"merge", nowhere, "--out", (tmp / "m").string()}, "no such shard"},
      {{"report", nowhere, "--out", used.string()}, "already exists and is not empty"},
      {{"report", nowhere, "--out", below_file}, "cannot be created"},
      {{"report", an.string(), "--bogus", "--out", (tmp / "r").string()}, "bogus"},
      {{"sweep", "--data", nowhere, "--lr", "0.1", "--steps", "4", "--out", used.string()}, "notes.txt, which a sweep"},
      {{"sweep", "--data", nowhere, "--lr", "0.1", "--steps", "4", "--out", below_file}, "cannot be created"},
      {{"sweep", "--data", data.string(), "--lr", "fast", "--steps", "4", "--out", (tmp / "s").string()}, "--lr"},
      {{"sweep", "--data", data.string(), "--lr", "0.1,1e-2,0.10", "--steps", "4", "--out", (tmp / "s").string()},
       "--lr lists 0.1 twice"},
      // Issue 22: values that were accepted, or refused only deep inside the work (exit 1).
      {{"explain", run.string(), "--probes", "2", "--logit", "-1", "--out", (tmp / "e").string()},
       "--logit must be a logit index, 0 or more"},
      {{"train", "--data", data.string(), "--steps", "4", "--model", "cnn:100000,100000", "--out", (tmp / "t").string()},
       "cnn channel counts must be at most 4096"},
      {{"analyze", run.string(), "--threads", "64", "--out", (tmp / "a").string()}, "(the cores this process may use)"},
      {{"explain", run.string(), "--probes", "2", "--threads", "200", "--out", (tmp / "e").string()},
       "(the cores this process may use)"},
      // A usable --out, a missing input: refused before anything is created.
      {{"train", "--data", nowhere, "--steps", "4", "--out", (tmp / "t").string()}, "no such data folder"},
      {{"train", "--resume", nowhere}, "no such run directory"},
      {{"replay", nowhere, "--verify"}, "no such run directory"},
      {{"analyze", nowhere, "--out", (tmp / "a").string()}, "no such run directory"},
      {{"analyze", run.string(), "--probe-indices", nowhere, "--out", (tmp / "a").string()}, "no such probe indices"},
      {{"explain", nowhere, "--probes", "2", "--out", (tmp / "e").string()}, "no such run directory"},
      {{"report", nowhere, "--out", (tmp / "r").string()}, "no such analysis directory"},
      {{"sweep", "--data", nowhere, "--lr", "0.1", "--steps", "4", "--out", (tmp / "s").string()}, "no such data folder"},
  };
  auto before = listing(tmp.path());
  before.erase(log.string());
  auto unchanged = [&] {
    auto now = listing(tmp.path());
    now.erase(log.string());
    return now == before;
  };
  for (const auto& [c, message] : cases) {
    std::vector<std::string> argv = {bin};
    argv.insert(argv.end(), c.begin(), c.end());
    std::string line;
    for (const auto& a : c) line += a + " ";
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(testing::run_program(argv, log), 2) << line << "\n" << read_file(log);
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_NE(read_file(log).find(message), std::string::npos) << line << "\n" << read_file(log);
    // Measured: 2-5 ms. A command that loaded LibTorch first would take 0.7 s when the machine
    // is idle and over a second with another test beside it.
    EXPECT_LT(wall, 0.5) << line;
    EXPECT_TRUE(unchanged()) << line;  // no folder, file or staging area left behind
  }
  EXPECT_EQ(read_file(used / "notes.txt"), "mine\n");
}

TEST(CliTest, HelpAndVersionWorkForEveryCommand) {
  testing::TempDir tmp;
  const fs::path log = tmp / "cmd.log";
  for (const std::string cmd : {"train", "replay", "analyze", "explain", "influence", "report", "sweep", "merge"}) {
    ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, cmd, "--version"}, log), 0) << cmd;
    EXPECT_EQ(read_file(log).rfind("pathkernel ", 0), 0u) << cmd << ": " << read_file(log);
    ASSERT_EQ(testing::run_program({PATHKERNEL_BIN, "help", cmd}, log), 0) << cmd;
    EXPECT_NE(read_file(log).find("pathkernel " + cmd + " [OPTION...]"), std::string::npos) << read_file(log);
  }
  EXPECT_EQ(testing::run_program({PATHKERNEL_BIN, "help", "frobnicate"}, log), 2);
  EXPECT_NE(read_file(log).find("unknown command 'frobnicate'"), std::string::npos) << read_file(log);
}

/// The one line of `log` that is a JSON document (stderr's progress lines are merged in).
nlohmann::json json_line(const fs::path& log) {
  std::istringstream in(read_file(log));
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line[0] == '{') return nlohmann::json::parse(line);
  }
  ADD_FAILURE() << "no JSON line in " << read_file(log);
  return {};
}

TEST(CliTest, JsonSummariesForScriptsEqualTheFiles) {
  testing::TempDir tmp;
  const fs::path data = tmp / "data", run = tmp / "run", an = tmp / "an", rep = tmp / "rep", log = tmp / "cmd.log";
  testing::write_synthetic_idx(data, 64, 16);
  const std::string bin = PATHKERNEL_BIN;
  ASSERT_EQ(testing::run_program({bin, "train", "--data", data.string(), "--model", "linear", "--steps", "4", "--batch",
                                  "16", "--json", "--out", run.string()},
                                 log),
            0);
  const auto t = json_line(log);
  const auto run_summary = nlohmann::json::parse(read_file(run / "summary.json"));
  EXPECT_EQ(t["steps_completed"], 4);
  EXPECT_EQ(t["test_accuracy"], run_summary["test_accuracy"]);
  ASSERT_EQ(testing::run_program({bin, "analyze", run.string(), "--probes", "3", "--json", "--out", an.string()}, log), 0);
  auto a = json_line(log);
  EXPECT_EQ(a["out"], an.string());
  a.erase("out");
  EXPECT_EQ(a, nlohmann::json::parse(read_file(an / "summary.json")));
  ASSERT_EQ(testing::run_program({bin, "report", an.string(), "--json", "--out", rep.string()}, log), 0);
  const auto r = json_line(log);
  EXPECT_EQ(r["html"], (rep / "report.html").string());
  EXPECT_EQ(r["figures"].size(), 5u);  // r, cumulative, D vs F, histogram, by class
}

}  // namespace
}  // namespace pathkernel
