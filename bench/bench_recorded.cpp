// What reading a run recorded in Python costs the analyzer (issue 9), measured in one process:
// `analyze` per step of a recorded nn.Sequential MLP (recognized: the zoo's factorized kernels)
// against a `pathkernel train` run of the same architecture, optimizer and batch (the reference);
// then the generic route (the run's own TorchScript model, per-row gradients by autograd) on
// three recorded models: that MLP, a small CNN (also on its factorized route) and a custom
// residual + LayerNorm module. The analyses alternate; each figure is the median over repeats.
// The recordings are made by examples/record_mlp.py and examples/record_custom.py (python3 with
// torch).
//
// usage: bench_recorded [--data DIR] [--steps N] [--probes P] [--repeats R]
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/train/trainer.h"

extern char** environ;

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace pathkernel;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

/// Runs argv (no shell) and throws unless it exits 0.
void run(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) != 0) {
    throw std::runtime_error("cannot start " + args[0]);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) throw std::runtime_error(args[1] + " failed");
}

}  // namespace

int main(int argc, char** argv) {
  std::string data = "/usr/share/datasets/fashion-mnist";
  int64_t steps = 40, probes = 16, repeats = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--data") data = argv[i + 1];
    if (std::string(argv[i]) == "--steps") steps = std::stoll(argv[i + 1]);
    if (std::string(argv[i]) == "--probes") probes = std::stoll(argv[i + 1]);
    if (std::string(argv[i]) == "--repeats") repeats = std::stoll(argv[i + 1]);
  }
  tune_allocator();
  spdlog::set_level(spdlog::level::warn);
  const ThreadInfo threads = pin_threads(1);
  const fs::path tmp = fs::temp_directory_path() / ("pathkernel-bench-recorded-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  const std::string src = PATHKERNEL_SOURCE_DIR, n = std::to_string(steps);
  // The reference: pathkernel train's run of the recorded MLP's architecture, optimizer and batch.
  TrainConfig tc;
  tc.data_dir = data;
  tc.train_limit = 2000;
  tc.steps = steps;
  tc.model = "mlp:64:tanh";
  tc.batch = 32;
  tc.optimizer = "adam";
  tc.lr = 3e-3;
  tc.out = (tmp / "native").string();
  train(tc, "bench_recorded");
  run({"/usr/bin/python3", src + "/examples/record_mlp.py", (tmp / "mlp").string(), "--steps", n, "--data", data});
  for (const char* model : {"cnn", "resnorm"}) {
    run({"/usr/bin/python3", src + "/examples/record_custom.py", (tmp / model).string(), "--model", model, "--steps", n,
         "--data", data});
  }

  // name -> (run, kernel route)
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      {"native mlp:64:tanh (train run)", "native", "auto"},
      {"recorded MLP, recognized", "mlp", "auto"},
      {"recorded MLP, torchscript", "mlp", "torchscript"},
      {"recorded CNN, recognized", "cnn", "auto"},
      {"recorded CNN, torchscript", "cnn", "torchscript"},
      {"recorded residual+LayerNorm", "resnorm", "auto"}};
  std::map<std::string, std::vector<double>> per_step;
  std::vector<double> recognized_ratio, mlp_generic_ratio, cnn_generic_ratio;
  for (int64_t r = 0; r < repeats; ++r) {
    std::map<std::string, double> t;
    for (const auto& [name, dir, route] : cases) {
      AnalyzeConfig a;
      a.run = (tmp / dir).string();
      a.out = (tmp / ("a-" + std::to_string(r) + "-" + dir + "-" + route)).string();
      a.probes = probes;
      a.kernel_route = route;
      const auto t0 = Clock::now();
      analyze(a);
      t[name] = std::chrono::duration<double>(Clock::now() - t0).count() / static_cast<double>(steps);
      per_step[name].push_back(t[name]);
    }
    recognized_ratio.push_back(t["recorded MLP, recognized"] / t["native mlp:64:tanh (train run)"]);
    mlp_generic_ratio.push_back(t["recorded MLP, torchscript"] / t["recorded MLP, recognized"]);
    cnn_generic_ratio.push_back(t["recorded CNN, torchscript"] / t["recorded CNN, recognized"]);
  }
  fs::remove_all(tmp);
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);

  std::printf("bench_recorded: %lld steps of batch 32 on 2000 Fashion-MNIST images, %lld probes x 10 logits, "
              "%lld repeats, %d thread(s), %s\n",
              static_cast<long long>(steps), static_cast<long long>(probes), static_cast<long long>(repeats),
              threads.torch_threads, threads.blas.c_str());
  for (const auto& [name, dir, route] : cases) {
    std::printf("  %-32s %8.1f ms/step (median)\n", name.c_str(), median(per_step[name]) * 1e3);
  }
  std::printf("  recorded MLP (recognized) / native run      x%.2f (median of per-repeat ratios; target <= 1.5)\n",
              median(recognized_ratio));
  std::printf("  MLP: torchscript route / factorized route   x%.2f\n", median(mlp_generic_ratio));
  std::printf("  CNN: torchscript route / factorized route   x%.2f\n", median(cnn_generic_ratio));
  std::printf("  peak resident memory of the process: %.0f MB\n", static_cast<double>(ru.ru_maxrss) / 1024.0);
  return 0;
}
