// pathkernel replay: rebuild the weights at a step, or verify every checkpoint.
#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

#include "commands.h"
#include "pathkernel/replay.h"
#include "prepare.h"

namespace pathkernel::app {

int cmd_replay(const Args& args) {
  ReplayCommand cmd;
  if (!prepare_replay(args, cmd)) return 0;
  Replayer replayer(cmd.run);
  if (cmd.step) {
    save_tensor_dict(cmd.out, replayer.weights_at(*cmd.step));
    std::cout << "weights at step " << *cmd.step << " written to " << cmd.out << "\n";
  }
  if (cmd.verify) {
    int64_t last_report = 0;
    replayer.verify([&](int64_t done, int64_t total) {
      if (done - last_report >= 200 || done == total) {
        spdlog::info("replayed {}/{} steps", done, total);
        last_report = done;
      }
    });
    std::cout << "verified: " << replayer.checkpoints().size() << " checkpoints of "
              << replayer.dir().root().string() << " reproduced bit for bit\n";
  }
  return 0;
}

}  // namespace pathkernel::app
