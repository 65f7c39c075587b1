// Issue 12's cluster test: a real single-node Slurm (Debian's slurm-wlm and munge, started by
// scripts/slurm/local_cluster.sh in a scratch folder), the job array of scripts/slurm/submit.sh
// analyzing a real run in 3 shards and the dependent merge job: the merged analysis equals the
// single-process one; then explaining it in 3 shards, the walks' array and the merge, equal to
// one process. If Slurm cannot start, the test fails (it does not skip).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "fixtures.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

const std::string kScripts = std::string(PATHKERNEL_SOURCE_DIR) + "/scripts/slurm/";

/// Starts the cluster in `scratch` and stops it when destroyed.
class LocalCluster {
 public:
  explicit LocalCluster(const fs::path& scratch) : scratch_(scratch) {
    status_ = testing::run_program({"/bin/bash", kScripts + "local_cluster.sh", "start", scratch.string()},
                                   scratch.parent_path() / "cluster.log");
  }
  ~LocalCluster() {
    testing::run_program({"/bin/bash", kScripts + "local_cluster.sh", "stop", scratch_.string()},
                         scratch_.parent_path() / "cluster-stop.log");
  }
  bool up() const { return status_ == 0; }

 private:
  fs::path scratch_;
  int status_ = -1;
};

/// Submits `submit.sh ARGS...` (its output into `log`), waits up to 240 s for OUT/summary.json
/// (the merge job's output) and says whether it came; `submitted` gets what submit.sh printed.
bool submit_and_wait(const std::vector<std::string>& args, const fs::path& out, const fs::path& log,
                     std::string& submitted) {
  std::vector<std::string> argv = {"/bin/bash", kScripts + "submit.sh"};
  argv.insert(argv.end(), args.begin(), args.end());
  const int status = testing::run_program(argv, log);
  submitted = read_file(log);
  if (status != 0) return false;
  const auto t0 = std::chrono::steady_clock::now();
  while (!fs::exists(out / "summary.json") && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(240)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  return fs::exists(out / "summary.json");
}

TEST(SlurmTest, AJobArrayOfShardsAndADependentMergeEqualOneProcess) {
  testing::TempDir tmp;
  ::chmod(tmp.path().c_str(), 0755);  // munged runs as the munge user, inside it
  const fs::path log = tmp / "cmd.log", run = tmp / "run", ref = tmp / "ref", out = tmp / "merged";
  const std::string bin = PATHKERNEL_BIN;
  ASSERT_EQ(testing::run_program({bin, "train", "--model", "mlp:16:tanh", "--train-limit", "800", "--steps", "60",
                                  "--checkpoint-every", "15", "--momentum", "0.9", "--out", run.string()},
                                 log),
            0)
      << read_file(log);
  ASSERT_EQ(testing::run_program({bin, "analyze", run.string(), "--probes", "8", "--out", ref.string()}, log), 0)
      << read_file(log);

  LocalCluster cluster(tmp / "cluster");
  ASSERT_TRUE(cluster.up()) << "Slurm did not start:\n" << read_file(tmp / "cluster.log");
  ::setenv("SLURM_CONF", (tmp / "cluster" / "slurm" / "slurm.conf").c_str(), 1);
  ::setenv("PATHKERNEL", bin.c_str(), 1);  // the jobs' executable (exported by sbatch)
  std::string submitted;
  const bool merged = submit_and_wait({run.string(), out.string(), "3", "--probes", "8"}, out, log, submitted);
  EXPECT_NE(submitted.find("array job"), std::string::npos) << submitted;
  testing::run_program({"/usr/bin/squeue"}, tmp / "squeue.log");
  ASSERT_TRUE(merged) << "no merged analysis after 240 s; " << submitted << "\nsqueue:\n" << read_file(tmp / "squeue.log")
                      << "\nmerge log:\n"
                      << (fs::exists(tmp / "merged.shards" / "merge.log") ? read_file(tmp / "merged.shards" / "merge.log") : "");
  for (int i = 1; i <= 3; ++i) {
    EXPECT_TRUE(fs::exists(tmp / "merged.shards" / ("shard_" + std::to_string(i)) / "summary.json")) << i;
  }
  for (const auto& e : fs::directory_iterator(ref / "arrays")) {
    EXPECT_EQ(read_file(e.path()), read_file(out / "arrays" / e.path().filename())) << e.path().filename();
  }
  EXPECT_EQ(read_file(ref / "steps.csv"), read_file(out / "steps.csv"));
  EXPECT_EQ(read_file(ref / "probes.csv"), read_file(out / "probes.csv"));

  // explain in 3 shards of this momentum run: the shards' array, the walks' array (parts 1 and 2
  // walked again for the later parts' share, at once) and the merge, which takes the walks'
  // shares: the one-process explanation's a_i to 1e-12.
  const fs::path ex_ref = tmp / "ex-ref", ex = tmp / "explained";
  ASSERT_EQ(testing::run_program({bin, "explain", run.string(), "--probes", "2", "--grids", "0", "--out", ex_ref.string()},
                                 log),
            0)
      << read_file(log);
  std::string ex_submitted;
  const bool explained = submit_and_wait({"explain", run.string(), ex.string(), "3", "--probes", "2", "--grids", "0"}, ex,
                                         log, ex_submitted);
  EXPECT_NE(ex_submitted.find("walk array job"), std::string::npos) << ex_submitted;
  const fs::path ex_shards = tmp / "explained.shards";
  ASSERT_TRUE(explained) << "no merged explanation after 240 s; " << ex_submitted << "\nmerge log:\n"
                         << (fs::exists(ex_shards / "merge.log") ? read_file(ex_shards / "merge.log") : "");
  const std::string merge_log = read_file(ex_shards / "merge.log");
  for (int k = 1; k <= 2; ++k) {
    const std::string shard = "shard_" + std::to_string(k);
    EXPECT_TRUE(fs::exists(ex_shards / shard / "later_share.json")) << shard;
    EXPECT_NE(merge_log.find("part " + std::to_string(k) + ": the later parts' share from"), std::string::npos) << merge_log;
  }
  const at::Tensor a = load_npy(ex_ref / "attributions.npy"), b = load_npy(ex / "attributions.npy");
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_LT((a - b).abs().max().item<double>(), 1e-12 * a.abs().max().item<double>());
  ::unsetenv("SLURM_CONF");
}

}  // namespace
}  // namespace pathkernel
