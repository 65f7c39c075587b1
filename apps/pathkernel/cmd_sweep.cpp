// pathkernel sweep: train and analyze the same model at several learning rates.
#include <cxxopts.hpp>

#include <cmath>
#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/errors.h"
#include "pathkernel/sweep.h"

namespace pathkernel::app {

int cmd_sweep(const Args& args) {
  SweepConfig c;
  cxxopts::Options opts("pathkernel sweep",
                        "Train and analyze the same model, data and batches at each learning rate.");
  add_train_options(opts, c.train, /*with_lr=*/false);
  add_analysis_options(opts, c.analysis);
  opts.add_options()("lr", "learning rates, e.g. 1e-4,1e-3,1e-2,1e-1,0.5,1", cxxopts::value(c.lrs))(
      "out", "sweep directory (an interrupted sweep is continued there)", cxxopts::value(c.out));
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return 0;
  read_betas(r, c.train);
  c.command_line = joined_command_line(args);
  const auto rows = sweep(c);
  if (json_output(r)) {
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
