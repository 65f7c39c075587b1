// pathkernel report: plots and report.html of an analysis.
#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "options.h"
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
    ("class-names", "file with one class name per line (default: Fashion-MNIST's names for its data)",
     cxxopts::value(c.class_names_file))
    ("force", "write into a non-empty --out");
  // clang-format on
  opts.parse_positional({"analysis"});
  opts.positional_help("ANALYSIS");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return 0;
  c.force = r.count("force") > 0;
  const ReportFiles files = write_report(c);
  if (json_output(r)) {
    print_json({{"html", files.html}, {"figures", files.pngs}, {"data", files.csvs}, {"gnuplot", files.gnuplot}});
  } else {
    std::cout << "report: " << files.html << " (" << files.pngs.size() << " plots"
              << (files.gnuplot ? "" : "; gnuplot not found, plot data in data/") << ")\n";
  }
  return 0;
}

}  // namespace pathkernel::app
