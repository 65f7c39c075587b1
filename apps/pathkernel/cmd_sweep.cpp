// pathkernel sweep: prepare_sweep -> train and analyze the same model at several learning rates.
#include <cmath>
#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/report/sweep.h"
#include "prepare.h"

namespace pathkernel::app {

int cmd_sweep(const Args& args) {
  SweepCommand cmd;
  if (!prepare_sweep(args, cmd)) return 0;
  const SweepConfig& c = cmd.config;
  const auto rows = sweep(c);
  if (cmd.json) {
    nlohmann::json doc = nlohmann::json::array();
    for (const auto& row : rows) {
      doc.push_back({{"lr", row.lr}, {"status", row.status}, {"steps", row.steps},
                     {"test_accuracy", std::isnan(row.test_accuracy) ? nlohmann::json() : nlohmann::json(row.test_accuracy)},
                     {"median_r", row.median_r}, {"tc_share_steps", row.tc_share_steps}, {"tc_share_R", row.tc_share_r},
                     {"sum_R_over_change", row.sum_r_over_change}});
    }
    print_json({{"out", c.out}, {"rates", doc}});
  } else {
    std::cout << sweep_table(rows) << "files: " << c.out << "/{sweep.csv,sweep.png,lr_*/run,lr_*/analysis}\n";
  }
  return 0;
}

}  // namespace pathkernel::app
