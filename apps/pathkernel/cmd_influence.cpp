// pathkernel influence: prepare_influence -> influence, write, print a short summary.
#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/explain/influence.h"
#include "pathkernel/io/fs_util.h"
#include "prepare.h"

namespace pathkernel::app {

int cmd_influence(const Args& args) {
  InfluenceCommand cmd;
  if (!prepare_influence(args, cmd)) return 0;
  const InfluenceConfig& c = cmd.config;
  const InfluenceResult res = influence(c);
  write_influence(res, c);
  if (cmd.json) {
    print_summary_json(c.out);
  } else {
    std::cout << "TracInCP over " << res.checkpoints.size() << " checkpoints: " << res.influence.size(0)
              << " test x " << res.influence.size(1) << " training examples in " << res.seconds << " s\n"
              << "files: " << c.out
              << "/{influence.npy,self_influence.npy,probes.npy,probe_labels.npy,train_labels.npy,checkpoints.csv,"
                 "summary.json}\n";
  }
  return 0;
}

}  // namespace pathkernel::app
