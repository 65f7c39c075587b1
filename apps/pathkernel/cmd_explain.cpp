// pathkernel explain: prepare_explain -> explain, write, print the sum check.
#include <spdlog/spdlog.h>

#include <algorithm>
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
  const ExplainPlan ep = c.workers > 1 ? plan_explain(c) : ExplainPlan{};
  // Step by step (plain SGD) the workers take stretches of steps; through the optimizer's
  // recursion a stretch would need the later steps' share walked again after them, so each
  // worker attributes some of the probes over the whole run instead (nothing to carry between
  // them), and analyzes a stretch of the steps for all of them (what every probe shares, once).
  const bool by_probes = ep.through_optimizer;
  const int64_t count = by_probes ? std::min({c.workers, static_cast<int64_t>(ep.probe_indices.size()), ep.steps})
                                  : std::min(c.workers, ep.steps);
  if (count > 1) {
    WorkerPlan plan;
    plan.command = "explain";
    plan.count = count;
    plan.threads = c.threads;
    plan.out = c.out;
    plan.force = c.force;
    if (by_probes) {
      for (int64_t i = 1; i <= count; ++i) plan.parts.push_back({"--probe-part", std::to_string(i) + "/" + std::to_string(count)});
      spdlog::info("--workers: attributed through the optimizer, so each worker attributes some of the {} probes over "
                   "the whole run and analyzes a stretch of the steps for all of them", ep.probe_indices.size());
    } else {
      plan.extra = {"--shard-even"};  // one machine: balanced stretches beat starting at checkpoints
    }
    MergeConfig merge;
    if (const int st = run_workers(args, plan, merge); st != 0) return st;
    auto joined = by_probes ? join_probe_parts(merge) : merge_explanations(merge);
    if (by_probes && joined.first.probe_indices != ep.probe_indices) {
      throw std::logic_error("explain --workers: the joined probes are not the planned ones");
    }
    // The parts are in memory now; OUT is again what the user gave (new, or an earlier
    // explanation to replace with --force).
    std::error_code ec;
    std::filesystem::remove_all(std::filesystem::path(c.out) / "workers", ec);
    if (std::filesystem::is_empty(c.out, ec)) std::filesystem::remove(c.out, ec);
    res = std::move(joined.first);
    c.probe_indices = res.probe_indices;  // the user's own settings otherwise (--grids, --tolerance, ...)
  } else {
    res = explain(c);
  }
  write_explanation(res, c);
  if (res.part.count > 0) {  // a worker's part: explain --workers joins the parts and reports
    std::cout << "part " << res.part.index << " of " << res.part.count << ": " << c.out << "\n";
    return 0;
  }
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
