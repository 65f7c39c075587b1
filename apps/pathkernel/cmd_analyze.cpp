// pathkernel analyze: options -> AnalyzeConfig -> analyze, write, print Eq. 9.
#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "pathkernel/analyzer.h"
#include "pathkernel/errors.h"

namespace pathkernel::app {

int cmd_analyze(const Args& args) {
  AnalyzeConfig c;
  std::string steps;
  cxxopts::Options opts("pathkernel analyze",
                        "Split every step of a run into kernel term K, update term U and Taylor residual R.");
  // clang-format off
  opts.add_options()
    ("run", "run directory", cxxopts::value(c.run))
    ("out", "analysis directory to create", cxxopts::value(c.out))
    ("probes", "number of probe images, evenly spaced over the split", cxxopts::value(c.probes)->default_value("64"))
    ("probe-indices", "file of probe indices, one per line (instead of --probes)", cxxopts::value(c.probe_indices_file))
    ("split", "test | train: where the probes come from", cxxopts::value(c.split)->default_value("test"))
    ("outputs", "all (every logit) | true (the label's) | pred (the final prediction's)",
     cxxopts::value(c.outputs)->default_value("all"))
    ("steps", "A:B, the steps k with A <= k < B (default: all)", cxxopts::value(steps))
    ("every", "analyze every S-th step", cxxopts::value(c.every)->default_value("1"))
    ("second-order", "also S = 1/2 dw^T H dw (exact, by double backward)")
    ("kernel-route", "auto | factorized | explicit (per-row Jacobians: the slow reference route)",
     cxxopts::value(c.kernel_route)->default_value("auto"))
    ("exact", "Q: also the exact path kernel by Q-node Gauss-Legendre quadrature", cxxopts::value(c.exact_nodes))
    ("tc-rule", "tau | outlier", cxxopts::value(c.tc_rule)->default_value("tau"))
    ("tau", "tau rule: step in T_c when |R|/|F| > tau", cxxopts::value(c.tau)->default_value("0.1"))
    ("tc-window", "outlier rule: steps of history", cxxopts::value(c.tc_window)->default_value("50"))
    ("tc-kappa", "outlier rule: MADs above the median", cxxopts::value(c.tc_kappa)->default_value("5"))
    ("force", "write into a non-empty --out")
    ("log-level", "trace | debug | info | warn | error", cxxopts::value<std::string>()->default_value("info"))
    ("h,help", "show this help");
  // clang-format on
  opts.parse_positional({"run"});
  opts.positional_help("RUN");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  cxxopts::ParseResult r;
  try {
    r = opts.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const cxxopts::exceptions::exception& e) {
    throw InputError(std::string("pathkernel analyze: ") + e.what() + " (see --help)");
  }
  if (r.count("help")) {
    std::cout << opts.help() << "\n";
    return 0;
  }
  spdlog::set_level(spdlog::level::from_str(r["log-level"].as<std::string>()));
  c.second_order = r.count("second-order") > 0;
  c.force = r.count("force") > 0;
  if (!steps.empty()) {
    const size_t colon = steps.find(':');
    try {
      if (colon == std::string::npos) throw std::invalid_argument("");
      c.step_begin = colon == 0 ? 0 : std::stoll(steps.substr(0, colon));
      c.step_end = colon + 1 == steps.size() ? -1 : std::stoll(steps.substr(colon + 1));
    } catch (const std::exception&) {
      throw InputError("--steps must be A:B (either side may be empty), got '" + steps + "'");
    }
  }
  const AnalysisResult res = analyze(c);
  write_analysis(res, c);
  std::cout << eq9_table(res, c) << "files: " << c.out << "/{steps.csv,probes.csv,summary.json,arrays/}\n";
  if (res.contiguous && res.identity_error > c.identity_tolerance) {
    spdlog::error("the run identity fails: error {:.3e} exceeds {:.0e} of max |f_N - f_0|", res.identity_error,
                  c.identity_tolerance);
    return 4;
  }
  return 0;
}

}  // namespace pathkernel::app
