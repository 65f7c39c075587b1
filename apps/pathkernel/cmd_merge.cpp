// pathkernel merge: prepare_merge -> merge_shards, write, print Eq. 9 as analyze does.
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/analysis/shards.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/fs_util.h"
#include "prepare.h"

namespace pathkernel::app {

namespace {

int merge_explanation_shards(const MergeCommand& cmd) {
  const auto [res, config] = merge_explanations(cmd.config);
  write_explanation(res, config);
  if (cmd.json) {
    print_summary_json(config.out);
  } else {
    std::cout << explain_table(res, config) << "files: " << config.out << "/{attributions.csv,attributions.npy,top.csv,"
              << "grids/,summary.json}\n";
  }
  if (!(res.sum_error <= config.tolerance)) {  // NaN fails too
    spdlog::error("the sum check fails: error {:.3e} exceeds {:.0e}", res.sum_error, config.tolerance);
    return 4;
  }
  return 0;
}

}  // namespace

int cmd_merge(const Args& args) {
  MergeCommand cmd;
  if (!prepare_merge(args, cmd)) return 0;
  if (cmd.config.walk > 0) {
    const LaterShare s = walk_later_share(cmd.config);
    if (s.nothing) {
      std::cout << "part " << cmd.config.walk << ": explained without the optimizer's memory, the parts add up "
                << "alone; nothing to walk\n";
      return 0;
    }
    std::cout << "part " << cmd.config.walk << " (steps " << s.first_step << " .. " << s.last_step << "): the later "
              << "parts' share " << (s.walked ? "walked, " : "stored before from the same Phi_end, kept: ")
              << s.file.string() << "\n";
    return 0;
  }
  if (read_json(std::filesystem::path(cmd.config.shards.front()) / "summary.json").value("format", "") ==
      kExplainFormat) {
    return merge_explanation_shards(cmd);
  }
  const auto [res, config] = merge_shards(cmd.config);
  write_analysis(res, config);
  if (cmd.json) {
    print_summary_json(config.out);
  } else {
    std::cout << eq9_table(res, config) << "files: " << config.out << "/{steps.csv,probes.csv,summary.json,arrays/"
              << (config.sharpness_every > 0 ? ",sharpness.csv" : "") << "}\n";
  }
  const std::vector<std::string> failed = failed_checks(res, config);
  for (const auto& f : failed) spdlog::error("check failed: {}", f);
  return failed.empty() ? 0 : 4;
}

}  // namespace pathkernel::app
