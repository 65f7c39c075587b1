#pragma once
// analyze --workers N: N shards of the range analyzed by N processes at once (workers.cpp).
#include "commands.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/shards.h"

namespace pathkernel::app {

/// Starts the N workers of `c` (c.workers shards of the range, in OUT/workers/shard-I-of-N; a
/// shard an interrupted run finished is kept) and waits for them. Returns 0 with `merge` set to
/// join them into c.out, or the status of the first worker that failed (a new OUT is removed).
int run_workers(const Args& args, const AnalyzeConfig& c, MergeConfig& merge);

}  // namespace pathkernel::app
