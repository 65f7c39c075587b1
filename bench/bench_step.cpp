// Where the training step's time goes: one SGD step of mlp:128:tanh (batch 64) done by a bare
// torch::optim::SGD loop, by pathkernel's Stepper without per-example norms, and with them.
// Rounds interleave the three so that machine drift hits all equally; reports the fastest round.
#include <ATen/ATen.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>

#include "pathkernel/io/threads.h"
#include "pathkernel/train/per_example.h"
#include "pathkernel/train/stepper.h"

using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  pathkernel::tune_allocator();  // for both loops alike
  const int only = argc > 1 ? std::atoi(argv[1]) : -1;  // run one case only (for profilers)
  pathkernel::pin_threads(1);
  at::manual_seed(0);
  const int64_t b = 64, steps = 300, rounds = 15;
  std::vector<at::Tensor> xs, ys;
  for (int i = 0; i < 16; ++i) {
    xs.push_back(at::rand({b, 1, 28, 28}));
    ys.push_back(at::randint(0, 10, {b}, at::kLong));
  }
  torch::nn::Sequential net(torch::nn::Linear(784, 128), torch::nn::Tanh(), torch::nn::Linear(128, 10));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.01));
  auto model = pathkernel::models::build_model(pathkernel::models::parse_model_spec("mlp:128:tanh"), {1, 28, 28}, 10);
  pathkernel::Stepper stepper(*model, pathkernel::OptimizerOptions{}, pathkernel::LossKind::kCrossEntropy);

  const std::vector<std::pair<const char*, std::function<void(int)>>> cases = {
      {"bare torch::optim::SGD step", [&](int i) {
         opt.zero_grad();
         torch::nn::functional::cross_entropy(net->forward(xs[i % 16].reshape({b, 784})), ys[i % 16]).backward();
         opt.step();
       }},
      {"Stepper::step, no per-example", [&](int i) { stepper.step(xs[i % 16], ys[i % 16], 0.01, false); }},
      {"capture only (hooks, no norms)", [&](int i) {
         model->set_capture(true);
         auto l = pathkernel::batch_loss(model->forward(xs[i % 16]), ys[i % 16], pathkernel::LossKind::kCrossEntropy);
         l.backward();
         model->set_capture(false);
       }},
      {"capture + norms", [&](int i) {
         model->set_capture(true);
         auto l = pathkernel::batch_loss(model->forward(xs[i % 16]), ys[i % 16], pathkernel::LossKind::kCrossEntropy);
         l.backward();
         model->set_capture(false);
         pathkernel::per_example_grad_sq_norms(model->taps(), 64.0);
       }},
      {"norms from taps only", [&](int) { pathkernel::per_example_grad_sq_norms(model->taps(), 64.0); }},
      {"Stepper::step, per-example norms", [&](int i) { stepper.step(xs[i % 16], ys[i % 16], 0.01, true); }},
  };
  std::vector<double> best(cases.size(), 1e9);
  for (int r = 0; r < rounds; ++r) {
    for (size_t c = 0; c < cases.size(); ++c) {
      if (only >= 0 && static_cast<int>(c) != only && c != 0) continue;
      const auto t0 = Clock::now();
      for (int i = 0; i < steps; ++i) cases[c].second(i);
      best[c] = std::min(best[c], std::chrono::duration<double>(Clock::now() - t0).count() / steps);
    }
  }
  for (size_t c = 0; c < cases.size(); ++c) {
    if (only >= 0 && static_cast<int>(c) != only && c != 0) continue;
    std::printf("%-40s %7.1f us/step  (x%.2f of bare)\n", cases[c].first, best[c] * 1e6, best[c] / best[0]);
  }
}
