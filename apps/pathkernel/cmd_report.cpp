// pathkernel report: prepare_report -> plots and report.html of an analysis.
#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/report/report.h"
#include "prepare.h"

namespace pathkernel::app {

int cmd_report(const Args& args) {
  ReportCommand cmd;
  if (!prepare_report(args, cmd)) return 0;
  const ReportFiles files = write_report(cmd.config);
  if (cmd.json) {
    print_json({{"html", files.html}, {"figures", files.pngs}, {"data", files.csvs}, {"gnuplot", files.gnuplot}});
  } else {
    std::cout << "report: " << files.html << " (" << files.pngs.size() << " plots"
              << (files.gnuplot ? "" : "; gnuplot not found, plot data in data/") << ")\n";
  }
  return 0;
}

}  // namespace pathkernel::app
