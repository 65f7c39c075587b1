// pathkernel: the command users run. It parses the command line and checks everything that needs
// no LibTorch (flags, settings, the output folder, that the inputs exist: prepare.h), then
// replaces itself with pathkernel-core, which loads LibTorch and does the work. LibTorch's own
// start-up takes most of a second; a refusal here takes milliseconds and writes nothing.
// Linked without LibTorch: a check that needed it would not link.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "pathkernel/errors.h"
#include "pathkernel/version.h"
#include "prepare.h"
#include "usage.h"

namespace {
namespace fs = std::filesystem;

/// pathkernel-core beside this executable (the build tree), else where `cmake --install` puts
/// it relative to bin/ (PATHKERNEL_CORE_FROM_BIN, e.g. ../libexec/pathkernel/pathkernel-core).
fs::path core_path() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error(std::string("cannot find this executable (/proc/self/exe): ") + ec.message());
  for (const fs::path& p : {self.parent_path() / "pathkernel-core", self.parent_path() / PATHKERNEL_CORE_FROM_BIN}) {
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  throw std::runtime_error("pathkernel-core not found beside " + self.string() + " nor in " +
                           (self.parent_path() / PATHKERNEL_CORE_FROM_BIN).lexically_normal().string() +
                           ": reinstall pathkernel (cmake --install)");
}

/// Checks the command line; returns an exit status, or -1 when the command should run.
int check(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cout << pathkernel::app::kUsage;
    return argc < 2 ? 2 : 0;
  }
  if (std::string(argv[1]) == "--version") {
    std::cout << "pathkernel " << pathkernel::kVersion << " (" << pathkernel::kGitRevision << ")\n";
    return 0;
  }
  std::string name = argv[1];
  std::vector<std::string> rest(argv + 2, argv + argc);
  if (name == "help") {  // pathkernel help CMD == pathkernel CMD --help
    if (argc < 3) {
      std::cout << pathkernel::app::kUsage;
      return 0;
    }
    name = argv[2];
    rest = {"--help"};
  }
  static const std::vector<std::string> commands = {"train", "replay", "analyze", "explain", "report", "sweep"};
  if (std::find(commands.begin(), commands.end(), name) == commands.end()) {
    std::cerr << "pathkernel: unknown command '" << name << "'\n\n" << pathkernel::app::kUsage;
    return 2;
  }
  pathkernel::app::Args args = {"pathkernel " + name};
  args.insert(args.end(), rest.begin(), rest.end());
  try {
    return pathkernel::app::prepare(name, args) ? -1 : 0;
  } catch (const pathkernel::InputError& e) {
    spdlog::error("{}", e.what());
    return 2;
  } catch (const nlohmann::json::exception& e) {  // an earlier output's summary.json, say
    spdlog::error("malformed JSON field in an input file: {}", e.what());
    return 2;
  } catch (const std::exception& e) {
    spdlog::error("internal error: {}", e.what());
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  auto logger = spdlog::stderr_color_mt("pathkernel");
  logger->set_pattern("[%H:%M:%S] %^%l%$ %v");
  spdlog::set_default_logger(logger);
  const int status = check(argc, argv);
  if (status >= 0) return status;
  try {
    const std::string core = core_path().string();
    std::vector<char*> core_argv(argv, argv + argc + 1);  // the trailing nullptr included
    core_argv[0] = const_cast<char*>(core.c_str());
    // LibTorch's OpenMP threads spin while they wait, on the cores OpenBLAS's own threads need:
    // with --threads 2 on 2 cores an analysis ran at 29 steps/s spinning and 111 passive (82 with
    // 1 thread). libgomp reads this when it loads, so it is set here; a value the environment
    // gives is kept.
    ::setenv("OMP_WAIT_POLICY", "PASSIVE", /*overwrite=*/0);
    std::cout.flush();
    ::execv(core.c_str(), core_argv.data());
    throw std::runtime_error("cannot start " + core + ": " + std::strerror(errno));
  } catch (const std::exception& e) {
    spdlog::error("internal error: {}", e.what());
    return 1;
  }
}
