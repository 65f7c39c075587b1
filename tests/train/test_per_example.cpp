// Per-example gradient norms from taps against an explicit per-example backward loop (float64).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "fixtures.h"
#include "pathkernel/train/per_example.h"
#include "pathkernel/train/stepper.h"

namespace pathkernel {
namespace {

void check_against_loop(const std::string& spec, LossKind loss) {
  at::manual_seed(3);
  auto m = models::build_model(models::parse_model_spec(spec), {1, 8, 8}, 4);
  m->to(at::kDouble);
  const int64_t n = 6;
  const at::Tensor x = at::rand({n, 1, 8, 8}, at::kDouble);
  const at::Tensor y = at::randint(0, 4, {n}, at::kLong);

  m->set_capture(true);
  batch_loss(m->forward(x), y, loss).backward();
  m->set_capture(false);
  const at::Tensor fast = per_example_grad_sq_norms(m->taps(), static_cast<double>(n));
  const std::vector<double> fast_vec = per_example_grad_sq_norms_vec(m->taps(), static_cast<double>(n));

  for (int64_t i = 0; i < n; ++i) {
    m->zero_grad();
    batch_loss(m->forward(x.slice(0, i, i + 1)), y.slice(0, i, i + 1), loss).backward();
    double sq = 0;
    for (const auto& p : m->parameters()) sq += p.grad().pow(2).sum().item<double>();
    EXPECT_NEAR(fast[i].item<double>(), sq, 1e-10 * sq) << spec << " example " << i;
    EXPECT_NEAR(fast_vec[static_cast<size_t>(i)], sq, 1e-10 * sq) << spec << " example " << i;
  }
}

TEST(PerExampleTest, LinearLayersMatchExplicitLoop) {
  check_against_loop("linear", LossKind::kCrossEntropy);
  check_against_loop("mlp:9,7:tanh", LossKind::kCrossEntropy);
  check_against_loop("mlp:9:softplus", LossKind::kMse);
}

TEST(PerExampleTest, ConvLayersMatchExplicitLoop) {
  check_against_loop("cnn:3,5:relu", LossKind::kCrossEntropy);
  check_against_loop("cnn:2,3:gelu", LossKind::kMse);
}

TEST(PerExampleTest, MseLossIsHalfSquaredError) {
  const at::Tensor f = at::tensor({1.0, 2.0, 0.5, -1.0}, at::kDouble).reshape({2, 2});
  const at::Tensor y = at::tensor({0, 1}, at::kLong);
  // ((0^2 + 2^2) + (0.5^2 + 2^2)) / 2 examples / 2
  EXPECT_DOUBLE_EQ(batch_loss(f, y, LossKind::kMse).item<double>(), (4.0 + 4.25) / 4.0);
}

// Label smoothing e: the loss's gradient in the logits is softmax(f) minus the smoothed target
// (1 - e) onehot(y) + e / C, over the batch's size (the closed form, not autograd's route).
TEST(PerExampleTest, LabelSmoothedCrossEntropyHasTheSmoothedTargetsGradient) {
  const at::Tensor f = at::tensor({1.0, 2.0, 0.5, -1.0, 0.25, 3.0}, at::kDouble).reshape({2, 3}).requires_grad_();
  const at::Tensor y = at::tensor({0, 2}, at::kLong);
  LossKind smoothed = LossKind::kCrossEntropy;
  smoothed.label_smoothing = 0.2;
  const at::Tensor l = batch_loss(f, y, smoothed);
  const at::Tensor g = torch::autograd::grad({l}, {f})[0];
  const at::Tensor target = at::one_hot(y, 3).to(at::kDouble) * 0.8 + 0.2 / 3;
  const at::Tensor want = (at::softmax(f.detach(), 1) - target) / 2;
  EXPECT_LT((g - want).abs().max().item<double>(), 1e-15);
  const at::Tensor logp = at::log_softmax(f.detach(), 1);
  EXPECT_NEAR(l.item<double>(), -(target * logp).sum(1).mean().item<double>(), 1e-15);
  // Without smoothing it is another loss: the check tells them apart.
  EXPECT_GT(std::abs(batch_loss(f, y, LossKind::kCrossEntropy).item<double>() - l.item<double>()), 1e-3);
  EXPECT_EQ(loss_name(smoothed), "ce (label smoothing 0.2)");
  EXPECT_EQ(loss_name(LossKind::kCrossEntropy), "ce");
  EXPECT_EQ(loss_name(LossKind::kMse), "mse");
}

}  // namespace
}  // namespace pathkernel
