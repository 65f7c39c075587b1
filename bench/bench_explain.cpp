// explain --probes 256 over a 200-step run on 5000 Fashion-MNIST examples: the factorized route
// (taps, Gram of probe rows against the batch's loss rows) against the explicit
// per-example-gradient route (one backward pass per probe row and per batch example), in the
// same process. The explicit route is timed on the first steps only (it is ~minutes per step)
// and compared per step.
//
// usage: bench_explain [--data DIR] [--explicit-steps N]
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/train/trainer.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace pathkernel;

int main(int argc, char** argv) {
  std::string data = "/usr/share/datasets/fashion-mnist";
  int64_t explicit_steps = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--data") data = argv[i + 1];
    if (std::string(argv[i]) == "--explicit-steps") explicit_steps = std::stoll(argv[i + 1]);
  }
  tune_allocator();
  spdlog::set_level(spdlog::level::warn);
  const ThreadInfo threads = pin_threads(1);
  const fs::path tmp = fs::temp_directory_path() / ("pathkernel-bench-explain-" + std::to_string(::getpid()));
  TrainConfig tc;
  tc.data_dir = data;
  tc.train_limit = 5000;
  tc.steps = 200;
  tc.out = (tmp / "run").string();
  train(tc, "bench_explain");

  ExplainConfig e;
  e.run = tc.out;
  e.out = (tmp / "explain").string();
  e.probes = 256;
  auto t0 = Clock::now();
  const ExplainResult res = explain(e);
  const double fast = std::chrono::duration<double>(Clock::now() - t0).count();

  // The same per-step work by explicit per-example gradients: probe rows (each probe's
  // predicted logit) and batch examples each by their own backward pass.
  AnalyzeConfig a;
  a.run = tc.out;
  a.out = (tmp / "unused").string();
  a.probes = 256;
  a.outputs = "pred";
  a.kernel_route = "explicit";
  a.step_end = explicit_steps;
  t0 = Clock::now();
  analyze(a);
  const double slow = std::chrono::duration<double>(Clock::now() - t0).count();
  fs::remove_all(tmp);

  const double fast_step = fast / 200.0, slow_step = slow / static_cast<double>(explicit_steps);
  std::printf("bench_explain: mlp:128:tanh, 200 steps of batch 64 on 5000 Fashion-MNIST images, 256 probes, "
              "%d thread(s), %s\n", threads.torch_threads, threads.blas.c_str());
  std::printf("  explain, factorized route: %.1f s for the run, %.1f ms/step (sum check %.1e)\n", fast,
              fast_step * 1e3, res.sum_error);
  std::printf("  explicit per-example gradients: %.1f s for %lld steps, %.0f ms/step\n", slow,
              static_cast<long long>(explicit_steps), slow_step * 1e3);
  std::printf("  factorized is x%.0f faster per step\n", slow_step / fast_step);
  return 0;
}
