// pathkernel analyze: prepare_analyze -> analyze, write, print Eq. 9.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/trajectory/trajectory.h"
#include "prepare.h"
#include "workers.h"

namespace pathkernel::app {

namespace {

/// --workers, but no more than the range has steps (a worker a step at most). A range outside
/// the run is left to the one process to refuse, once.
int64_t worker_count(const AnalyzeConfig& c) {
  if (c.workers <= 1) return 1;
  const int64_t last = run_facts(c.run).logged_steps;
  const int64_t end = c.step_end < 0 ? last : c.step_end;
  if (c.step_begin < 0 || end > last || end <= c.step_begin) return 1;
  return std::min(c.workers, end - c.step_begin);
}

}  // namespace

int cmd_analyze(const Args& args) {
  AnalyzeCommand cmd;
  if (!prepare_analyze(args, cmd)) return 0;
  AnalyzeConfig c = cmd.config;
  AnalysisResult res;
  if (const int64_t count = worker_count(c); count > 1) {
    WorkerPlan plan;
    plan.command = "analyze";
    plan.count = count;
    plan.threads = c.threads;
    plan.out = c.out;
    plan.force = c.force;
    plan.resumable = true;
    plan.extra = {"--shard-even"};  // one machine: balanced shards beat starting at checkpoints
    MergeConfig merge;
    if (const int st = run_workers(args, plan, merge); st != 0) return st;
    auto joined = merge_shards(merge);
    res = std::move(joined.first);
    c = joined.second;
    c.workers = cmd.config.workers;
  } else {
    res = analyze(c);
  }
  write_analysis(res, c);
  if (cmd.json) {
    print_summary_json(c.out);
  } else {
    std::cout << eq9_table(res, c) << "files: " << c.out << "/{steps.csv,probes.csv,summary.json,arrays/"
              << (c.sharpness_every > 0 ? ",sharpness.csv" : "") << "}\n";
  }
  const std::vector<std::string> failed = failed_checks(res, c);
  for (const auto& f : failed) spdlog::error("check failed: {}", f);
  return failed.empty() ? 0 : 4;
}

}  // namespace pathkernel::app
