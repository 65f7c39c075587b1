// pathkernel merge: prepare_merge -> merge_shards, write, print Eq. 9 as analyze does.
#include <spdlog/spdlog.h>

#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "options.h"
#include "pathkernel/analysis/shards.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "prepare.h"

namespace pathkernel::app {

namespace {

/// Explanation shards (explain --shard I/N), or the parts of explain --probe-part I/N.
int merge_explanation_shards(const MergeCommand& cmd, bool probe_parts) {
  const auto [res, config] = probe_parts ? join_probe_parts(cmd.config) : merge_explanations(cmd.config);
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

/// merge --walk K: walk_later_share, its outcome on stdout (one JSON object with --json).
int walk_part(const MergeCommand& cmd, bool explanation, bool probe_parts) {
  const int64_t k = cmd.config.walk;
  if (probe_parts) {
    throw InputError(cmd.config.shards.front() + ": a part of the probes (explain --probe-part); --walk is for the "
                     "shards of the steps of an explanation (explain --shard): the probes' parts have nothing to walk");
  }
  if (!explanation) {
    throw InputError(cmd.config.shards.front() + ": an analysis shard; --walk is for the shards of an explanation "
                     "through an optimizer with memory (an analysis' shards have no walks)");
  }
  const LaterShare s = walk_later_share(cmd.config);
  if (cmd.json) {
    std::cout << nlohmann::json{{"part", k}, {"nothing_to_walk", s.nothing}, {"walked", s.walked},
                                {"file", s.nothing ? nlohmann::json(nullptr) : nlohmann::json(s.file.string())},
                                {"first_step", s.first_step}, {"last_step", s.last_step}, {"seconds", s.seconds}}
                     .dump(2)
              << "\n";
  } else if (s.nothing) {
    std::cout << "part " << k << ": explained without the optimizer's memory, the parts add up alone; nothing to walk\n";
  } else {
    std::cout << "part " << k << " (steps " << s.first_step << " .. " << s.last_step << "): the later parts' share "
              << (s.walked ? "walked, " : "stored before from the same Phi_end, kept: ") << s.file.string() << "\n";
  }
  return 0;
}

}  // namespace

int cmd_merge(const Args& args) {
  MergeCommand cmd;
  if (!prepare_merge(args, cmd)) return 0;
  const std::string format = read_json(std::filesystem::path(cmd.config.shards.front()) / "summary.json").value("format", "");
  const bool explanation = format == kExplainFormat, probe_parts = format == kExplainPartFormat;
  if (cmd.config.walk > 0) return walk_part(cmd, explanation, probe_parts);
  if (explanation || probe_parts) return merge_explanation_shards(cmd, probe_parts);
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
