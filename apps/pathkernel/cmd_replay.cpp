// pathkernel replay: rebuild the weights at a step, or verify every checkpoint.
#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <iostream>

#include "commands.h"
#include "pathkernel/errors.h"
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
    ("force", "overwrite --out if it exists")
    ("log-level", "trace | debug | info | warn | error", cxxopts::value<std::string>()->default_value("info"))
    ("h,help", "show this help");
  // clang-format on
  opts.parse_positional({"run"});
  opts.positional_help("RUN");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  cxxopts::ParseResult r;
  try {
    r = opts.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const cxxopts::exceptions::exception& e) {
    throw InputError(std::string("pathkernel replay: ") + e.what() + " (see --help)");
  }
  if (r.count("help")) {
    std::cout << opts.help() << "\n";
    return 0;
  }
  spdlog::set_level(spdlog::level::from_str(r["log-level"].as<std::string>()));
  if (!r.count("run")) throw InputError("pathkernel replay: give the run directory (see --help)");
  if (!r.count("verify") && !r.count("step")) throw InputError("pathkernel replay: give --verify or --step K --out FILE");
  if (r.count("step") && !r.count("out")) throw InputError("pathkernel replay: --step needs --out FILE");

  Replayer replayer(r["run"].as<std::string>());
  if (r.count("step")) {
    const std::filesystem::path out = r["out"].as<std::string>();
    if (std::filesystem::exists(out) && !r.count("force")) {
      throw InputError(out.string() + " exists; pass --force to overwrite it");
    }
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
