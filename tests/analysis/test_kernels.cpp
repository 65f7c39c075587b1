// The factorized kernels against explicit per-row Jacobians, and S against finite differences and
// closed forms (float64).
#include <ATen/ATen.h>

#include "fixtures.h"
#include "unit_support.h"
#include "pathkernel/analysis/kernels.h"

namespace pathkernel {
namespace {

using testing::small_model;

ParamMap random_direction(models::Model& m, double scale) {
  ParamMap v;
  for (const auto& item : m.named_parameters()) v[item.key()] = at::randn_like(item.value()).detach() * scale;
  return v;
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(1e-300, b.abs().max().item<double>());
}

TEST(KernelsTest, FactorizedGramAndDirectionalEqualExplicitJacobians) {
  for (const char* spec : {"linear", "quadratic:5", "mlp:7,6:tanh", "mlp:6:relu", "cnn:3,4:gelu"}) {
    auto m = small_model(spec);
    ASSERT_TRUE(factorizable(*m)) << spec;
    at::manual_seed(1);
    const at::Tensor xp = at::rand({4, 1, 8, 8}, at::kDouble);
    const at::Tensor xb = at::rand({5, 1, 8, 8}, at::kDouble);
    const at::Tensor yb = at::randint(0, 3, {5}, at::kLong);
    const std::vector<int64_t> outputs = {0, 2};
    for (LossKind loss : {LossKind::kCrossEntropy, LossKind::kMse}) {
      at::Tensor logits;
      const RowSignals sp = probe_signals(*m, xp, outputs, &logits);
      const RowSignals sb = loss_signals(*m, xb, yb, loss);
      const at::Tensor jp = explicit_probe_jacobian(*m, xp, outputs);
      const at::Tensor jb = explicit_loss_jacobian(*m, xb, yb, loss);
      EXPECT_LT(rel_err(factorized_gram(sp, sb), at::mm(jp, jb.t())), 1e-10) << spec;
      EXPECT_LT(rel_err(factorized_gram(sp, sp), at::mm(jp, jp.t())), 1e-10) << spec;
      const ParamMap v = random_direction(*m, 1.0);
      EXPECT_LT(rel_err(factorized_directional(sp, v), at::mv(jp, flatten_params(*m, v))), 1e-10) << spec;
      EXPECT_TRUE(at::allclose(logits, m->forward(xp).detach())) << spec;
    }
  }
}

// Probe rows are formed once per probe (one forward, one backward per output, input-side
// products once per probe): every product over them equals the explicit per-row Jacobians' to
// rounding, with a different output per probe too (--outputs true/pred).
TEST(KernelsTest, ProbeRowsOncePerProbeEqualExplicitJacobiansEverywhere) {
  for (const char* spec : {"mlp:7,6:tanh", "mlp:6:relu", "cnn:3,4:gelu"}) {
    auto m = small_model(spec);
    at::manual_seed(5);
    const at::Tensor xp = at::rand({4, 1, 8, 8}, at::kDouble);
    const at::Tensor xb = at::rand({5, 1, 8, 8}, at::kDouble);
    const at::Tensor yb = at::randint(0, 3, {5}, at::kLong);
    const at::Tensor cols = at::tensor({2, 0, 1, 1, 0, 2, 2, 2}, at::kLong).reshape({4, 2});
    const RowGradients sp = probe_rows(*m, xp, cols, /*explicit_route=*/false);
    const RowGradients sb = loss_rows(*m, xb, yb, LossKind::kCrossEntropy, /*explicit_route=*/false);
    ASSERT_EQ(sp.signals.repeat, 2);
    ASSERT_EQ(sp.signals.taps[0].input.size(0), 4);  // the inputs once per probe
    const at::Tensor jp = explicit_probe_jacobian(*m, xp, cols);
    const at::Tensor jb = explicit_loss_jacobian(*m, xb, yb, LossKind::kCrossEntropy);
    EXPECT_LT(rel_err(row_gram(sp, sb), at::mm(jp, jb.t())), 1e-13) << spec;
    EXPECT_LT(rel_err(row_gram(sp, sp), at::mm(jp, jp.t())), 1e-13) << spec;
    const ParamMap v = random_direction(*m, 1.0);
    EXPECT_LT(rel_err(row_directional(sp, v), at::mv(jp, flatten_params(*m, v))), 1e-13) << spec;
    EXPECT_LT(rel_err(row_jacobian(*m, sp), jp), 1e-13) << spec;
    const at::Tensor dirs = at::randn({3, jp.size(1)}, at::kDouble);
    EXPECT_LT(rel_err(directions_dot_rows(*m, sp, dirs), at::mm(dirs, jp.t())), 1e-13) << spec;
    const at::Tensor w = at::rand({jp.size(1)}, at::kDouble);
    EXPECT_LT(rel_err(rows_weighted_sq(*m, sp, w), at::mv(jp.pow(2), w)), 1e-13) << spec;
  }
}

// Forward-mode AD's J_p v (the analyzer's K and F on unchecked steps) against the explicit
// Jacobians, for several directions at once and a per-probe output table; a model's parameters
// and capture state are left as they were.
TEST(KernelsTest, ProbeJvpsEqualExplicitJacobiansTimesDirections) {
  for (const char* spec : {"linear", "mlp:7,6:tanh", "mlp:6:relu", "cnn:3,4:gelu", "cnn:3,4:relu"}) {
    auto m = small_model(spec);
    at::manual_seed(6);
    const at::Tensor xp = at::rand({4, 1, 8, 8}, at::kDouble);
    const at::Tensor cols = at::tensor({2, 0, 1, 1, 0, 2, 2, 2}, at::kLong).reshape({4, 2});
    const ParamMap v1 = random_direction(*m, 1.0), v2 = random_direction(*m, 1e-3);
    const at::Tensor jp = explicit_probe_jacobian(*m, xp, cols);
    m->set_capture(true);
    at::Tensor logits;
    const std::vector<at::Tensor> j = probe_jvps(*m, xp, cols, {&v1, &v2}, &logits);
    ASSERT_EQ(j.size(), 2u);
    EXPECT_LT(rel_err(j[0], at::mv(jp, flatten_params(*m, v1))), 1e-13) << spec;
    EXPECT_LT(rel_err(j[1], at::mv(jp, flatten_params(*m, v2))), 1e-13) << spec;
    EXPECT_TRUE(m->capture()) << spec;
    m->set_capture(false);
    at::NoGradGuard ng;
    EXPECT_TRUE(at::equal(logits, m->forward(xp))) << spec;
    // No tangent is left on the parameters: a plain forward carries none.
    for (const auto& item : m->named_parameters()) EXPECT_FALSE(item.value()._fw_grad(0).defined()) << spec;
  }
}

TEST(KernelsTest, SecondOrderMatchesFiniteDifferencesOnTanh) {
  auto m = small_model("mlp:6,5:tanh");
  at::manual_seed(2);
  const at::Tensor x = at::rand({3, 1, 8, 8}, at::kDouble);
  const std::vector<int64_t> outputs = {0, 1, 2};
  const ParamMap dw = random_direction(*m, 0.1);
  const at::Tensor s = second_order(*m, x, outputs, dw);
  // Central second difference: f(w + h dw) + f(w - h dw) - 2 f(w) = h^2 dw^T H dw + O(h^4).
  auto f_at = [&](double h) {
    at::NoGradGuard ng;
    std::vector<at::Tensor> saved;
    for (const auto& item : m->named_parameters()) {
      saved.push_back(item.value().detach().clone());
      item.value().add_(dw.at(item.key()) * h);
    }
    const at::Tensor out = m->forward(x).reshape({-1});
    size_t i = 0;
    for (const auto& item : m->named_parameters()) item.value().copy_(saved[i++]);
    return out;
  };
  const double h = 1e-3;
  const at::Tensor fd = (f_at(h) + f_at(-h) - 2 * f_at(0)) / (2 * h * h);
  EXPECT_LT(rel_err(s, fd), 1e-5);
}

TEST(KernelsTest, SecondOrderIsExactOnQuadraticAndZeroOnLinear) {
  at::manual_seed(3);
  const at::Tensor x = at::rand({3, 1, 8, 8}, at::kDouble);
  const std::vector<int64_t> outputs = {0, 1, 2};
  for (const char* spec : {"quadratic:4", "linear"}) {
    auto m = small_model(spec);
    const ParamMap dw = random_direction(*m, 0.5);
    const at::Tensor s = second_order(*m, x, outputs, dw);
    const RowSignals sp = probe_signals(*m, x, outputs);
    const at::Tensor first = factorized_directional(sp, dw);
    at::Tensor f0, f1;
    {
      at::NoGradGuard ng;
      f0 = m->forward(x).reshape({-1});
      for (const auto& item : m->named_parameters()) item.value().add_(dw.at(item.key()));
      f1 = m->forward(x).reshape({-1});
    }
    // For a polynomial of degree <= 2 in w, the Taylor series ends at S: D = F + S exactly.
    EXPECT_LT((f1 - f0 - first - s).abs().max().item<double>(), 1e-12 * f1.abs().max().item<double>()) << spec;
    if (std::string(spec) == "linear") {
      EXPECT_EQ(s.abs().max().item<double>(), 0.0);
    }
  }
}

}  // namespace
}  // namespace pathkernel
