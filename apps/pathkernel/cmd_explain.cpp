// pathkernel explain: prepare_explain -> explain, write, print the sum check.
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/analysis/shards.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/fs_util.h"
#include "prepare.h"
#include "workers.h"

namespace pathkernel::app {

int cmd_explain(const Args& args) {
  ExplainCommand cmd;
  if (!prepare_explain(args, cmd)) return 0;
  ExplainConfig c = cmd.config;
  ExplainResult res;
  if (c.workers > 1) {
    WorkerPlan plan;
    plan.command = "explain";
    plan.count = c.workers;
    plan.threads = c.threads;
    plan.out = c.out;
    plan.force = c.force;
    MergeConfig merge;
    if (const int st = run_workers(args, plan, merge); st != 0) return st;
    auto joined = merge_explanations(merge);
    // The shards are in memory now; OUT is again what the user gave (new, or an earlier
    // explanation to replace with --force).
    std::error_code ec;
    std::filesystem::remove_all(std::filesystem::path(c.out) / "workers", ec);
    if (std::filesystem::is_empty(c.out, ec)) std::filesystem::remove(c.out, ec);
    res = std::move(joined.first);
    c = joined.second;
    c.workers = cmd.config.workers;
  } else {
    res = explain(c);
  }
  write_explanation(res, c);
  if (cmd.json) {
    print_summary_json(c.out);
  } else {
    // What was written: no picture is promised for inputs that are not images, or without gnuplot.
    const std::filesystem::path out(c.out);
    std::cout << explain_table(res, c) << "files: " << c.out << "/{attributions.csv,attributions.npy,top.csv"
              << (std::filesystem::is_directory(out / "grids") ? ",grids/" : "") << ",summary.json"
              << (c.self_influence ? ",self_influence.csv" : "")
              << (std::filesystem::exists(out / "self_influence.png") ? ",self_influence.png" : "") << "}\n";
  }
  // With --project the sum check measures the projection (reported, not gated); a NaN fails.
  // A shard through the optimizer is checked when the shards are merged.
  if (res.sum_check_in_merge) return 0;
  if (c.project > 0 ? !std::isfinite(res.sum_error) : !(res.sum_error <= c.tolerance)) {
    spdlog::error("the sum check fails: error {:.3e} exceeds {:.0e}", res.sum_error, c.tolerance);
    return 4;
  }
  return 0;
}

}  // namespace pathkernel::app
