// pathkernel: the command users run. It parses the command line and checks everything that needs
// no LibTorch (flags, settings, the output folder, that the inputs exist: prepare.h), then
// replaces itself with pathkernel-core, which loads LibTorch and does the work. LibTorch's own
// start-up takes most of a second; a refusal here takes milliseconds and writes nothing.
// Linked without LibTorch: a check that needed it would not link.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <dlfcn.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "pathkernel/io/blas_core.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "prepare.h"
#include "invocation.h"

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

/// The kernel set OpenBLAS picks by itself here ("" when libblas.so.3 is not OpenBLAS), asked
/// of a copy loaded with one thread (the launcher computes nothing with it).
std::string detected_blas_core() {
  const bool had_threads = std::getenv("OPENBLAS_NUM_THREADS") != nullptr;
  if (!had_threads) ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
  std::string core;
  if (void* lib = ::dlopen("libblas.so.3", RTLD_NOW | RTLD_LOCAL)) {
    using CoreFn = char* (*)();
    if (auto f = reinterpret_cast<CoreFn>(::dlsym(lib, "openblas_get_corename"))) core = f();
    ::dlclose(lib);
  }
  if (!had_threads) ::unsetenv("OPENBLAS_NUM_THREADS");
  return core;
}

/// The OpenBLAS core a run was trained with, from its manifest ("" when it records none).
std::string run_blas_core(const std::string& run) {
  if (run.empty()) return "";
  try {
    const nlohmann::json m = pathkernel::read_json(fs::path(run) / "manifest.json");
    return m.at("threads").value("blas_core", "");
  } catch (const std::exception&) {
    return "";  // a recorded run, or one made before cores were recorded; the command checks the rest
  }
}

/// Sets OPENBLAS_CORETYPE for pathkernel-core (blas_core.h has the rules). Unless the
/// environment set the core (or PATHKERNEL_BLAS_CORE=keep), PATHKERNEL_BLAS_SELFCHECK asks the
/// core to check its products, whether chosen here or detected by OpenBLAS.
void choose_blas_core(const std::string& run) {
  const char* env = std::getenv("OPENBLAS_CORETYPE");
  const char* mode = std::getenv("PATHKERNEL_BLAS_CORE");
  const bool keep = mode && std::string(mode) == "keep";
  const std::string run_core = run_blas_core(run);
  if (env && !run_core.empty() && run_core != env) {
    spdlog::warn("{} was trained with OpenBLAS core {}; OPENBLAS_CORETYPE={} is kept as the environment sets it, so "
                 "replayed steps may differ from the checkpoints by rounding",
                 run, run_core, env);
  }
  const std::string detected = env || keep ? "" : detected_blas_core();
  const pathkernel::BlasCoreChoice c =
      pathkernel::choose_blas_core(env, keep, run_core, detected, pathkernel::read_cpu_flags());
  if (!detected.empty()) ::setenv("PATHKERNEL_BLAS_SELFCHECK", "1", 1);
  if (c.core.empty()) return;
  spdlog::debug("OpenBLAS core {} ({}; OpenBLAS detected {})", c.core, c.reason == "run" ? "the run's" : "the CPU's",
                detected);
  ::setenv("OPENBLAS_CORETYPE", c.core.c_str(), 1);
}

/// Checks the command line; returns an exit status, or -1 when the command should run.
int check(int argc, char** argv, std::string& run) {
  const pathkernel::app::Invocation inv = pathkernel::app::read_invocation(argc, argv);
  if (inv.status >= 0) return inv.status;
  try {
    return pathkernel::app::prepare(inv.name, inv.args, &run) ? -1 : 0;
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
  std::string run;
  const int status = check(argc, argv, run);
  if (status >= 0) return status;
  try {
    choose_blas_core(run);
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
