// pathkernel replay: rebuild the weights at a step, or verify every checkpoint.
#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/errors.h"
#include "pathkernel/fs_util.h"
#include "pathkernel/replay.h"

namespace pathkernel::app {

int cmd_replay(const Args& args) {
  cxxopts::Options opts("pathkernel replay",
                        "Rebuild the weights of a run at any step from its checkpoints and step log.");
  // clang-format off
  opts.add_options()
    ("run", "run directory", cxxopts::value<std::string>())
    ("verify", "replay between every pair of checkpoints and compare bit for bit")
    ("step", "write the weights at this step", cxxopts::value<int64_t>())
    ("out", "file for --step (a state_dict .pt for torch.load)", cxxopts::value<std::string>())
    ("force", "overwrite --out if it exists");
  // clang-format on
  opts.parse_positional({"run"});
  opts.positional_help("RUN");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return 0;
  if (!r.count("run")) throw InputError("pathkernel replay: give the run directory (see --help)");
  if (!r.count("verify") && !r.count("step")) throw InputError("pathkernel replay: give --verify or --step K --out FILE");
  if (r.count("step") && !r.count("out")) throw InputError("pathkernel replay: --step needs --out FILE");
  if (r.count("out")) check_output_file(r["out"].as<std::string>(), r.count("force") > 0);  // before any work

  Replayer replayer(r["run"].as<std::string>());
  if (r.count("step")) {
    const std::filesystem::path out = r["out"].as<std::string>();
    const int64_t step = r["step"].as<int64_t>();
    save_tensor_dict(out, replayer.weights_at(step));
    std::cout << "weights at step " << step << " written to " << out.string() << "\n";
  }
  if (r.count("verify")) {
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
