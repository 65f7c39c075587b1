// SgdStepper against LibTorch's own torch::optim::SGD (the PyTorch definition), and its records.
#include <ATen/ATen.h>
#include <torch/optim/sgd.h>

#include <cmath>

#include "fixtures.h"
#include "pathkernel/sgd.h"

namespace pathkernel {
namespace {

struct Pair {
  std::shared_ptr<models::Model> ours, ref;
};

Pair twin_models(const std::string& spec) {
  at::manual_seed(5);
  auto a = models::build_model(models::parse_model_spec(spec), {1, 6, 6}, 3);
  at::manual_seed(5);
  auto b = models::build_model(models::parse_model_spec(spec), {1, 6, 6}, 3);
  a->to(at::kDouble);
  b->to(at::kDouble);
  return {a, b};
}

TEST(SgdTest, MatchesTorchOptimSgdWithMomentumAndWeightDecay) {
  auto [ours, ref] = twin_models("mlp:8:tanh");
  SgdStepper stepper(*ours, SgdOptions{0.9, 1e-2}, LossKind::kCrossEntropy);
  torch::optim::SGD opt(ref->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(1e-2));
  at::manual_seed(9);
  for (int k = 0; k < 6; ++k) {
    const at::Tensor x = at::rand({5, 1, 6, 6}, at::kDouble);
    const at::Tensor y = at::randint(0, 3, {5}, at::kLong);
    const double lr = 0.05;
    const StepRecord r = stepper.step(x, y, lr, /*per_example=*/true);
    ASSERT_TRUE(r.finite);
    opt.zero_grad();
    const at::Tensor loss = batch_loss(ref->forward(x), y, LossKind::kCrossEntropy);
    loss.backward();
    opt.step();
    EXPECT_DOUBLE_EQ(r.loss, loss.item<double>());
  }
  const auto a = ours->parameters(), b = ref->parameters();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::allclose(a[i], b[i], 1e-13, 1e-15));
}

TEST(SgdTest, PlainUpdateIsMinusLrTimesGradientAndNormsAreConsistent) {
  auto [m, unused] = twin_models("cnn:2,3:relu");
  SgdStepper stepper(*m, SgdOptions{}, LossKind::kMse);
  std::vector<at::Tensor> before;
  for (const auto& p : m->parameters()) before.push_back(p.detach().clone());
  at::manual_seed(2);
  const at::Tensor x = at::rand({4, 1, 6, 6}, at::kDouble);
  const at::Tensor y = at::randint(0, 3, {4}, at::kLong);
  const StepRecord r = stepper.step(x, y, 0.3, /*per_example=*/true);
  const at::Tensor g = stepper.flat_gradient().to(at::kDouble);
  std::vector<at::Tensor> dw;
  size_t i = 0;
  for (const auto& p : m->parameters()) dw.push_back((p.detach() - before[i++]).reshape({-1}));
  const at::Tensor update = at::cat(dw);
  EXPECT_TRUE(at::allclose(update, -0.3 * g, 1e-6, 1e-9));  // g was stored as float32
  EXPECT_NEAR(r.update_norm, update.norm().item<double>(), 1e-9 * r.update_norm);
  EXPECT_NEAR(r.grad_norm * 0.3, r.update_norm, 1e-6 * r.update_norm);
  double layers_sq = 0;
  for (const auto& [name, v] : r.layer_grad_norms) layers_sq += v * v;
  EXPECT_NEAR(std::sqrt(layers_sq), r.grad_norm, 1e-12);
  EXPECT_EQ(r.layer_grad_norms.size(), 3u);
  EXPECT_LE(r.pe_grad_min, r.pe_grad_median);
  EXPECT_LE(r.pe_grad_median, r.pe_grad_max);
  // The batch gradient is the mean of the per-example ones, so its norm is at most their max.
  EXPECT_LE(r.grad_norm, r.pe_grad_max + 1e-12);
}

TEST(SgdTest, NonFiniteStepLeavesWeightsAndBuffersUntouched) {
  auto [m, unused] = twin_models("mlp:4:tanh");
  SgdStepper stepper(*m, SgdOptions{0.5, 0}, LossKind::kCrossEntropy);
  const at::Tensor x = at::rand({3, 1, 6, 6}, at::kDouble);
  const at::Tensor y = at::randint(0, 3, {3}, at::kLong);
  ASSERT_TRUE(stepper.step(x, y, 0.1, false).finite);
  const auto buffers = stepper.momentum_buffers();
  std::vector<at::Tensor> before;
  for (const auto& p : m->parameters()) before.push_back(p.detach().clone());
  const StepRecord r = stepper.step(x * NAN, y, 0.1, false);
  EXPECT_FALSE(r.finite);
  EXPECT_EQ(r.nonfinite, "loss");
  const StepRecord big = stepper.step(x, y, INFINITY, false);
  EXPECT_FALSE(big.finite);
  EXPECT_NE(big.nonfinite.find("weights"), std::string::npos);
  size_t i = 0;
  for (const auto& p : m->parameters()) EXPECT_TRUE(at::equal(p, before[i++]));
  const auto after = stepper.momentum_buffers();
  for (size_t j = 0; j < after.size(); ++j) EXPECT_TRUE(at::equal(after[j].second, buffers[j].second));
}

}  // namespace
}  // namespace pathkernel
