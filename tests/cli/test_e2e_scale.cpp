// End-to-end runs of the pathkernel binary at scale on one machine and across shards: an
// analysis killed mid-way continues to the same files, shards merge into one process's
// analysis, and explain's workers add up to one process.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "e2e_support.h"
#include "fixtures.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/checkpoint.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

using namespace e2e;

/// Segments an interrupted analysis has written so far.
int64_t segments_in(const fs::path& analysis) {
  std::error_code ec;
  int64_t n = 0;
  for (const auto& e : fs::directory_iterator(analysis / "segments", ec)) n += e.path().filename().string().rfind("seg_", 0) == 0;
  return n;
}

// Issue 12's resumable analysis: killed with SIGKILL after a random number of finished segments
// (so mid-segment, at a random step), twice, then run again to the end: the same files as an
// uninterrupted analysis; another command on the partial folder exits 2 and changes nothing.
TEST(E2eTest, AnalysisKilledAtARandomStepContinuesToTheSameFiles) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run", ref = tmp / "ref", cut = tmp / "cut";
  ASSERT_EQ(run({"train", "--model", "mlp:32:tanh", "--train-limit", "2000", "--steps", "200", "--checkpoint-every",
                 "20", "--momentum", "0.9", "--out", run_dir.string()},
                tmp.path()).status, 0);
  const std::vector<std::string> cmd = {"analyze", run_dir.string(), "--probes", "32", "--second-order",
                                        "--segment-every", "0", "--out"};
  auto with_out = [&](const fs::path& out) {
    std::vector<std::string> a = cmd;
    a.push_back(out.string());
    return a;
  };
  ASSERT_EQ(run(with_out(ref), tmp.path()).status, 0);
  std::mt19937 rng(std::random_device{}());
  int kills = 0;
  for (int round = 0; round < 2; ++round) {
    const int64_t target = segments_in(cut) + 1 + static_cast<int64_t>(rng() % 3);
    const pid_t pid = spawn(with_out(cut), tmp.path());
    for (;;) {
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) break;
      if (segments_in(cut) >= target) {
        kill(pid, SIGKILL);
        wait_status(pid);
        ++kills;
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
  ASSERT_GE(kills, 1) << "the analysis finished before it could be killed";
  ASSERT_TRUE(fs::exists(cut / "partial.json"));
  const auto before = segments_in(cut);
  const Result other = run({"analyze", run_dir.string(), "--probes", "8", "--out", cut.string()}, tmp.path());
  EXPECT_EQ(other.status, 2);
  EXPECT_NE(other.err.find("interrupted analysis of another command"), std::string::npos) << other.err;
  EXPECT_EQ(segments_in(cut), before);
  const Result fin = run(with_out(cut), tmp.path());
  ASSERT_EQ(fin.status, 0) << fin.err;
  EXPECT_NE(fin.err.find("continuing an interrupted analysis"), std::string::npos) << fin.err;
  for (const auto& e : fs::directory_iterator(ref / "arrays")) {
    EXPECT_EQ(read_file(e.path()), read_file(cut / "arrays" / e.path().filename())) << e.path().filename();
  }
  EXPECT_EQ(read_file(ref / "steps.csv"), read_file(cut / "steps.csv"));
  EXPECT_EQ(read_file(ref / "probes.csv"), read_file(cut / "probes.csv"));
  EXPECT_FALSE(fs::exists(cut / "partial.json"));
}

// Issue 12's sharding through the command line: two shards of a real run merged equal the
// single-process analysis; a merge with a shard missing exits 2 and writes nothing.
TEST(E2eTest, ShardsMergeIntoTheSingleProcessAnalysis) {
  testing::TempDir tmp;
  const fs::path run_dir = tmp / "run";
  ASSERT_EQ(run({"train", "--model", "mlp:16:tanh", "--train-limit", "600", "--steps", "40", "--checkpoint-every", "10",
                 "--momentum", "0.9", "--out", run_dir.string()},
                tmp.path()).status, 0);
  ASSERT_EQ(run({"analyze", run_dir.string(), "--probes", "8", "--out", (tmp / "whole").string()}, tmp.path()).status, 0);
  for (const char* i : {"1", "2"}) {
    const Result r = run({"analyze", run_dir.string(), "--probes", "8", "--shard", std::string(i) + "/2", "--out",
                          (tmp / (std::string("s") + i)).string()},
                         tmp.path());
    ASSERT_EQ(r.status, 0) << r.err;
  }
  const Result m = run({"merge", (tmp / "s2").string(), (tmp / "s1").string(), "--out", (tmp / "merged").string()},
                       tmp.path());
  ASSERT_EQ(m.status, 0) << m.err;
  EXPECT_NE(m.out.find("f_N - f_0  =  sum Kopt"), std::string::npos) << m.out;
  for (const char* a : {"D", "F", "K", "U", "R", "Kopt", "Uopt_wd", "Uopt_round"}) {
    EXPECT_EQ(read_file(tmp / "whole" / "arrays" / (std::string(a) + ".npy")),
              read_file(tmp / "merged" / "arrays" / (std::string(a) + ".npy"))) << a;
  }
  EXPECT_EQ(read_file(tmp / "whole" / "steps.csv"), read_file(tmp / "merged" / "steps.csv"));
  // --workers 2: the same shards in two processes at once, joined: the same analysis bit for bit,
  // and nothing of the workers' own left in the output.
  const Result w = run({"analyze", run_dir.string(), "--probes", "8", "--workers", "2", "--out",
                        (tmp / "workers").string()},
                       tmp.path());
  ASSERT_EQ(w.status, 0) << w.err;
  EXPECT_NE(w.out.find("f_N - f_0  =  sum Kopt"), std::string::npos) << w.out;
  for (const char* a : {"D", "F", "K", "U", "R", "Kopt", "Uopt_wd", "Uopt_round", "outputs", "step", "probe"}) {
    EXPECT_EQ(read_file(tmp / "whole" / "arrays" / (std::string(a) + ".npy")),
              read_file(tmp / "workers" / "arrays" / (std::string(a) + ".npy"))) << a;
  }
  EXPECT_EQ(read_file(tmp / "whole" / "steps.csv"), read_file(tmp / "workers" / "steps.csv"));
  EXPECT_EQ(read_file(tmp / "whole" / "probes.csv"), read_file(tmp / "workers" / "probes.csv"));
  EXPECT_FALSE(fs::exists(tmp / "workers" / "workers"));
  EXPECT_FALSE(fs::exists(tmp / "workers" / "partial.json"));
  // Workers that fail (a probe index outside the split) fail the command with their status, and
  // leave no output; --workers with --shard is refused before anything starts.
  testing::write_file(tmp / "bad-probes.txt", "3\n999999\n", /*gz=*/false);
  const Result bad = run({"analyze", run_dir.string(), "--probe-indices", (tmp / "bad-probes.txt").string(), "--workers",
                          "2", "--out", (tmp / "bad").string()},
                         tmp.path());
  EXPECT_EQ(bad.status, 2) << bad.err;
  EXPECT_NE(bad.err.find("999999"), std::string::npos) << bad.err;
  EXPECT_FALSE(fs::exists(tmp / "bad"));
  // The same over an earlier analysis with --force: it is left as it was found.
  const std::string before = read_file(tmp / "workers" / "steps.csv");
  const Result over = run({"analyze", run_dir.string(), "--probe-indices", (tmp / "bad-probes.txt").string(), "--workers",
                           "2", "--force", "--out", (tmp / "workers").string()},
                          tmp.path());
  EXPECT_EQ(over.status, 2) << over.err;
  EXPECT_EQ(read_file(tmp / "workers" / "steps.csv"), before);
  EXPECT_FALSE(fs::exists(tmp / "workers" / "workers"));
  EXPECT_FALSE(fs::exists(tmp / "workers" / "partial.json"));
  const Result both = run({"analyze", run_dir.string(), "--workers", "2", "--shard", "1/2", "--out",
                           (tmp / "both").string()},
                          tmp.path());
  EXPECT_EQ(both.status, 2);
  EXPECT_NE(both.err.find("--workers"), std::string::npos) << both.err;
  // More workers than the range has steps: a worker a step, the range's own analysis bit for
  // bit; a range outside the run is refused once, by the one process, before any worker starts.
  const Result few = run({"analyze", run_dir.string(), "--probes", "3", "--range", "1:3", "--workers", "8", "--out",
                          (tmp / "few").string()},
                         tmp.path());
  ASSERT_EQ(few.status, 0) << few.err;
  EXPECT_NE(few.err.find("analyze in 2 workers"), std::string::npos) << few.err;
  ASSERT_EQ(run({"analyze", run_dir.string(), "--probes", "3", "--range", "1:3", "--out", (tmp / "few1").string()},
                tmp.path()).status, 0);
  for (const char* a : {"D", "F", "K", "R", "Kopt"}) {
    EXPECT_EQ(read_file(tmp / "few1" / "arrays" / (std::string(a) + ".npy")),
              read_file(tmp / "few" / "arrays" / (std::string(a) + ".npy"))) << a;
  }
  const Result outside = run({"analyze", run_dir.string(), "--range", "1:99999", "--workers", "2", "--out",
                              (tmp / "outside").string()},
                             tmp.path());
  EXPECT_EQ(outside.status, 2);
  EXPECT_NE(outside.err.find("outside the run's steps"), std::string::npos) << outside.err;
  EXPECT_EQ(outside.err.find("worker"), std::string::npos) << outside.err;
  EXPECT_FALSE(fs::exists(tmp / "outside"));
  // explain --shard of this momentum run: the part's sum check is left to merge, which needs
  // what the part hands on to the earlier steps (phi_begin.npy).
  const Result ex = run({"explain", run_dir.string(), "--probes", "2", "--grids", "0", "--shard", "2/2", "--out",
                         (tmp / "ex").string()},
                        tmp.path());
  EXPECT_EQ(ex.status, 0) << ex.err;
  EXPECT_NE(ex.out.find("sum check: when the shards are merged"), std::string::npos) << ex.out;
  EXPECT_TRUE(fs::exists(tmp / "ex" / "phi_begin.npy"));
  // merge --walk 1: part 1's share of part 2's steps walked ahead (a job of its own on a cluster)
  // and stored in part 1's folder; merge takes it (its log says so) and its sum check holds.
  ASSERT_EQ(run({"explain", run_dir.string(), "--probes", "2", "--grids", "0", "--shard", "1/2", "--out",
                 (tmp / "ex1").string()},
                tmp.path()).status, 0);
  const std::vector<std::string> parts = {"merge", (tmp / "ex1").string(), (tmp / "ex").string()};
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> a = parts;
    a.insert(a.end(), more.begin(), more.end());
    return run(a, tmp.path());
  };
  const Result walk = with({"--walk", "1"});
  ASSERT_EQ(walk.status, 0) << walk.err;
  EXPECT_NE(walk.out.find("the later parts' share walked"), std::string::npos) << walk.out;
  EXPECT_TRUE(fs::exists(tmp / "ex1" / "later_share.npy"));
  const Result again = with({"--walk", "1", "--json"});  // a requeued job: kept, said as JSON
  ASSERT_EQ(again.status, 0) << again.err;
  const auto said = nlohmann::json::parse(again.out);
  EXPECT_FALSE(said["walked"].get<bool>());
  EXPECT_EQ(said["file"].get<std::string>(), (tmp / "ex1" / "later_share.npy").string());
  EXPECT_EQ(with({"--walk", "2"}).status, 2) << "the last part has no later parts";
  const Result analysis = run({"merge", (tmp / "s1").string(), (tmp / "s2").string(), "--walk", "1"}, tmp.path());
  EXPECT_EQ(analysis.status, 2);
  EXPECT_NE(analysis.err.find("an analysis shard"), std::string::npos) << analysis.err;
  EXPECT_EQ(with({"--walk", "1", "--out", (tmp / "exw").string()}).status, 2);
  EXPECT_FALSE(fs::exists(tmp / "exw"));
  const Result joined = with({"--out", (tmp / "exm").string()});
  ASSERT_EQ(joined.status, 0) << joined.err;
  EXPECT_NE(joined.err.find("part 1: the later parts' share from"), std::string::npos) << joined.err;
  EXPECT_FALSE(fs::exists(tmp / "exm" / "grids")) << "the shards' --grids 0";
  const Result missing = run({"merge", (tmp / "s2").string(), "--out", (tmp / "m2").string()}, tmp.path());
  EXPECT_EQ(missing.status, 2);
  EXPECT_NE(missing.err.find("shard 1 of 2 is missing"), std::string::npos) << missing.err;
  EXPECT_FALSE(fs::exists(tmp / "m2"));
}

// explain --workers: a plain-SGD run (stretches of steps, added up) and a momentum run (attributed
// through the optimizer's recursion: some of the probes each over the whole run, and a stretch of
// the steps analyzed for all of them, joined) in two processes at once equal one process (a_i to
// 1e-12 of the largest; the sum check holds).
TEST(E2eTest, ExplainWorkersAddUpToOneProcess) {
  testing::TempDir tmp;
  const fs::path sgd = tmp / "sgd", mom = tmp / "mom";
  for (const auto& [dir, momentum] : {std::pair{sgd, "0"}, std::pair{mom, "0.9"}}) {
    ASSERT_EQ(run({"train", "--model", "mlp:16:tanh", "--train-limit", "600", "--steps", "30", "--checkpoint-every", "10",
                   "--momentum", momentum, "--out", dir.string()},
                  tmp.path()).status, 0);
  }
  for (const fs::path& r : {sgd, mom}) {
    const std::string name = r.filename().string();
    const Result one = run({"explain", r.string(), "--probes", "3", "--grids", "0", "--out", (tmp / (name + "-1")).string()},
                           tmp.path());
    ASSERT_EQ(one.status, 0) << one.err;
    const Result two = run({"explain", r.string(), "--probes", "3", "--grids", "0", "--workers", "2", "--out",
                            (tmp / (name + "-2")).string()},
                           tmp.path());
    ASSERT_EQ(two.status, 0) << two.err;
    EXPECT_EQ(two.err.find("each worker attributes some of the 3 probes") != std::string::npos, name == "mom") << two.err;
    EXPECT_FALSE(fs::exists(tmp / (name + "-2") / "workers"));
    EXPECT_FALSE(fs::exists(tmp / (name + "-2") / "grids")) << "--grids 0 holds for the joined explanation too";
    const at::Tensor a = load_npy(tmp / (name + "-1") / "attributions.npy");
    const at::Tensor b = load_npy(tmp / (name + "-2") / "attributions.npy");
    ASSERT_EQ(a.sizes(), b.sizes());
    EXPECT_LT((a - b).abs().max().item<double>(), 1e-12 * a.abs().max().item<double>()) << name;
    const auto s = nlohmann::json::parse(read_file(tmp / (name + "-2") / "summary.json"));
    EXPECT_LT(s["max_sum_error"].get<double>(), 1e-10) << name;
    EXPECT_EQ(s["attribution"].get<std::string>().substr(0, 4), name == "mom" ? "aopt" : "a: t") << name;
  }
  // The momentum run's parts by hand (as on two machines), joined by merge in either order; a
  // part alone, --walk over parts, and a part of a plain-SGD run are refused.
  std::vector<std::string> parts;
  for (const char* part : {"1/2", "2/2"}) {
    parts.push_back((tmp / ("part" + std::to_string(parts.size() + 1))).string());
    const Result r = run({"explain", mom.string(), "--probes", "3", "--grids", "0", "--probe-part", part, "--out", parts.back()},
                         tmp.path());
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.out.find("part " + std::string(1, part[0]) + " of 2"), std::string::npos) << r.out;
  }
  const Result merged = run({"merge", parts[1], parts[0], "--out", (tmp / "mom-merged").string()}, tmp.path());
  ASSERT_EQ(merged.status, 0) << merged.err;
  EXPECT_NE(merged.out.find("sum check"), std::string::npos) << merged.out;
  const at::Tensor a = load_npy(tmp / "mom-1" / "attributions.npy");
  const at::Tensor b = load_npy(tmp / "mom-merged" / "attributions.npy");
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_LT((a - b).abs().max().item<double>(), 1e-12 * a.abs().max().item<double>());
  const Result alone = run({"merge", parts[0], "--out", (tmp / "m1").string()}, tmp.path());
  EXPECT_EQ(alone.status, 2);
  EXPECT_NE(alone.err.find("part 1 of 2, but 1 parts were given"), std::string::npos) << alone.err;
  EXPECT_FALSE(fs::exists(tmp / "m1"));
  const Result walk = run({"merge", parts[0], parts[1], "--walk", "1"}, tmp.path());
  EXPECT_EQ(walk.status, 2);
  EXPECT_NE(walk.err.find("the probes' parts have nothing to walk"), std::string::npos) << walk.err;
  const Result plain = run({"explain", sgd.string(), "--probes", "3", "--probe-part", "1/2", "--out", (tmp / "p-sgd").string()},
                           tmp.path());
  EXPECT_EQ(plain.status, 2);
  EXPECT_NE(plain.err.find("attributed step by step"), std::string::npos) << plain.err;
  EXPECT_FALSE(fs::exists(tmp / "p-sgd"));
  // More workers than steps: one worker a step, either way.
  for (const char* momentum : {"0", "0.9"}) {
    const fs::path shortrun = tmp / (std::string("short-") + momentum);
    ASSERT_EQ(run({"train", "--model", "mlp:4:tanh", "--train-limit", "200", "--steps", "3", "--momentum", momentum, "--out",
                   shortrun.string()},
                  tmp.path()).status, 0);
    const Result many = run({"explain", shortrun.string(), "--probes", "5", "--grids", "0", "--workers", "8", "--out",
                             (shortrun.string() + "-explained")},
                            tmp.path());
    EXPECT_EQ(many.status, 0) << many.err;
    EXPECT_NE(many.err.find("explain in 3 workers"), std::string::npos) << many.err;
  }
  // By hand, a part without a probe or a step is refused before any work, and writes nothing.
  for (const char* part : {"1/3", "3/4"}) {
    const Result empty = run({"explain", (tmp / "short-0.9").string(), "--probes", std::string(part) == "1/3" ? "2" : "5",
                              "--grids", "0", "--probe-part", part, "--out", (tmp / "empty-part").string()},
                             tmp.path());
    EXPECT_EQ(empty.status, 2) << empty.err;
    EXPECT_NE(empty.err.find("parts (a part needs a probe and a step)"), std::string::npos) << empty.err;
    EXPECT_FALSE(fs::exists(tmp / "empty-part"));
  }
}

}  // namespace
}  // namespace pathkernel
