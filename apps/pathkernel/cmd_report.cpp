// pathkernel report: plots and report.html of an analysis.
#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "pathkernel/errors.h"
#include "pathkernel/report.h"

namespace pathkernel::app {

int cmd_report(const Args& args) {
  ReportConfig c;
  cxxopts::Options opts("pathkernel report", "Plots (gnuplot PNGs) and report.html of an analysis directory.");
  // clang-format off
  opts.add_options()
    ("analysis", "analysis directory (from pathkernel analyze)", cxxopts::value(c.analysis))
    ("out", "report directory to create", cxxopts::value(c.out))
    ("curves", "probes whose cumulative sums are plotted", cxxopts::value(c.curves)->default_value("4"))
    ("force", "write into a non-empty --out")
    ("log-level", "trace | debug | info | warn | error", cxxopts::value<std::string>()->default_value("info"))
    ("h,help", "show this help");
  // clang-format on
  opts.parse_positional({"analysis"});
  opts.positional_help("ANALYSIS");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  cxxopts::ParseResult r;
  try {
    r = opts.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const cxxopts::exceptions::exception& e) {
    throw InputError(std::string("pathkernel report: ") + e.what() + " (see --help)");
  }
  if (r.count("help")) {
    std::cout << opts.help() << "\n";
    return 0;
  }
  spdlog::set_level(spdlog::level::from_str(r["log-level"].as<std::string>()));
  c.force = r.count("force") > 0;
  const ReportFiles files = write_report(c);
  std::cout << "report: " << files.html << " (" << files.pngs.size() << " plots"
            << (files.gnuplot ? "" : "; gnuplot not found, plot data in data/") << ")\n";
  return 0;
}

}  // namespace pathkernel::app
