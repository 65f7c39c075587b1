// pathkernel replay: rebuild the weights at a step, or verify every checkpoint.
#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

#include "commands.h"
#include "pathkernel/trajectory/replay.h"
#include "prepare.h"

namespace pathkernel::app {

int cmd_replay(const Args& args) {
  ReplayCommand cmd;
  if (!prepare_replay(args, cmd)) return 0;
  Replayer replayer(cmd.run);
  if (cmd.step) {
    save_tensor_dict(cmd.out, replayer.state_dict_at(*cmd.step));  // a checkpoint's: buffers too
    std::cout << "weights at step " << *cmd.step << " written to " << cmd.out << "\n";
  }
  if (cmd.verify) {
    int64_t last_report = 0;
    const int64_t compared = replayer.verify([&](int64_t done, int64_t total) {
      if (done - last_report >= 200 || done == total) {
        spdlog::info("replayed {}/{} steps", done, total);
        last_report = done;
      }
    });
    const int64_t stored = static_cast<int64_t>(replayer.checkpoints().size()) - 1;  // after step 0
    std::cout << "verified: " << compared << " of " << stored << " checkpoints after step 0 of "
              << replayer.dir().root().string() << " reproduced bit for bit"
              << (compared < stored ? " (the run is still being trained; its log ends before the others)" : "") << "\n";
  }
  return 0;
}

}  // namespace pathkernel::app
