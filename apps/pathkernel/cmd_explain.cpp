// pathkernel explain: prepare_explain -> explain, write, print the sum check.
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/fs_util.h"
#include "prepare.h"

namespace pathkernel::app {

int cmd_explain(const Args& args) {
  ExplainCommand cmd;
  if (!prepare_explain(args, cmd)) return 0;
  const ExplainConfig& c = cmd.config;
  const ExplainResult res = explain(c);
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
  if (c.project > 0 ? !std::isfinite(res.sum_error) : !(res.sum_error <= c.tolerance)) {
    spdlog::error("the sum check fails: error {:.3e} exceeds {:.0e}", res.sum_error, c.tolerance);
    return 4;
  }
  return 0;
}

}  // namespace pathkernel::app
