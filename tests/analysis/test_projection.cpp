// The random projection of per-row gradients (projection.h) against explicit Jacobians: exact
// when D keeps every side, unbiased over seeds when it does not, reproducible from its seed.
#include <ATen/ATen.h>

#include "fixtures.h"
#include "unit_support.h"
#include "pathkernel/analysis/projection.h"

namespace pathkernel {
namespace {

using testing::small_model;

struct Rows {
  RowGradients probes, batch;
  at::Tensor exact;  ///< explicit J_p J_b^T
};

Rows rows_of(models::Model& m) {
  at::manual_seed(5);
  const at::Tensor xp = at::rand({3, 1, 8, 8}, at::kDouble), xb = at::rand({4, 1, 8, 8}, at::kDouble);
  const at::Tensor yb = at::randint(0, 3, {4}, at::kLong);
  const at::Tensor cols = shared_columns(3, {0, 2});
  Rows r{probe_rows(m, xp, cols, false), loss_rows(m, xb, yb, LossKind::kCrossEntropy, false), {}};
  r.exact = at::mm(explicit_probe_jacobian(m, xp, cols), explicit_loss_jacobian(m, xb, yb, LossKind::kCrossEntropy).t());
  return r;
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

at::Tensor projected_gram(const Projection& p, const Rows& r) {
  return at::mm(project_rows(p, r.probes), project_rows(p, r.batch).t());
}

TEST(ProjectionTest, LargeEnoughDKeepsEverySideAndIsExact) {
  for (const char* spec : {"mlp:7,6:tanh", "cnn:3,4:relu"}) {
    auto m = small_model(spec);
    const Rows r = rows_of(*m);
    const Projection p = make_projection(*m, 100000, 1);
    for (size_t l = 0; l < p.hash_out.size(); ++l) EXPECT_FALSE(p.hash_out[l].defined()) << spec;
    EXPECT_LT(rel(projected_gram(p, r), r.exact), 1e-13) << spec;
  }
}

TEST(ProjectionTest, SmallDIsUnbiasedOverSeedsAndReproducibleFromItsSeed) {
  for (const char* spec : {"mlp:40:tanh", "cnn:6,8:relu"}) {
    auto m = small_model(spec);
    const Rows r = rows_of(*m);
    const Projection p1 = make_projection(*m, 16, 7), again = make_projection(*m, 16, 7), p2 = make_projection(*m, 16, 8);
    EXPECT_EQ(p1.dims, 16 * static_cast<int64_t>(p1.tap_dims.size())) << spec;
    EXPECT_TRUE(at::equal(projected_gram(p1, r), projected_gram(again, r))) << spec;
    const double one = rel(projected_gram(p1, r), r.exact);
    EXPECT_GT(one, 1e-3) << spec;  // really projected: one seed is off
    EXPECT_FALSE(at::equal(projected_gram(p1, r), projected_gram(p2, r))) << spec;
    // The mean over seeds converges to the exact kernel like 1/sqrt(seeds).
    at::Tensor mean = at::zeros_like(r.exact);
    const int seeds = 400;
    for (int s = 0; s < seeds; ++s) mean += projected_gram(make_projection(*m, 16, 100 + s), r) / seeds;
    EXPECT_LT(rel(mean, r.exact), 0.15 * one + 0.02) << spec << " one seed " << one;
  }
}

}  // namespace
}  // namespace pathkernel
