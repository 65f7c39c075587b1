// Issue 11's TracInCP task: mlp:128:tanh (784-128-10) trained 1000 steps (batch 64) on 5000
// Fashion-MNIST images with a checkpoint every 100 steps (11 checkpoints); the influence matrix of
// 256 test x 5000 training examples over all 11, and the self-influence. `pathkernel influence`
// (factorized kernels) against the explicit route Captum's TracInCP takes by default (one
// backward per example, then the products), timed in this process on one checkpoint and 500
// training examples and scaled to the task (its cost is linear in both), and the peak memory.
//
// usage: bench_influence [--data DIR]
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "pathkernel/analysis/kernels.h"
#include "pathkernel/explain/influence.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/train/trainer.h"
#include "pathkernel/trajectory/trajectory.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace pathkernel;

int main(int argc, char** argv) {
  std::string data = "/usr/share/datasets/fashion-mnist";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--data") data = argv[i + 1];
  }
  tune_allocator();
  spdlog::set_level(spdlog::level::warn);
  const ThreadInfo threads = pin_threads(1);
  const fs::path tmp = fs::temp_directory_path() / ("pathkernel-bench-influence-" + std::to_string(::getpid()));
  TrainConfig tc;
  tc.data_dir = data;
  tc.train_limit = 5000;
  tc.steps = 1000;
  tc.checkpoint_every = 100;
  tc.out = (tmp / "run").string();
  train(tc, "bench_influence");

  InfluenceConfig ic;
  ic.run = tc.out;
  ic.out = (tmp / "influence").string();
  ic.probes = 256;
  const auto t0 = Clock::now();
  const InfluenceResult r = influence(ic);
  const double fast = std::chrono::duration<double>(Clock::now() - t0).count();
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);

  // The explicit route on one checkpoint and 500 training examples.
  const auto traj = open_trajectory(tc.out);
  auto model = traj->make_model();
  model->to(at::kDouble);
  const NamedTensors w = traj->weights_at(500);
  {
    at::NoGradGuard ng;
    size_t j = 0;
    for (const auto& item : model->named_parameters()) item.value().copy_(w[j++].second);
  }
  const at::Tensor pidx = at::tensor(r.probe_indices, at::kLong), tidx = at::arange(500, at::kLong);
  const auto t1 = Clock::now();
  const at::Tensor jp = explicit_loss_jacobian(*model, traj->inputs("test", pidx, at::kDouble), traj->labels("test", pidx),
                                               LossKind::kCrossEntropy);
  const at::Tensor jt = explicit_loss_jacobian(*model, traj->inputs("train", tidx, at::kDouble),
                                               traj->labels("train", tidx), LossKind::kCrossEntropy);
  at::mm(jp, jt.t());
  const double part = std::chrono::duration<double>(Clock::now() - t1).count();
  const double slow = part * static_cast<double>(r.checkpoints.size()) * 5000.0 / 500.0;
  fs::remove_all(tmp);
  const char* core = std::getenv("OPENBLAS_CORETYPE");
  std::printf("bench_influence: mlp:128:tanh, %zu checkpoints, 256 test x 5000 training examples, float64, %d thread(s), "
              "%s, OPENBLAS_CORETYPE=%s\n",
              r.checkpoints.size(), threads.torch_threads, threads.blas.c_str(), core ? core : "(unset)");
  std::printf("  pathkernel influence (factorized)     %8.2f s   peak RSS %.0f MB\n", fast, ru.ru_maxrss / 1024.0);
  std::printf("  explicit per-example gradients        %8.2f s   (%.2f s for 1 checkpoint x 500 examples, scaled)\n",
              slow, part);
  std::printf("  factorized is x%.0f faster\n", slow / fast);
  return 0;
}
