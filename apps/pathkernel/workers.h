#pragma once
// --workers N: N shards of a command's steps (analyze, explain) by N processes at once (workers.cpp).
#include <string>
#include <vector>

#include "commands.h"
#include "pathkernel/analysis/shards.h"

namespace pathkernel::app {

/// What to start: `command` (analyze or explain) with the user's own arguments (less --out,
/// --workers, --json and `drop`) and `--shard I/N --out OUT/workers/shard-I-of-N` (or its
/// `parts` entry) plus `extra`.
struct WorkerPlan {
  std::string command;
  int64_t count = 2;
  int threads = 1;                 ///< each worker's --threads (OPENBLAS_NUM_THREADS in its environment)
  std::string out;
  bool force = false;              ///< the user's --force
  bool resumable = false;          ///< analyze: OUT is a partial analysis of this command, shards continue
  std::vector<std::string> extra;  ///< more arguments for every worker
  /// Non-empty: worker I gets parts[I-1] instead of `--shard I/N` (and OUT/workers/part-I-of-N).
  std::vector<std::vector<std::string>> parts;
  std::vector<std::string> drop;   ///< options (with their values) of the user's not handed on
};

/// Starts the workers and waits for them. Returns 0 with `merge` set to join them into
/// plan.out, or the status of the first worker that failed (a new OUT is removed).
int run_workers(const Args& args, const WorkerPlan& plan, MergeConfig& merge);

}  // namespace pathkernel::app
