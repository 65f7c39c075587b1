// Training throughput: pathkernel train (hooks, per-example norms, step log, checkpoints) against
// a bare LibTorch SGD loop on the same model, data and batches, measured in the same process.
//
// usage: bench_train [--data DIR] [--steps N] [--repeats R] [--checkpoint-every K]
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "pathkernel/io/idx.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/train/sampler.h"
#include "pathkernel/train/trainer.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

/// The reference: the loop a LibTorch user writes, with nothing logged.
double bare_loop_seconds(const pathkernel::Dataset& train, int64_t steps, int64_t batch, uint64_t seed) {
  torch::manual_seed(seed);
  torch::nn::Sequential net(torch::nn::Linear(784, 128), torch::nn::Tanh(), torch::nn::Linear(128, 10));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  pathkernel::BatchSampler sampler(seed, train.size(), batch);
  const auto t0 = Clock::now();
  for (int64_t k = 0; k < steps; ++k) {
    const at::Tensor idx = at::tensor(sampler.batch_for_step(k), at::kLong);
    const at::Tensor x = pathkernel::to_inputs(train.images.index_select(0, idx), at::kFloat, {}).reshape({-1, 784});
    const at::Tensor y = train.labels.index_select(0, idx);
    opt.zero_grad();
    torch::nn::functional::cross_entropy(net->forward(x), y).backward();
    opt.step();
  }
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int64_t g_checkpoint_every = 100;

double pathkernel_seconds(const std::string& data, int64_t steps, int64_t batch, uint64_t seed, const fs::path& out) {
  pathkernel::TrainConfig c;
  c.data_dir = data;
  c.model = "mlp:128:tanh";
  c.steps = steps;
  c.batch = batch;
  c.lr = 0.1;
  c.seed = seed;
  c.out = out.string();
  c.checkpoint_every = g_checkpoint_every;
  return pathkernel::train(c, "bench_train").seconds;  // the training loop only, not data loading or eval
}

}  // namespace

int main(int argc, char** argv) {
  pathkernel::tune_allocator();  // for both loops alike
  std::string data = "/usr/share/datasets/fashion-mnist";
  int64_t steps = 2000, repeats = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--data") data = argv[i + 1];
    else if (a == "--steps") steps = std::stoll(argv[i + 1]);
    else if (a == "--repeats") repeats = std::stoll(argv[i + 1]);
    else if (a == "--checkpoint-every") g_checkpoint_every = std::stoll(argv[i + 1]);
  }
  spdlog::set_level(spdlog::level::warn);
  const auto threads = pathkernel::pin_threads(1);
  const pathkernel::Dataset train = pathkernel::load_split(data, "train");
  const fs::path tmp = fs::temp_directory_path() / ("pathkernel-bench-" + std::to_string(::getpid()));
  std::vector<double> bare, ours, ratio;
  bare_loop_seconds(train, 200, 64, 0);  // warm-up
  for (int64_t r = 0; r < repeats; ++r) {
    // Alternate the order so that drift on the machine hits both equally.
    const fs::path out = tmp / ("run" + std::to_string(r));
    double b = 0, p = 0;
    if (r % 2 == 0) {
      b = bare_loop_seconds(train, steps, 64, r);
      p = pathkernel_seconds(data, steps, 64, r, out);
    } else {
      p = pathkernel_seconds(data, steps, 64, r, out);
      b = bare_loop_seconds(train, steps, 64, r);
    }
    bare.push_back(steps / b);
    ours.push_back(steps / p);
    ratio.push_back(p / b);
    fs::remove_all(out);
  }
  fs::remove_all(tmp);
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::printf("bench_train: mlp:128:tanh, batch 64, %lld steps x %lld repeats, checkpoint every %lld, Fashion-MNIST, "
              "%d thread(s), %s\n",
              static_cast<long long>(steps), static_cast<long long>(repeats),
              static_cast<long long>(g_checkpoint_every), threads.torch_threads,
              threads.blas.c_str());
  std::printf("  bare LibTorch SGD loop           %8.0f steps/s (median)\n", median(bare));
  std::printf("  pathkernel train (hooks + logs)  %8.0f steps/s (median)\n", median(ours));
  std::printf("  overhead (time ratio - 1)        %+7.1f%% (median of per-repeat ratios; min %+.1f%%, max %+.1f%%)\n",
              100 * (median(ratio) - 1), 100 * (*std::min_element(ratio.begin(), ratio.end()) - 1),
              100 * (*std::max_element(ratio.begin(), ratio.end()) - 1));
  return 0;
}
