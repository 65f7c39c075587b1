// --workers N (analyze, explain): the steps as N shards done by N processes of this same
// executable at once (each `COMMAND ... --shard I/N --out OUT/workers/shard-I-of-N`), then joined
// as `pathkernel merge` joins them. No shell: each worker's command line is an argument vector.
#include "workers.h"

#include <fcntl.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "pathkernel/analysis/shards.h"
#include "pathkernel/io/errors.h"

namespace pathkernel::app {
namespace {
namespace fs = std::filesystem;

/// The command's own arguments without --out, --workers, --json and `drop` (each worker gets
/// its own). args[0] is "pathkernel COMMAND".
std::vector<std::string> shared_arguments(const Args& args, std::vector<std::string> drop) {
  drop.insert(drop.end(), {"--out", "--workers"});
  std::vector<std::string> out;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    bool dropped = a == "--json";
    for (const std::string& d : drop) {
      if (a == d) {
        ++i;  // and its value
        dropped = true;
      } else if (a.rfind(d + "=", 0) == 0) {
        dropped = true;
      }
    }
    if (!dropped) out.push_back(a);
  }
  return out;
}

/// This process's environment with OPENBLAS_NUM_THREADS set to `threads` unless the user set it:
/// OpenBLAS otherwise starts a pool of one thread per core in every worker, and the idle pools
/// of N workers slow each other's single-threaded products (measured 15-25% on 2 cores). The
/// analysis pins OpenBLAS to `threads` either way (pin_threads), so the numbers do not change.
std::vector<std::string> worker_environment(int64_t threads) {
  std::vector<std::string> env;
  bool set = false;
  for (char** e = environ; *e; ++e) {
    env.emplace_back(*e);
    set = set || env.back().rfind("OPENBLAS_NUM_THREADS=", 0) == 0;
  }
  if (!set) env.push_back("OPENBLAS_NUM_THREADS=" + std::to_string(threads));
  return env;
}

/// Starts `argv` with stdout to /dev/null (its summary is the joined one's) and stderr shared.
pid_t spawn(std::vector<std::string> argv, std::vector<std::string> env) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  std::vector<char*> cenv;
  for (auto& e : env) cenv.push_back(e.data());
  cenv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, "/proc/self/exe", &fa, nullptr, cargv.data(), cenv.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error(std::string("cannot start a worker: ") + std::strerror(rc));
  return pid;
}

/// Waits for `pid`; its exit status (128 + signal when killed).
int wait_for(pid_t pid) {
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0) {
    if (errno != EINTR) throw std::runtime_error(std::string("waiting for a worker: ") + std::strerror(errno));
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

}  // namespace

int run_workers(const Args& args, const WorkerPlan& plan, MergeConfig& merge) {
  const fs::path out(plan.out), dir = out / "workers";
  const std::vector<std::string> shared = shared_arguments(args, plan.drop);
  const bool fresh = !fs::exists(out) || fs::is_empty(out);
  // --force over an earlier complete output: a failure leaves it as it was found.
  const bool earlier = !fresh && fs::is_regular_file(out / "summary.json") && !fs::exists(out / "partial.json");
  if (plan.resumable) {
    // OUT is an interrupted analysis of this command: a rerun continues each worker's shard.
    const nlohmann::json key = {{"workers", plan.count}, {"arguments", shared}};
    (void)open_progress(out, key, plan.force);
  } else {
    std::error_code ec;
    fs::remove_all(dir, ec);  // what an interrupted run of workers left in an OUT given with --force
    fs::create_directories(dir);
  }
  const std::string of = "-of-" + std::to_string(plan.count);
  merge.out = plan.out;
  merge.force = true;  // OUT is this command's own (checked by its preparation)
  std::vector<std::pair<int64_t, pid_t>> running;
  for (int64_t i = 1; i <= plan.count; ++i) {
    const bool by_parts = !plan.parts.empty();
    const fs::path shard = dir / ((by_parts ? "part-" : "shard-") + std::to_string(i) + of);
    merge.shards.push_back(shard.string());
    if (plan.resumable && fs::is_regular_file(shard / "summary.json")) continue;  // finished before a kill
    std::vector<std::string> argv = {"pathkernel-core", plan.command};
    argv.insert(argv.end(), shared.begin(), shared.end());
    if (by_parts) {
      const auto& own = plan.parts.at(static_cast<size_t>(i - 1));
      argv.insert(argv.end(), own.begin(), own.end());
    } else {
      argv.insert(argv.end(), {"--shard", std::to_string(i) + "/" + std::to_string(plan.count)});
    }
    argv.insert(argv.end(), {"--out", shard.string()});
    argv.insert(argv.end(), plan.extra.begin(), plan.extra.end());
    running.emplace_back(i, spawn(argv, worker_environment(plan.threads)));
  }
  spdlog::info("{} in {} workers ({} started; shards in {})", plan.command, plan.count, running.size(), dir.string());
  int failed = 0;
  for (const auto& [i, pid] : running) {
    const int st = wait_for(pid);
    if (st != 0 && st != 4) {  // 4: its checks failed, its shard is written (the joined checks say so again)
      spdlog::error("worker {} of {} ended with status {}", i, plan.count, st);
      if (failed == 0) failed = st;
    }
  }
  if (failed != 0 && (fresh || earlier)) {
    std::error_code ec;
    if (fresh) fs::remove_all(out, ec);  // nothing of a failed new output is left behind
    if (earlier) {
      fs::remove_all(dir, ec);
      fs::remove(out / "partial.json", ec);
    }
  }
  return failed;
}

}  // namespace pathkernel::app
