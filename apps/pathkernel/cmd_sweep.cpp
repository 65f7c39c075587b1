// pathkernel sweep: train and analyze the same model at several learning rates.
#include <cxxopts.hpp>

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
  std::cout << sweep_table(rows) << "files: " << c.out << "/{sweep.csv,sweep.png,lr_*/run,lr_*/analysis}\n";
  return 0;
}

}  // namespace pathkernel::app
