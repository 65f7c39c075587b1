// pathkernel analyze: options -> AnalyzeConfig -> analyze, write, print Eq. 9.
#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/analyzer.h"
#include "pathkernel/errors.h"
#include "pathkernel/fs_util.h"

namespace pathkernel::app {

int cmd_analyze(const Args& args) {
  AnalyzeConfig c;
  std::string steps, old_steps;
  cxxopts::Options opts("pathkernel analyze",
                        "Split every step of a run into kernel term K, update term U and Taylor residual R.");
  add_analysis_options(opts, c);
  opts.add_options()("run", "run directory", cxxopts::value(c.run))(
      "out", "analysis directory to create", cxxopts::value(c.out))(
      "range", "A:B, the steps k with A <= k < B (default: all)", cxxopts::value(steps))(
      "steps", "old name of --range (train's --steps is a count; this one was a range)", cxxopts::value(old_steps))(
      "force", "write into a non-empty --out");
  opts.parse_positional({"run"});
  opts.positional_help("RUN");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return 0;
  c.force = r.count("force") > 0;
  if (!old_steps.empty()) {
    if (!steps.empty()) throw InputError("give --range only (--steps is its old name)");
    spdlog::warn("analyze --steps is now --range (the old name works for one more release)");
    steps = old_steps;
  }
  if (!steps.empty()) {
    const size_t colon = steps.find(':');
    try {
      if (colon == std::string::npos) throw std::invalid_argument("");
      c.step_begin = colon == 0 ? 0 : std::stoll(steps.substr(0, colon));
      c.step_end = colon + 1 == steps.size() ? -1 : std::stoll(steps.substr(colon + 1));
    } catch (const std::exception&) {
      throw InputError("--range must be A:B (either side may be empty), got '" + steps + "'");
    }
  }
  check_output_dir(c.out, c.force, "summary.json", kAnalysisFormat);  // before any work
  const AnalysisResult res = analyze(c);
  write_analysis(res, c);
  if (json_output(r)) {
    nlohmann::json doc = read_json(std::filesystem::path(c.out) / "summary.json");
    doc["out"] = c.out;
    print_json(doc);
  } else {
    std::cout << eq9_table(res, c) << "files: " << c.out << "/{steps.csv,probes.csv,summary.json,arrays/}\n";
  }
  const std::vector<std::string> failed = failed_checks(res, c);
  for (const auto& f : failed) spdlog::error("check failed: {}", f);
  if (!failed.empty()) return 4;
  return 0;
}

}  // namespace pathkernel::app
