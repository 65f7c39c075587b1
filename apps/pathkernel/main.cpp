// pathkernel-core: the commands themselves, with LibTorch. Users run `pathkernel` (launcher.cpp),
// which checks the command line before LibTorch is loaded and then starts this program with the
// same arguments; run directly it behaves the same, only slower to refuse.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <new>
#include <string>

#include "commands.h"
#include "invocation.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/threads.h"

namespace {

/// Unless the environment chose the OpenBLAS core (blas_core.h), a small product must come out
/// right to rounding; otherwise this program starts again on the generic core (Prescott: SSE3
/// kernels, slow and sure), and the manifest records that.
void check_blas_core(char** argv) {
  if (!std::getenv("PATHKERNEL_BLAS_SELFCHECK")) return;
  ::unsetenv("PATHKERNEL_BLAS_SELFCHECK");
  const double error = pathkernel::blas_product_error();
  if (error <= 1e-12) return;
  const std::string core = pathkernel::pin_threads(1).blas_core;
  spdlog::warn("OpenBLAS core {} fails the self-check (a product off by {:.1e} of its rounding scale): starting again "
               "on the generic core Prescott", core, error);
  ::setenv("OPENBLAS_CORETYPE", "Prescott", 1);
  ::setenv("PATHKERNEL_BLAS_CORE", "keep", 1);
  ::execv("/proc/self/exe", argv);
  spdlog::error("cannot start {} again: {}", argv[0], std::strerror(errno));
  std::exit(1);
}

/// The sizes a command was given (a model, probes, a manifest's outputs) need more memory than
/// this machine has: bad input for this machine, exit 2, with what to change.
int out_of_memory(const std::string& what) {
  spdlog::error("not enough memory for these inputs and settings ({}); use fewer --probes or --chunk, a smaller "
                "model, or a machine with more memory", what.substr(0, 200));
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  pathkernel::tune_allocator();
  auto logger = spdlog::stderr_color_mt("pathkernel");
  logger->set_pattern("[%H:%M:%S] %^%l%$ %v");
  spdlog::set_default_logger(logger);
  check_blas_core(argv);

  const pathkernel::app::Invocation inv = pathkernel::app::read_invocation(argc, argv);
  if (inv.status >= 0) return inv.status;
  const std::map<std::string, int (*)(const pathkernel::app::Args&)> commands = {
      {"train", pathkernel::app::cmd_train},
      {"replay", pathkernel::app::cmd_replay},
      {"analyze", pathkernel::app::cmd_analyze},
      {"explain", pathkernel::app::cmd_explain},
      {"influence", pathkernel::app::cmd_influence},
      {"report", pathkernel::app::cmd_report},
      {"merge", pathkernel::app::cmd_merge},
      {"sweep", pathkernel::app::cmd_sweep}};
  try {
    return commands.at(inv.name)(inv.args);
  } catch (const pathkernel::InputError& e) {
    spdlog::error("{}", e.what());
    return 2;
  } catch (const pathkernel::DivergenceError& e) {
    spdlog::error("{}", e.what());
    return 3;
  } catch (const pathkernel::CheckFailedError& e) {
    spdlog::error("check failed: {}", e.what());
    return 4;
  } catch (const pathkernel::ReplayMismatchError& e) {
    spdlog::error("replay mismatch: {}", e.what());
    return 5;
  } catch (const nlohmann::json::exception& e) {
    // Every JSON the tool reads comes from a file: a field of the wrong type is bad input.
    spdlog::error("malformed JSON field in an input file: {}", e.what());
    return 2;
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    if (what.find("can't allocate memory") != std::string::npos) return out_of_memory(what);
    spdlog::error("internal error (LibTorch): {}", what);
    return 1;
  } catch (const std::bad_alloc& e) {
    return out_of_memory(e.what());
  } catch (const std::exception& e) {
    spdlog::error("internal error: {}", e.what());
    return 1;
  }
}
