// The analyzer's kernel work per step (MLP 784-128-10, batch 64, 256 probes x 10 outputs, float64)
// by the factorized route against the explicit-Jacobian route and against its floor, one
// forward plus backward pass over the probe rows, all in one process; then the peak memory of a
// whole `analyze` on that setting.
//
// usage: bench_analyze [--data DIR] [--steps N]
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>

#include "pathkernel/analyzer.h"
#include "pathkernel/idx.h"
#include "pathkernel/kernels.h"
#include "pathkernel/threads.h"
#include "pathkernel/trainer.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace pathkernel;

namespace {

double best_of(int repeats, const std::function<void()>& fn) {
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string data = "/usr/share/datasets/fashion-mnist";
  int64_t steps = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--data") data = argv[i + 1];
    if (std::string(argv[i]) == "--steps") steps = std::stoll(argv[i + 1]);
  }
  tune_allocator();
  spdlog::set_level(spdlog::level::warn);
  const ThreadInfo threads = pin_threads(1);
  const Dataset train_set = load_split(data, "train", 5000), test_set = load_split(data, "test");
  at::manual_seed(0);
  auto model = models::build_model(models::parse_model_spec("mlp:128:tanh"), {1, 28, 28}, 10);
  model->to(at::kDouble);
  const at::Tensor pidx = at::arange(0, 10000, 10000 / 256, at::kLong).slice(0, 0, 256);
  const at::Tensor xp = to_inputs(test_set.images.index_select(0, pidx), at::kDouble, {});
  const at::Tensor bidx = at::arange(64, at::kLong);
  const at::Tensor xb = to_inputs(train_set.images.index_select(0, bidx), at::kDouble, {});
  const at::Tensor yb = train_set.labels.index_select(0, bidx);
  std::vector<int64_t> outputs(10);
  for (int i = 0; i < 10; ++i) outputs[i] = i;
  ParamMap dw;
  for (const auto& item : model->named_parameters()) dw[item.key()] = at::randn_like(item.value()).detach() * 1e-3;

  // A whole analysis of a short real run at this setting, for time per step and peak memory.
  const fs::path tmp = fs::temp_directory_path() / ("pathkernel-bench-analyze-" + std::to_string(::getpid()));
  TrainConfig tc;
  tc.data_dir = data;
  tc.train_limit = 5000;
  tc.steps = steps;
  tc.out = (tmp / "run").string();
  train(tc, "bench_analyze");
  AnalyzeConfig ac;
  ac.run = tc.out;
  ac.out = (tmp / "analysis").string();
  ac.probes = 256;
  const auto t0 = Clock::now();
  const AnalysisResult res = analyze(ac);
  const double per_step = std::chrono::duration<double>(Clock::now() - t0).count() / static_cast<double>(steps);
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);  // before the explicit route's own 2 GB Jacobian
  fs::remove_all(tmp);

  at::Tensor k_fast, k_slow;
  const double floor = best_of(5, [&] {
    model->set_capture(false);
    const at::Tensor xr = xp.repeat_interleave(10, 0);
    const at::Tensor out = model->forward(xr);
    (out * at::randn_like(out)).sum().backward();
  });
  const double fast = best_of(5, [&] {
    const RowSignals sp = probe_signals(*model, xp, outputs);
    const RowSignals sb = loss_signals(*model, xb, yb, LossKind::kCrossEntropy);
    k_fast = factorized_gram(sp, sb);
    factorized_directional(sp, dw);
  });
  const double slow = best_of(1, [&] {
    const at::Tensor jp = explicit_probe_jacobian(*model, xp, outputs);
    const at::Tensor jb = explicit_loss_jacobian(*model, xb, yb, LossKind::kCrossEntropy);
    k_slow = at::mm(jp, jb.t());
    at::mv(jp, flatten_params(*model, dw));
  });
  const double agree = (k_fast - k_slow).abs().max().item<double>() / k_slow.abs().max().item<double>();

  std::printf("bench_analyze: mlp:128:tanh, batch 64, 256 probes x 10 outputs, float64, %d thread(s), %s\n",
              threads.torch_threads, threads.blas.c_str());
  std::printf("  floor: forward+backward over the 2560 probe rows   %8.2f ms\n", floor * 1e3);
  std::printf("  factorized kernels (K per example, F)             %8.2f ms   x%.2f of the floor\n", fast * 1e3,
              fast / floor);
  std::printf("  explicit per-row Jacobians (same K, F)            %8.2f ms   factorized is x%.0f faster\n",
              slow * 1e3, slow / fast);
  std::printf("  the two routes' K agree to                        %8.1e (relative)\n", agree);
  std::printf("  whole analyze, %lld steps: %.1f ms/step (identity error %.1e); peak RSS %.0f MB\n",
              static_cast<long long>(steps), per_step * 1e3, res.identity_error, ru.ru_maxrss / 1024.0);
  return 0;
}
