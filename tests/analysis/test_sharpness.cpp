// lambda_max by Lanczos on Hessian-vector products against the explicit Hessian's eigenvalues.
#include <ATen/ATen.h>

#include "fixtures.h"
#include "pathkernel/analysis/sharpness.h"

namespace pathkernel {
namespace {

TEST(SharpnessTest, LanczosEqualsTheExplicitHessiansLargestEigenvalue) {
  for (const char* spec : {"mlp:5:tanh", "mlp:4:relu", "cnn:2,2:relu", "linear"}) {
    for (LossKind loss : {LossKind::kCrossEntropy, LossKind::kMse}) {
      at::manual_seed(3);
      auto m = models::build_model(models::parse_model_spec(spec), {1, 4, 4}, 3);
      m->to(at::kDouble);
      const at::Tensor x = at::rand({12, 1, 4, 4}, at::kDouble), y = at::randint(0, 3, {12}, at::kLong);
      const at::Tensor h = explicit_hessian(*m, x, y, loss);
      ASSERT_LT((h - h.t()).abs().max().item<double>(), 1e-12) << spec;
      const double top = at::linalg_eigvalsh(h).max().item<double>();
      const Sharpness s = hessian_top_eigenvalue(*m, x, y, loss, 200, 1e-9, 1, /*chunk=*/5);
      EXPECT_NEAR(s.lambda_max, top, 1e-8 * std::abs(top)) << spec << " iterations " << s.iterations;
      EXPECT_LE(s.residual, 1e-9) << spec;
      // The same with another start vector.
      EXPECT_NEAR(hessian_top_eigenvalue(*m, x, y, loss, 200, 1e-9, 2).lambda_max, top, 1e-8 * std::abs(top)) << spec;
    }
  }
}

}  // namespace
}  // namespace pathkernel
