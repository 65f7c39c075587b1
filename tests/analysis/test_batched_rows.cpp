// A probe's rows by one backward with the outputs as a batch (batched_rows.cpp) against one
// backward per row (autograd, the reference), on models built from the operators the batching
// rules cover; the rules' refusals, ATen's loop fallback and a wrong rule are each caught by
// choose_rows_mode, which then keeps one backward per row.
#include <ATen/ATen.h>
#include <ATen/BatchedTensorImpl.h>
#include <ATen/VmapMode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <functional>

#include "fixtures.h"
#include "unit_support.h"
#include "pathkernel/analysis/batched_rows.h"
#include "pathkernel/analysis/kernels.h"

namespace pathkernel {
namespace {

using Forward = std::function<at::Tensor(const std::vector<at::Tensor>&, const at::Tensor&)>;

/// A model of the given parameter shapes whose forward is `f(parameters, x)`.
class OpsModel : public models::Model {
 public:
  OpsModel(const std::vector<std::vector<int64_t>>& shapes, Forward f, int64_t outputs = 10)
      : Model(models::ModelSpec{"torchscript", {}, "none"}, outputs), f_(std::move(f)) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      p_.push_back(register_parameter("p" + std::to_string(i), at::randn(shapes[i], at::kDouble) * 0.5));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) override { return f_(p_, x); }

 private:
  Forward f_;
  std::vector<at::Tensor> p_;
};

using testing::max_rel;

/// Conv (stride, padding, dilation, with and without bias), BatchNorm in eval mode, tanh, max
/// pooling, SiLU, a linear head and log-softmax: [1, 1, 8, 8] -> [1, 10].
OpsModel conv_net() {
  const at::Tensor mean = at::randn({4}, at::kDouble), var = at::rand({4}, at::kDouble) + 0.5;
  return OpsModel({{4, 1, 3, 3}, {4}, {4}, {4}, {6, 4, 3, 3}, {6}, {5, 6, 2, 2}, {10, 45}, {10}},
                  [mean, var](const std::vector<at::Tensor>& p, const at::Tensor& x) {
                    at::Tensor h = at::conv2d(x, p[0], p[1], {1, 1}, {1, 1});
                    h = at::batch_norm(h, p[2], p[3], mean, var, /*training=*/false, 0.1, 1e-5, false);
                    h = at::max_pool2d(at::tanh(h), {2, 2});
                    h = at::silu(at::conv2d(h, p[4], p[5], {1, 1}, {2, 2}, {2, 2}));
                    h = at::conv2d(h, p[6], at::Tensor(), at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0});
                    return at::log_softmax(at::linear(h.flatten(1), p[7], p[8]), 1);
                  });
}

/// Self-attention on 4 tokens of 6 features: LayerNorm, softmax, GELU and the other activations
/// with rules here (ELU, leaky ReLU, hardtanh, softplus, hardswish, mish): [1, 4, 6] -> [1, 10].
OpsModel attention_net() {
  return OpsModel({{6}, {6}, {6, 6}, {6, 6}, {6, 6}, {10, 6}, {10}}, [](const std::vector<at::Tensor>& p,
                                                                     const at::Tensor& x) {
    const at::Tensor h = at::layer_norm(x, {6}, p[0], p[1]);
    const at::Tensor q = at::linear(h, p[2]), k = at::linear(h, p[3]), v = at::linear(h, p[4]);
    at::Tensor a = at::matmul(at::softmax(at::matmul(q, k.transpose(1, 2)) / 2.0, -1), v);
    a = at::mish(at::hardswish(at::softplus(at::hardtanh(at::leaky_relu(at::elu(at::gelu(a)), 0.1), -0.8, 0.8))));
    return at::linear(a.mean(1), p[5], p[6]);
  });
}

/// Rows of probe p by a backward per row: the reference.
at::Tensor per_row(models::Model& m, const at::Tensor& x, const at::Tensor& cols) {
  return explicit_probe_jacobian(m, x, cols);
}

at::Tensor batched(models::Model& m, const at::Tensor& x, const at::Tensor& cols, std::vector<std::string>* fb) {
  std::vector<at::Tensor> params;
  for (const auto& p : m.parameters()) params.push_back(p);
  at::Tensor rows = at::empty({cols.size(1), per_row(m, x, cols).size(1)}, at::kDouble);
  batched_output_rows(params, m.forward(x)[0], cols[0], rows, fb);
  return rows;
}

TEST(BatchedRowsTest, EveryRuleGivesTheRowsOfABackwardPerRow) {
  at::manual_seed(0);
  OpsModel cnn = conv_net(), att = attention_net();
  const at::Tensor xc = at::randn({1, 1, 8, 8}, at::kDouble), xa = at::randn({1, 4, 6}, at::kDouble);
  // Every output, and a selection with a repeat, in any order.
  for (const at::Tensor& cols : std::vector<at::Tensor>{at::arange(10, at::kLong).unsqueeze(0),
                                                        at::tensor({7, 2, 7, 0}, at::kLong).unsqueeze(0)}) {
    std::vector<std::string> fallbacks;
    EXPECT_LT(max_rel(batched(cnn, xc, cols, &fallbacks), per_row(cnn, xc, cols)), 1e-12);
    EXPECT_LT(max_rel(batched(att, xa, cols, &fallbacks), per_row(att, xa, cols)), 1e-12);
    EXPECT_TRUE(fallbacks.empty()) << fallbacks.front();  // each operator ran a rule
  }
}

TEST(BatchedRowsTest, AnOperatorWithoutARuleRunsInTheFallbackAndIsNamed) {
  at::manual_seed(1);
  OpsModel gn({{4, 1, 3, 3}, {4}, {4}, {10, 256}}, [](const std::vector<at::Tensor>& p, const at::Tensor& x) {
    const at::Tensor h = at::group_norm(at::conv2d(x, p[0], at::Tensor(), at::IntArrayRef{1, 1}, at::IntArrayRef{1, 1}), 2, p[1], p[2]);
    return at::linear(at::tanh(h).flatten(1), p[3]);
  });
  const at::Tensor x = at::randn({1, 1, 8, 8}, at::kDouble), cols = at::arange(10, at::kLong).unsqueeze(0);
  std::vector<std::string> fallbacks;
  EXPECT_LT(max_rel(batched(gn, x, cols, &fallbacks), per_row(gn, x, cols)), 1e-12);
  ASSERT_EQ(fallbacks.size(), 1u);
  EXPECT_EQ(fallbacks.front(), "aten::native_group_norm_backward");
  std::string why;
  EXPECT_EQ(choose_rows_mode(gn, x, cols, &why), RowsMode::kPerRow);
  EXPECT_NE(why.find("native_group_norm_backward"), std::string::npos) << why;
}

TEST(BatchedRowsTest, ALayoutNoRuleCoversIsRefusedAndKeepsABackwardPerRow) {
  at::manual_seed(2);
  OpsModel grouped({{4, 1, 3, 3}, {10, 256}}, [](const std::vector<at::Tensor>& p, const at::Tensor& x) {
    const at::Tensor h = at::conv2d(x.repeat({1, 2, 1, 1}), p[0], at::Tensor(), at::IntArrayRef{1, 1}, at::IntArrayRef{1, 1},
                                      at::IntArrayRef{1, 1}, /*groups=*/2);
    return at::linear(at::tanh(h).flatten(1), p[1]);
  });
  const at::Tensor x = at::randn({1, 1, 8, 8}, at::kDouble), cols = at::arange(10, at::kLong).unsqueeze(0);
  EXPECT_THROW(batched(grouped, x, cols, nullptr), BatchedRowsUnsupported);
  std::string why;
  EXPECT_EQ(choose_rows_mode(grouped, x, cols, &why), RowsMode::kPerRow);
  EXPECT_NE(why.find("grouped"), std::string::npos) << why;
}

/// A wrong rule for hardsigmoid's backward (LibTorch 1.13 has none): it passes the incoming
/// gradient through, as if the slope were 1 (it is 1/6).
void wrong_hardsigmoid_rule(const c10::OperatorHandle& op, torch::jit::Stack* s) {
  const at::Tensor grad = (*s)[s->size() - op.schema().arguments().size()].toTensor();
  torch::jit::drop(*s, op.schema().arguments().size());
  s->emplace_back(grad);
}
TORCH_LIBRARY_IMPL(aten, Batched, m) {
  m.impl("hardsigmoid_backward", torch::CppFunction::makeFromBoxedFunction<&wrong_hardsigmoid_rule>());
}

TEST(BatchedRowsTest, RowsThatDisagreeWithABackwardPerRowAreNotTaken) {
  at::manual_seed(3);
  OpsModel m({{10, 6}}, [](const std::vector<at::Tensor>& p, const at::Tensor& x) {
    return at::hardsigmoid(at::linear(x, p[0]));
  });
  const at::Tensor x = at::randn({2, 6}, at::kDouble), cols = at::arange(10, at::kLong).unsqueeze(0).expand({2, 10});
  EXPECT_GT(max_rel(batched(m, x.slice(0, 0, 1), cols, nullptr), per_row(m, x.slice(0, 0, 1), cols.slice(0, 0, 1))), 0.1);
  std::string why;
  EXPECT_EQ(choose_rows_mode(m, x, cols, &why), RowsMode::kPerRow);
  EXPECT_NE(why.find("differ"), std::string::npos) << why;
}

TEST(BatchedRowsTest, TheModeIsChosenByRulesAndSizeAndGivesTheSameRows) {
  at::manual_seed(4);
  OpsModel cnn = conv_net();
  const at::Tensor x = at::randn({3, 1, 8, 8}, at::kDouble);
  const at::Tensor cols = at::tensor({0, 9, 4, 4, 3, 1}, at::kLong).view({3, 2});
  std::string why;
  ASSERT_EQ(choose_rows_mode(cnn, x, cols, &why), RowsMode::kBatchedOutputs) << why;
  const at::Tensor got = explicit_probe_jacobian_into(cnn, x, cols, at::empty({6, per_row(cnn, x, cols).size(1)}, at::kDouble),
                                                      RowsMode::kBatchedOutputs);
  EXPECT_LT(max_rel(got, per_row(cnn, x, cols)), 1e-12);
  // Rows beyond kBatchedRowsMaxBytes: a backward per row is faster, whatever the operators.
  OpsModel wide({{10, 110000}}, [](const std::vector<at::Tensor>& p, const at::Tensor& x) {
    return at::linear(at::tanh(x), p[0]);
  });
  EXPECT_EQ(choose_rows_mode(wide, at::randn({1, 110000}, at::kDouble), at::arange(10, at::kLong).unsqueeze(0), &why),
            RowsMode::kPerRow);
  EXPECT_NE(why.find("MiB"), std::string::npos) << why;
}

/// mm and bmm with the batch on the left, the right or both (at any physical position): the rules
/// that fold it into one product give, entry by entry, the product of that entry's matrices.
TEST(BatchedRowsTest, ProductsWithABatchedSideEqualAProductPerBatchEntry) {
  at::manual_seed(5);
  OpsModel att = attention_net();
  batched(att, at::randn({1, 4, 6}, at::kDouble), at::arange(10, at::kLong).unsqueeze(0), nullptr);  // rules in use
  const int64_t nb = 5;
  struct Case {
    std::vector<int64_t> a, b;  // logical shapes
    bool batch_a, batch_b;
  };
  for (const Case& c : std::vector<Case>{{{3, 4}, {4, 2}, true, false},
                                         {{3, 4}, {4, 2}, false, true},
                                         {{3, 4}, {4, 2}, true, true},
                                         {{2, 3, 4}, {2, 4, 6}, true, false},
                                         {{2, 3, 4}, {2, 4, 6}, false, true},
                                         {{2, 3, 4}, {2, 4, 6}, true, true}}) {
    auto make = [&](std::vector<int64_t> shape, bool batch) {
      if (batch) shape.insert(shape.begin() + 1, nb);  // the batch at physical dimension 1
      return at::randn(shape, at::kDouble);
    };
    const at::Tensor a = make(c.a, c.batch_a), b = make(c.b, c.batch_b);
    const int64_t level = at::impl::VmapMode::increment_nesting();
    auto wrap = [&](const at::Tensor& t, bool batch) { return batch ? at::_add_batch_dim(t, 1, level) : t; };
    const at::Tensor la = wrap(a, c.batch_a), lb = wrap(b, c.batch_b);
    const at::Tensor got = at::_remove_batch_dim(c.a.size() == 2 ? at::mm(la, lb) : at::bmm(la, lb), level, nb, 0);
    at::impl::VmapMode::decrement_nesting();
    for (int64_t i = 0; i < nb; ++i) {
      const at::Tensor ai = c.batch_a ? a.select(1, i) : a, bi = c.batch_b ? b.select(1, i) : b;
      const at::Tensor want = c.a.size() == 2 ? at::mm(ai, bi) : at::bmm(ai, bi);
      EXPECT_LT(max_rel(got[i], want), 1e-14) << c.a.size() << "-d, batched " << c.batch_a << c.batch_b << ", entry " << i;
    }
  }
}

}  // namespace
}  // namespace pathkernel
