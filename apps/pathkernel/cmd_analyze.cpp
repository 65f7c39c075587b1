// pathkernel analyze: prepare_analyze -> analyze, write, print Eq. 9.
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/io/fs_util.h"
#include "prepare.h"
#include "workers.h"

namespace pathkernel::app {

int cmd_analyze(const Args& args) {
  AnalyzeCommand cmd;
  if (!prepare_analyze(args, cmd)) return 0;
  AnalyzeConfig c = cmd.config;
  AnalysisResult res;
  if (c.workers > 1) {
    WorkerPlan plan;
    plan.command = "analyze";
    plan.count = c.workers;
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
