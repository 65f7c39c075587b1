// Probe rows by functorch's transforms from C++ (functorch_rows.cpp) against one backward per row
// (autograd, the reference): on models that run on parameters they are given (a test model, and
// the recorded TorchScript fixtures), per-probe output tables with repeats, blocks of every size,
// a parameter shared by two names. A model functorch refuses (an LSTM), one whose swapped forward
// is wrong, and one that cannot swap are each caught by choose_rows_mode, which then takes another
// mode; the model's own parameters are back in place after every call, also after a refusal.
#include <ATen/ATen.h>
#include <ATen/functorch/DynamicLayer.h>

#include <filesystem>
#include <functional>

#include "fixtures.h"
#include "pathkernel/analysis/functorch_rows.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/models/model.h"
#include "pathkernel/trajectory/scripted_model.h"

namespace pathkernel {
namespace {

using Forward = std::function<at::Tensor(const std::vector<at::Tensor>&, const at::Tensor&)>;

/// A model whose forward is `f(parameters, x)`, and which runs on given parameters as readily
/// (forward_with_parameters), or, with `own` set, reads parameter `own` from itself whatever it is
/// given: a wrong swap, whose gradient for that parameter functorch never sees.
class SwapModel : public models::Model {
 public:
  SwapModel(std::vector<at::Tensor> params, Forward f, int64_t own = -1)
      : Model(models::ModelSpec{"torchscript", {}, "none"}, 10), p_(std::move(params)), f_(std::move(f)), own_(own) {
    for (size_t i = 0; i < p_.size(); ++i) register_parameter("p" + std::to_string(i), p_[i]);
  }
  torch::Tensor forward(const torch::Tensor& x) override { return f_(p_, x); }
  bool swaps_parameters() const override { return true; }
  torch::Tensor forward_with_parameters(const std::vector<torch::Tensor>& params, const torch::Tensor& x) override {
    std::vector<at::Tensor> use = params;
    if (own_ >= 0) use[own_] = p_[own_];
    return f_(use, x);
  }

 private:
  std::vector<at::Tensor> p_;
  Forward f_;
  int64_t own_;
};

std::vector<at::Tensor> random_params(const std::vector<std::vector<int64_t>>& shapes) {
  std::vector<at::Tensor> p;
  for (const auto& s : shapes) p.push_back(at::randn(s, at::kDouble) * 0.5);
  return p;
}

/// Conv, eval-mode BatchNorm, tanh, max pooling, a dilated conv with SiLU, a linear head and
/// log-softmax: [N, 1, 8, 8] -> [N, 10].
at::Tensor conv_forward(const std::vector<at::Tensor>& p, const at::Tensor& x) {
  const at::Tensor mean = at::full({4}, 0.1, at::kDouble), var = at::full({4}, 0.7, at::kDouble);
  at::Tensor h = at::conv2d(x, p[0], p[1], {1, 1}, {1, 1});
  h = at::batch_norm(h, p[2], p[3], mean, var, /*training=*/false, 0.1, 1e-5, false);
  h = at::max_pool2d(at::tanh(h), {2, 2});
  h = at::silu(at::conv2d(h, p[4], p[5], {1, 1}, {2, 2}, {2, 2}));
  return at::log_softmax(at::linear(h.flatten(1), p[6], p[7]), 1);
}
const std::vector<std::vector<int64_t>> kConvShapes = {{4, 1, 3, 3}, {4}, {4}, {4}, {6, 4, 3, 3}, {6}, {10, 96}, {10}};

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-300);
}

at::Tensor functorch_rows(models::Model& m, const at::Tensor& x, const at::Tensor& cols, int64_t block) {
  at::Tensor rows = at::full({x.size(0) * cols.size(1), explicit_probe_jacobian(m, x.slice(0, 0, 1), cols.slice(0, 0, 1)).size(1)},
                             std::nan(""), at::kDouble);
  functorch_rows_into(m, x, cols, rows, block);
  return rows;
}

TEST(FunctorchRowsTest, RowsEqualABackwardPerRowForEveryBlockSize) {
  at::manual_seed(0);
  SwapModel m(random_params(kConvShapes), conv_forward);
  const at::Tensor x = at::randn({5, 1, 8, 8}, at::kDouble);
  // A table per probe: different outputs, a repeat, any order.
  const at::Tensor cols = at::tensor({0, 9, 4, 4, 4, 3, 1, 1, 7, 2, 5, 0, 8, 6, 3}, at::kLong).view({5, 3});
  const at::Tensor want = explicit_probe_jacobian(m, x, cols);
  for (int64_t block : {1, 2, 5, 9}) {
    EXPECT_LT(max_rel(functorch_rows(m, x, cols, block), want), 1e-12) << "block " << block;
  }
  std::string why;
  EXPECT_EQ(choose_rows_mode(m, x, cols, &why), RowsMode::kFunctorch) << why;
  EXPECT_NE(why.find("functorch"), std::string::npos) << why;
  const at::Tensor got = explicit_probe_jacobian_into(m, x, cols, at::empty_like(want), RowsMode::kFunctorch);
  EXPECT_LT(max_rel(got, want), 1e-12);
}

TEST(FunctorchRowsTest, ASharedParameterGetsTheGradientOfBothUsesInBothPlaces) {
  at::manual_seed(1);
  const at::Tensor w = at::randn({6, 6}, at::kDouble) * 0.5, head = at::randn({10, 6}, at::kDouble);
  // p0 and p1 are one tensor, used by two layers: autograd gives each name the sum of both uses.
  SwapModel m({w, w, head}, [](const std::vector<at::Tensor>& p, const at::Tensor& x) {
    return at::linear(at::tanh(at::linear(at::tanh(at::linear(x, p[0])), p[1])), p[2]);
  });
  const at::Tensor x = at::randn({3, 6}, at::kDouble), cols = shared_columns(3, {0, 4, 9});
  const at::Tensor want = explicit_probe_jacobian(m, x, cols);
  EXPECT_TRUE(at::equal(want.narrow(1, 0, 36), want.narrow(1, 36, 36)));
  EXPECT_LT(max_rel(functorch_rows(m, x, cols, 3), want), 1e-12);
}

TEST(FunctorchRowsTest, AWrongSwapOrAModelThatCannotSwapIsNotTaken) {
  at::manual_seed(2);
  const at::Tensor x = at::randn({2, 1, 8, 8}, at::kDouble), cols = shared_columns(2, {1, 5});
  // Parameter 4 (the dilated conv's weight) read from the model itself: its rows come out zero.
  SwapModel wrong(random_params(kConvShapes), conv_forward, /*own=*/4);
  EXPECT_GT(max_rel(functorch_rows(wrong, x, cols, 2), explicit_probe_jacobian(wrong, x, cols)), 0.1);
  std::string why;
  EXPECT_EQ(choose_rows_mode(wrong, x, cols, &why), RowsMode::kBatchedOutputs) << why;
  EXPECT_NE(why.find("functorch's rows differ"), std::string::npos) << why;
  // The zoo's models read their own tensors: refused, named.
  auto zoo = models::build_model(models::parse_model_spec("mlp:8:tanh"), {1, 4, 4}, 3);
  zoo->to(at::kDouble);
  at::Tensor rows = at::empty({3, 16 * 8 + 8 + 8 * 3 + 3}, at::kDouble);
  EXPECT_THROW(functorch_rows_into(*zoo, at::randn({1, 1, 4, 4}, at::kDouble), shared_columns(1, {0, 1, 2}), rows, 1),
               FunctorchRowsUnsupported);
}

const std::filesystem::path kData = PATHKERNEL_TEST_DATA;

std::shared_ptr<models::Model> scripted(const std::string& name, int64_t outputs) {
  auto m = load_scripted_model(kData / name, outputs);
  m->to(at::kDouble);
  return m;
}

/// The TorchScript fixture's rows by functorch against a backward per row, and the model's own
/// parameters (the same tensors, the same forward) back in place afterwards.
void expect_recorded_rows(const std::string& name, int64_t outputs, const at::Tensor& x) {
  auto m = scripted(name, outputs);
  const at::Tensor cols = at::arange(outputs, at::kLong).unsqueeze(0).expand({x.size(0), outputs}).contiguous();
  std::vector<const void*> own;
  for (const auto& p : m->parameters()) own.push_back(p.unsafeGetTensorImpl());
  at::Tensor before;
  {
    at::NoGradGuard ng;
    before = m->forward(x);
  }
  std::string why;
  EXPECT_EQ(choose_rows_mode(*m, x, cols, &why), RowsMode::kFunctorch) << name << ": " << why;
  EXPECT_LT(max_rel(functorch_rows(*m, x, cols, 2), explicit_probe_jacobian(*m, x, cols)), 1e-12) << name;
  size_t i = 0;
  for (const auto& p : m->parameters()) EXPECT_EQ(p.unsafeGetTensorImpl(), own[i++]) << name;
  at::NoGradGuard ng;
  EXPECT_TRUE(at::equal(m->forward(x), before)) << name;
}

TEST(FunctorchRowsTest, RecordedModelsRowsEqualABackwardPerRow) {
  at::manual_seed(3);
  expect_recorded_rows("scripted_cnn.pt", 4, at::rand({3, 1, 8, 8}, at::kDouble));
  expect_recorded_rows("scripted_resnorm.pt", 3, at::randn({3, 16}, at::kDouble));
  expect_recorded_rows("scripted_vit.pt", 3, at::rand({3, 1, 28, 28}, at::kDouble));
}

TEST(FunctorchRowsTest, AnLstmIsRefusedByTheTransformsAndItsParametersComeBack) {
  at::manual_seed(4);
  auto m = scripted("scripted_lstm.pt", 3);
  const at::Tensor x = at::rand({2, 1, 8, 8}, at::kDouble), cols = shared_columns(2, {0, 1, 2});
  std::vector<const void*> own;
  for (const auto& p : m->parameters()) own.push_back(p.unsafeGetTensorImpl());
  at::Tensor rows = at::empty({6, explicit_probe_jacobian(*m, x, cols).size(1)}, at::kDouble);
  EXPECT_THROW(functorch_rows_into(*m, x, cols, rows, 2), FunctorchRowsUnsupported);
  std::string why;
  EXPECT_NE(choose_rows_mode(*m, x, cols, &why), RowsMode::kFunctorch);
  EXPECT_NE(why.find("functorch's transforms refused it"), std::string::npos) << why;
  size_t i = 0;
  for (const auto& p : m->parameters()) EXPECT_EQ(p.unsafeGetTensorImpl(), own[i++]);
  // No functorch layer left behind, and its rows are those of a copy functorch never touched.
  EXPECT_TRUE(at::functorch::getDynamicLayerStack().empty());
  EXPECT_TRUE(at::equal(explicit_probe_jacobian(*m, x, cols), explicit_probe_jacobian(*scripted("scripted_lstm.pt", 3), x, cols)));
}

}  // namespace
}  // namespace pathkernel
