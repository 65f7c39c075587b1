// A recorded run's own TorchScript model (scripted_model.cpp): loaded with its state_dict names,
// converted to float64 in place, and differentiated by autograd. Its per-row gradients are
// compared with the zoo's factorized kernels on the same CNN, and with finite differences on a
// custom residual + LayerNorm module; damaged archives are refused naming the file.
#include <ATen/ATen.h>
#include <ATen/BatchedTensorImpl.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/library.h>

#include <limits>
#include <map>

#include "fixtures.h"
#include "unit_support.h"
#include "pathkernel/analysis/batched_rows.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/analysis/step_terms.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/trajectory/scripted_model.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

/// Loads the fixture `name` (tests/data/make_scripted_models.py) in float64.
std::shared_ptr<models::Model> scripted(const std::string& name, int64_t outputs) {
  auto m = load_scripted_model(testing::kTestData / name, outputs);
  m->to(at::kDouble);
  return m;
}

using testing::max_rel;

TEST(ScriptedModelTest, ParametersCarryTheStateDictNamesAndFollowDtypeChanges) {
  auto m = scripted("scripted_cnn.pt", 4);
  std::vector<std::string> names;
  for (const auto& p : m->named_parameters()) {
    names.push_back(p.key());
    EXPECT_EQ(p.value().scalar_type(), at::kDouble) << p.key();
  }
  EXPECT_EQ(names, (std::vector<std::string>{"0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"}));
  EXPECT_EQ(m->spec().str(), "torchscript");
  // Weights written into the registered parameters are the ones the scripted forward uses.
  const at::Tensor x = at::rand({2, 1, 8, 8}, at::kDouble);
  at::NoGradGuard ng;
  const at::Tensor before = m->forward(x);
  m->named_parameters()["7.bias"].add_(1.0);
  EXPECT_NEAR((m->forward(x) - before).min().item<double>(), 1.0, 1e-12);
  EXPECT_EQ(m->forward(x).scalar_type(), at::kDouble);
}

TEST(ScriptedModelTest, CnnRowsEqualTheZooFactorizedKernels) {
  // The zoo's cnn:2,3:tanh with the scripted nn.Sequential's weights (0 -> convs.0, 3 ->
  // convs.1, 7 -> fc): both routes must give the same gradients of every row.
  auto s = scripted("scripted_cnn.pt", 4);
  auto z = models::build_model(models::parse_model_spec("cnn:2,3:tanh"), {1, 8, 8}, 4);
  z->to(at::kDouble);
  const std::map<std::string, std::string> to_zoo = {{"0", "convs.0"}, {"3", "convs.1"}, {"7", "fc"}};
  {
    at::NoGradGuard ng;
    auto zp = z->named_parameters();
    for (const auto& p : s->named_parameters()) {
      const std::string layer = p.key().substr(0, p.key().find('.'));
      zp[to_zoo.at(layer) + p.key().substr(p.key().find('.'))].copy_(p.value());
    }
  }
  at::manual_seed(5);
  const at::Tensor x = at::randn({5, 1, 8, 8}, at::kDouble);
  const at::Tensor y = at::tensor({0, 3, 1, 2, 3}, at::kLong);
  const at::Tensor cols = shared_columns(5, {0, 1, 2, 3});
  const at::Tensor js = explicit_probe_jacobian(*s, x, cols);
  const at::Tensor jz = row_jacobian(*z, probe_rows(*z, x, cols, /*explicit_route=*/false));
  EXPECT_LT(max_rel(js, jz), 1e-12);
  const at::Tensor ls = explicit_loss_jacobian(*s, x, y, LossKind::kCrossEntropy);
  const at::Tensor lz = row_jacobian(*z, loss_rows(*z, x, y, LossKind::kCrossEntropy, false));
  EXPECT_LT(max_rel(ls, lz), 1e-12);
  ParamMap dw_s, dw_z;
  for (const auto& p : s->named_parameters()) {
    const at::Tensor d = at::randn_like(p.value()) * 0.1;
    dw_s[p.key()] = d;
    dw_z[to_zoo.at(p.key().substr(0, p.key().find('.'))) + p.key().substr(p.key().find('.'))] = d;
  }
  EXPECT_LT(max_rel(second_order(*s, x, cols, dw_s), second_order(*z, x, cols, dw_z)), 1e-12);
}

/// Central finite differences of f(params) [R] with respect to every parameter element: [R, n].
template <class F>
at::Tensor finite_jacobian(models::Model& m, F f, double h) {
  at::NoGradGuard ng;
  std::vector<at::Tensor> cols;
  for (auto& p : m.parameters()) {
    at::Tensor flat = p.view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const double keep = flat[i].item<double>();
      flat[i].fill_(keep + h);
      const at::Tensor up = f();
      flat[i].fill_(keep - h);
      const at::Tensor down = f();
      flat[i].fill_(keep);
      cols.push_back((up - down) / (2 * h));
    }
  }
  return at::stack(cols, 1);
}

TEST(ScriptedModelTest, ResidualLayerNormRowsMatchFiniteDifferences) {
  auto m = scripted("scripted_resnorm.pt", 3);
  at::manual_seed(7);
  const at::Tensor x = at::randn({3, 16}, at::kDouble);
  const at::Tensor cols = shared_columns(3, {0, 1, 2});
  const at::Tensor fd = finite_jacobian(*m, [&] { return m->forward(x).reshape({-1}); }, 1e-6);
  EXPECT_LT(max_rel(explicit_probe_jacobian(*m, x, cols), fd), 1e-8);

  // MSE against float targets (a recorded run's): l_m = |f(x_m) - t_m|^2 / 2, written out here.
  const at::Tensor t = at::randn({3, 3}, at::kDouble);
  const at::Tensor fd_loss = finite_jacobian(*m, [&] { return (m->forward(x) - t).pow(2).sum(1) * 0.5; }, 1e-6);
  EXPECT_LT(max_rel(explicit_loss_jacobian(*m, x, t, LossKind::kMse), fd_loss), 1e-8);

  // S = 1/2 dw^T H dw by double backward through the interpreter, against the second difference
  // (f(w + dw) - 2 f(w) + f(w - dw)) / 2 = S + O(|dw|^4).
  ParamMap dw;
  for (const auto& p : m->named_parameters()) dw[p.key()] = at::randn_like(p.value()) * 1e-3;
  const at::Tensor s = second_order(*m, x, cols, dw);
  at::Tensor f0, fp, fm;
  {
    at::NoGradGuard ng;
    f0 = m->forward(x).reshape({-1});
    for (const auto& p : m->named_parameters()) p.value().add_(dw.at(p.key()));
    fp = m->forward(x).reshape({-1});
    for (const auto& p : m->named_parameters()) p.value().sub_(dw.at(p.key()) * 2);
    fm = m->forward(x).reshape({-1});
  }
  EXPECT_GT(s.abs().max().item<double>(), 1e-9);  // LayerNorm and tanh: a curved model
  EXPECT_LT(max_rel(s, (fp - 2 * f0 + fm) * 0.5), 1e-4);
}

/// A random direction over every parameter of `m`.
ParamMap random_direction(models::Model& m) {
  ParamMap v;
  for (const auto& p : m.named_parameters()) v[p.key()] = at::randn_like(p.value());
  return v;
}

/// J v by both Jacobian-vector routes against the explicit rows (one backward per row) times v.
void expect_jvps_match_rows(models::Model& m, const at::Tensor& x, const at::Tensor& cols, bool forward_mode) {
  const ParamMap v = random_direction(m);
  const at::Tensor rows = explicit_probe_jacobian(m, x, cols).mv(flatten_params(m, v));
  at::Tensor logits;
  const at::Tensor db = probe_jvps(m, x, cols, {&v}, &logits, JvpMode::kDoubleBackward).at(0);
  EXPECT_LT(max_rel(db, rows), 1e-12);
  EXPECT_LT(max_rel(logits, forward_nograd(m, x)), 1e-15);
  if (forward_mode) {
    EXPECT_LT(max_rel(probe_jvps(m, x, cols, {&v}, nullptr, JvpMode::kForward).at(0), rows), 1e-12);
  }
  // A wrong direction (one parameter's part dropped) does not pass for the right one.
  ParamMap wrong = v;
  wrong.begin()->second = at::zeros_like(wrong.begin()->second);
  EXPECT_GT(max_rel(probe_jvps(m, x, cols, {&wrong}, nullptr, JvpMode::kDoubleBackward).at(0), rows), 1e-6);
}

TEST(ScriptedModelTest, JacobianVectorProductsMatchExplicitRowsByEitherMode) {
  at::manual_seed(3);
  auto res = scripted("scripted_resnorm.pt", 3);
  const at::Tensor x = at::randn({4, 16}, at::kDouble);
  const at::Tensor cols = at::tensor({0, 2, 1, 1, 2, 0, 0, 1}, at::kLong).reshape({4, 2});
  std::string why;
  EXPECT_EQ(choose_jvp_mode(*res, x, cols, &why), JvpMode::kForward) << why;
  expect_jvps_match_rows(*res, x, cols, /*forward_mode=*/true);
  auto cnn = scripted("scripted_cnn.pt", 4);
  expect_jvps_match_rows(*cnn, at::rand({3, 1, 8, 8}, at::kDouble), at::tensor({0, 3, 2}, at::kLong).reshape({3, 1}), true);
}

TEST(ScriptedModelTest, AnOperatorWithoutForwardModeFallsBackToDoubleBackwardThenToRows) {
  // LibTorch 1.13 has no forward-mode formula for logcumsumexp (its backward is differentiable)
  // nor for cdist (whose backward is not): choose_jvp_mode names the operator and picks the
  // double backward for the first, the gradient rows for the second.
  at::manual_seed(4);
  const at::Tensor x = at::randn({5, 1, 8, 8}, at::kDouble);
  const at::Tensor cols = at::arange(4, at::kLong).unsqueeze(0).expand({5, 4}).contiguous();
  auto m = scripted("scripted_running_scores.pt", 4);
  const ParamMap v = random_direction(*m);
  EXPECT_THROW(probe_jvps(*m, x, cols, {&v}, nullptr, JvpMode::kForward), c10::Error);
  std::string why;
  EXPECT_EQ(choose_jvp_mode(*m, x, cols, &why), std::optional<JvpMode>(JvpMode::kDoubleBackward));
  EXPECT_NE(why.find("logcumsumexp"), std::string::npos) << why;
  expect_jvps_match_rows(*m, x, cols, /*forward_mode=*/false);
  // A failed forward-mode attempt leaves no tangent behind: the next products are still right.
  EXPECT_LT(max_rel(probe_jvps(*m, x, cols, {&v}, nullptr, JvpMode::kDoubleBackward).at(0),
                    explicit_probe_jacobian(*m, x, cols).mv(flatten_params(*m, v))),
            1e-12);
  auto p = scripted("scripted_prototypes.pt", 4);
  EXPECT_EQ(choose_jvp_mode(*p, x, cols, &why), std::nullopt);
  EXPECT_NE(why.find("_cdist_backward"), std::string::npos) << why;
}

/// tanh(x W^T) whose forward drops W's tangent when forward-mode AD runs through it: a model
/// whose forward-mode formulas would be wrong, for choose_jvp_mode's check against the rows.
class WrongTangents : public models::Model {
 public:
  WrongTangents() : Model(models::ModelSpec{"torchscript", {}, "none"}, 3) {
    w_ = register_parameter("w", at::randn({3, 5}, at::kDouble));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    const bool dual = w_._fw_grad(0).defined();
    return at::tanh(at::mm(x.flatten(1), (dual ? std::get<0>(at::_unpack_dual(w_, 0)) : w_).t()));
  }

 private:
  at::Tensor w_;
};

TEST(ScriptedModelTest, AForwardModeThatDisagreesWithTheRowsIsNotTaken) {
  at::manual_seed(5);
  WrongTangents m;
  const at::Tensor x = at::randn({2, 5}, at::kDouble);
  const at::Tensor cols = at::tensor({0, 2, 1, 0}, at::kLong).reshape({2, 2});
  const ParamMap v = random_direction(m);
  EXPECT_EQ(probe_jvps(m, x, cols, {&v}, nullptr, JvpMode::kForward).at(0).abs().max().item<double>(), 0.0);
  std::string why;
  EXPECT_EQ(choose_jvp_mode(m, x, cols, &why), std::optional<JvpMode>(JvpMode::kDoubleBackward));
  EXPECT_NE(why.find("off the gradient rows"), std::string::npos) << why;
}

/// Every layout tangent_rules.cpp's convolution rule sees: a strided stem with bias (weight
/// batched: directions as output channels), a dilated conv without bias and a grouped conv (input
/// and weight batched in separate calls; groups: one call per direction), a transposed conv (its
/// weight's tangent: one call per direction), a mean over two dimensions kept, a linear head.
class ConvLayouts : public models::Model {
 public:
  ConvLayouts() : Model(models::ModelSpec{"torchscript", {}, "none"}, 5) {
    w1_ = register_parameter("w1", at::randn({4, 1, 3, 3}, at::kDouble));
    b1_ = register_parameter("b1", at::randn({4}, at::kDouble));
    w2_ = register_parameter("w2", at::randn({4, 4, 3, 3}, at::kDouble) * 0.3);
    w3_ = register_parameter("w3", at::randn({4, 2, 3, 3}, at::kDouble) * 0.3);
    b3_ = register_parameter("b3", at::randn({4}, at::kDouble));
    w4_ = register_parameter("w4", at::randn({4, 3, 2, 2}, at::kDouble) * 0.3);
    b4_ = register_parameter("b4", at::randn({3}, at::kDouble));
    w5_ = register_parameter("w5", at::randn({5, 3}, at::kDouble));
    b5_ = register_parameter("b5", at::randn({5}, at::kDouble));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    at::Tensor h = at::tanh(at::conv2d(x, w1_, b1_, {2, 2}, {1, 1}));                // [N, 4, 6, 6]
    h = at::relu(at::conv2d(h, w2_, {}, {1, 1}, {2, 2}, {2, 2})) + h;               // dilated, no bias
    h = at::tanh(at::conv2d(h, w3_, b3_, {1, 1}, {1, 1}, {1, 1}, 2));               // two groups
    h = at::conv_transpose2d(h, w4_, b4_, {2, 2});                                  // [N, 3, 12, 12]
    return at::linear(at::sigmoid(h.mean({2, 3}, /*keepdim=*/true).flatten(1)), w5_, b5_);
  }

 private:
  at::Tensor w1_, b1_, w2_, w3_, b3_, w4_, b4_, w5_, b5_;
};

/// Four directions in one forward against one forward each and against the rows (1e-12).
void expect_batched_directions_match(models::Model& m, const at::Tensor& x, const at::Tensor& cols) {
  std::vector<ParamMap> v;
  for (int i = 0; i < 4; ++i) v.push_back(random_direction(m));
  const std::vector<const ParamMap*> dirs = {&v[0], &v[1], &v[2], &v[3]};
  at::Tensor logits;
  const auto got = probe_jvps(m, x, cols, dirs, &logits, JvpMode::kForwardBatched);
  const auto each = probe_jvps(m, x, cols, dirs, nullptr, JvpMode::kForward);
  const at::Tensor rows = explicit_probe_jacobian(m, x, cols);
  ASSERT_EQ(got.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_LT(max_rel(got[i], each[i]), 1e-12) << i;
    EXPECT_LT(max_rel(got[i], rows.mv(flatten_params(m, v[i]))), 1e-12) << i;
  }
  EXPECT_LT(max_rel(logits, forward_nograd(m, x)), 1e-15);
  std::string why;
  EXPECT_EQ(choose_forward_batching(m, x, cols, &why), JvpMode::kForwardBatched) << why;
}

TEST(ScriptedModelTest, AllDirectionsInOneForwardEqualOneForwardPerDirection) {
  at::manual_seed(6);
  ConvLayouts conv;
  const at::Tensor x = at::randn({3, 1, 12, 12}, at::kDouble);
  expect_batched_directions_match(conv, x, at::tensor({0, 4, 2, 1, 3, 3}, at::kLong).reshape({3, 2}));
  auto cnn = scripted("scripted_cnn.pt", 4);  // TorchScript: conv, tanh, max-pool, linear
  expect_batched_directions_match(*cnn, at::rand({3, 1, 8, 8}, at::kDouble), at::tensor({0, 3, 2}, at::kLong).reshape({3, 1}));
  auto res = scripted("scripted_resnorm.pt", 3);  // residual, LayerNorm
  expect_batched_directions_match(*res, at::randn({4, 16}, at::kDouble), at::tensor({0, 2, 1, 1}, at::kLong).reshape({4, 1}));
}

TEST(ScriptedModelTest, LstmAndAttentionDirectionsInOneForward) {
  at::manual_seed(8);
  auto lstm = scripted("scripted_lstm.pt", 3);  // the LSTM's gates: unsafe_split
  expect_batched_directions_match(*lstm, at::randn({3, 1, 8, 8}, at::kDouble), at::tensor({0, 2, 1}, at::kLong).reshape({3, 1}));
  auto vit = scripted("scripted_vit.pt", 3);  // attention, LayerNorm, GELU
  expect_batched_directions_match(*vit, at::randn({2, 1, 28, 28}, at::kDouble), at::tensor({0, 2, 1, 1}, at::kLong).reshape({2, 2}));
}

/// A deliberately wrong batching rule for mean.dim: twice the mean.
void twice_the_mean(const c10::OperatorHandle&, torch::jit::Stack* s) {
  const auto a = torch::jit::last(*s, 4);
  const at::BatchedTensorImpl* bt = at::maybeGetBatchedImpl(a[0].toTensor());
  const at::Tensor x = bt->value().movedim(bt->bdims()[0].dim(), 0);
  std::vector<int64_t> dims = a[1].toIntVector();
  for (int64_t& d : dims) d = c10::maybe_wrap_dim(d, x.dim() - 1) + 1;
  const at::Tensor r = at::mean(x, dims, a[2].toBool()) * 2;
  const int64_t level = bt->bdims()[0].level();
  torch::jit::drop(*s, 4);
  s->emplace_back(at::makeBatched(r, {at::BatchDim(level, 0)}));
}

TEST(ScriptedModelTest, AWrongBatchingRuleKeepsOneForwardPerDirection) {
  at::manual_seed(7);
  ConvLayouts m;
  const at::Tensor x = at::randn({2, 1, 12, 12}, at::kDouble);
  const at::Tensor cols = at::tensor({1, 4}, at::kLong).reshape({2, 1});
  std::string why;
  ASSERT_EQ(choose_forward_batching(m, x, cols, &why), JvpMode::kForwardBatched) << why;
  {
    const QuietOverride quiet;
    torch::Library wrong(torch::Library::IMPL, "aten", c10::DispatchKey::Batched, __FILE__, __LINE__);
    wrong.impl("mean.dim", torch::CppFunction::makeFromBoxedFunction<&twice_the_mean>());
    EXPECT_EQ(choose_forward_batching(m, x, cols, &why), JvpMode::kForward);
    EXPECT_NE(why.find("off one forward per direction"), std::string::npos) << why;
  }
  EXPECT_EQ(choose_forward_batching(m, x, cols, &why), JvpMode::kForwardBatched) << why;
}

/// 1/2 d^2/dt^2 of the outputs `cols` at w + t v, t = 0: central second differences with step h
/// and h/2, Richardson-extrapolated (error O(h^4)). An independent route to S; the weights are
/// put back as they were.
at::Tensor second_difference(models::Model& m, const at::Tensor& x, const at::Tensor& cols, const ParamMap& v,
                             double h) {
  at::NoGradGuard ng;
  std::vector<at::Tensor> saved;
  for (const auto& p : m.named_parameters()) saved.push_back(p.value().clone());
  auto outputs_at = [&](double t) {
    size_t i = 0;
    for (const auto& p : m.named_parameters()) p.value().copy_(saved[i++] + v.at(p.key()) * t);
    return m.forward(x).gather(1, cols).reshape({-1});
  };
  const at::Tensor f0 = outputs_at(0);
  auto second = [&](double s) { return (outputs_at(s) - 2 * f0 + outputs_at(-s)) / (s * s); };
  const at::Tensor d = (4 * second(h / 2) - second(h)) / 3;
  size_t i = 0;
  for (const auto& p : m.named_parameters()) p.value().copy_(saved[i++]);
  return 0.5 * d;
}

/// LibTorch's own layer_norm (native_layer_norm, whose double backward holds the saved mean and
/// 1/std constant), for a test to put back in place of the mended one.
at::Tensor native_layer_norm_only(const at::Tensor& input, at::IntArrayRef shape, const c10::optional<at::Tensor>& w,
                                  const c10::optional<at::Tensor>& b, double eps, bool /*cudnn_enable*/) {
  return std::get<0>(at::native_layer_norm(input, shape, w, b, eps));
}

/// S of a model with a norm: all rows at once, equal to the per-row Hessian-vector products and
/// to second differences of the outputs along dw; and, outside S's scope, every rows mode
/// (functorch's transforms among them) equal to a backward per row.
void expect_second_order_of_a_norm_model(models::Model& m, const at::Tensor& x, const at::Tensor& cols,
                                         const ParamMap& dw, const char* name) {
  std::string why;
  EXPECT_EQ(choose_second_order_mode(m, x, cols, dw, &why), SecondOrderMode::kAllRows) << name << ": " << why;
  const at::Tensor all = second_order(m, x, cols, dw, SecondOrderMode::kAllRows);
  EXPECT_LT(max_rel(all, second_order(m, x, cols, dw, SecondOrderMode::kPerRow)), 1e-12) << name;
  EXPECT_LT(max_rel(all, second_difference(m, x, cols, dw, 1e-3)), 1e-7) << name;
  const at::Tensor rows = explicit_probe_jacobian(m, x, cols);
  for (const RowsMode mode : {RowsMode::kBatchedOutputs, RowsMode::kFunctorch}) {
    EXPECT_LT(max_rel(explicit_probe_jacobian_into(m, x, cols, at::empty_like(rows), mode), rows), 1e-12)
        << name << " " << static_cast<int>(mode);
  }
}

TEST(ScriptedModelTest, SecondOrderAllRowsAtOnceOnlyWhereItAgreesWithPerRowProducts) {
  // The CNN (conv, tanh, max-pool): S of every row at once equals the rows' Hessian-vector
  // products, so it is taken.
  at::manual_seed(9);
  auto cnn = scripted("scripted_cnn.pt", 4);
  const at::Tensor xc = at::rand({3, 1, 8, 8}, at::kDouble), cc = shared_columns(3, {0, 1, 2, 3});
  const ParamMap dc = random_direction(*cnn);
  std::string why;
  EXPECT_EQ(choose_second_order_mode(*cnn, xc, cc, dc, &why), SecondOrderMode::kAllRows) << why;
  EXPECT_LT(max_rel(second_order(*cnn, xc, cc, dc, SecondOrderMode::kAllRows),
                    second_order(*cnn, xc, cc, dc, SecondOrderMode::kPerRow)),
            1e-12);
  // A residual LayerNorm module: its layer_norm written out in differentiable operators for the
  // all-rows S (norm_rules.cpp). A GroupNorm CNN: LibTorch's group_norm is right as it is.
  auto res = scripted("scripted_resnorm.pt", 3);
  const at::Tensor xr = at::randn({3, 16}, at::kDouble), cr = shared_columns(3, {0, 1, 2});
  const ParamMap dr = random_direction(*res);
  expect_second_order_of_a_norm_model(*res, xr, cr, dr, "layer norm");
  auto gn = scripted("scripted_gncnn.pt", 3);
  expect_second_order_of_a_norm_model(*gn, at::rand({3, 1, 8, 8}, at::kDouble), shared_columns(3, {0, 2}),
                                      random_direction(*gn), "group norm");
  // With LibTorch's own layer_norm back in place, the all-rows S is off (its third derivative is
  // wrong) and the per-row route is kept.
  const at::Tensor per_row = second_order(*res, xr, cr, dr, SecondOrderMode::kPerRow);
  {
    const QuietOverride quiet;
    torch::Library native(torch::Library::IMPL, "aten", c10::DispatchKey::AutogradCPU, __FILE__, __LINE__);
    native.impl("layer_norm", TORCH_FN(native_layer_norm_only));
    EXPECT_EQ(choose_second_order_mode(*res, xr, cr, dr, &why), SecondOrderMode::kPerRow) << why;
    EXPECT_NE(why.find("off"), std::string::npos) << why;
    EXPECT_GT(max_rel(second_order(*res, xr, cr, dr, SecondOrderMode::kAllRows), per_row), 1e-3);
  }
  EXPECT_LT(max_rel(second_order(*res, xr, cr, dr, SecondOrderMode::kAllRows), per_row), 1e-12);
}

TEST(ScriptedModelTest, ProbeRowsInAReusedWorkspaceEqualFreshRows) {
  at::manual_seed(11);
  auto m = scripted("scripted_resnorm.pt", 3);
  const at::Tensor x = at::randn({4, 16}, at::kDouble), cols = shared_columns(4, {0, 2});
  RowsWorkspace workspace;
  const RowGradients big = probe_rows(*m, x, cols, /*explicit_route=*/true, nullptr, &workspace);
  ASSERT_TRUE(workspace.mode.has_value());
  const at::Tensor fresh = explicit_probe_jacobian_into(*m, x, cols, at::empty_like(big.jacobian), *workspace.mode);
  EXPECT_TRUE(at::equal(big.jacobian, fresh));
  EXPECT_LT(max_rel(big.jacobian, explicit_probe_jacobian(*m, x, cols)), 1e-12);  // one backward per row
  const void* data = workspace.buffer.data_ptr();
  // Fewer probes: the same workspace, no new allocation, the right rows.
  const RowGradients small = probe_rows(*m, x.slice(0, 1, 3), cols.slice(0, 1, 3), true, nullptr, &workspace);
  EXPECT_EQ(workspace.buffer.data_ptr(), data);
  // Bit for bit in the per-probe modes; kFunctorch batches a block's probes in one product, whose
  // rounding depends on the block (under OpenBLAS's Prescott kernels the bits differ).
  if (*workspace.mode == RowsMode::kFunctorch) {
    EXPECT_LT(max_rel(small.jacobian, fresh.slice(0, 2, 6)), 1e-13);
  } else {
    EXPECT_TRUE(at::equal(small.jacobian, fresh.slice(0, 2, 6)));
  }
  // A workspace of the wrong shape is refused, not written past.
  EXPECT_THROW(explicit_probe_jacobian_into(*m, x, cols, at::empty({8, 5}, at::kDouble)), std::invalid_argument);
}

TEST(ScriptedModelTest, RowsFormedInALentBufferFillItWholeAndAreNotCopiedAgain) {
  // explain lends its own [rows, n_params] matrix to the workspace: every mode must write every
  // entry of it (it holds last step's rows, scaled), and row_jacobian then hands it back as is.
  at::manual_seed(12);
  auto m = scripted("scripted_resnorm.pt", 3);
  const at::Tensor x = at::randn({4, 16}, at::kDouble), cols = shared_columns(4, {0, 2});
  const at::Tensor want = explicit_probe_jacobian(*m, x, cols);
  int formed = 0;
  for (const RowsMode mode : {RowsMode::kPerRow, RowsMode::kBatchedOutputs, RowsMode::kFunctorch}) {
    const at::Tensor lent = at::full_like(want, std::numeric_limits<double>::quiet_NaN());
    RowsWorkspace workspace;
    workspace.mode = mode;
    workspace.buffer = lent.view({-1});
    RowGradients rows;
    try {
      rows = probe_rows(*m, x, cols, /*explicit_route=*/true, nullptr, &workspace);
    } catch (const BatchedRowsUnsupported&) {
      continue;
    }
    ++formed;
    EXPECT_EQ(rows.jacobian.data_ptr(), lent.data_ptr()) << static_cast<int>(mode);
    EXPECT_LT(max_rel(lent, want), 1e-12) << static_cast<int>(mode);  // a NaN left fails
    EXPECT_EQ(row_jacobian(*m, rows, lent).data_ptr(), lent.data_ptr());
    const at::Tensor other = at::full_like(want, std::numeric_limits<double>::quiet_NaN());
    EXPECT_TRUE(at::equal(row_jacobian(*m, rows, other), lent));  // elsewhere: copied
  }
  EXPECT_GE(formed, 2);  // at least the per-row and functorch modes
}

TEST(ScriptedModelTest, DamagedOrUnusableArchivesAreRefusedNamingTheFile) {
  testing::TempDir tmp;
  const std::string good = read_file(testing::kTestData / "scripted_cnn.pt");
  atomic_write(tmp / "text.pt", "def forward(self, x): return x\n");
  EXPECT_THROW_WITH(load_scripted_model(tmp / "text.pt", 4), InputError, "text.pt: not a readable TorchScript archive");
  atomic_write(tmp / "short.pt", good.substr(0, good.size() / 2));
  EXPECT_THROW_WITH(load_scripted_model(tmp / "short.pt", 4), InputError, "short.pt: not a readable TorchScript archive");
  // One bit flipped inside a deflated code record and inside a stored weight record.
  for (const std::string record : {"code/__torch__/torch/nn/modules/conv.py", "data/0"}) {
    const std::string full = "scripted_cnn/" + record;
    const size_t name = good.find(full);  // in its local header (they precede the directory)
    ASSERT_NE(name, std::string::npos);
    const auto extra = static_cast<size_t>(static_cast<unsigned char>(good[name - 2])) +
                       256 * static_cast<size_t>(static_cast<unsigned char>(good[name - 1]));
    std::string bad = good;
    bad[name + full.size() + extra + 3] ^= 1;  // the 4th byte of the record's data
    atomic_write(tmp / "flipped.pt", bad);
    SCOPED_TRACE(record);
    EXPECT_THROW_WITH(load_scripted_model(tmp / "flipped.pt", 4), InputError, "is damaged");
  }
  EXPECT_THROW_WITH(load_scripted_model(testing::kTestData / "scripted_noparams.pt", 4), InputError, "has no parameters");
  EXPECT_THROW_WITH(load_scripted_model(tmp / "missing.pt", 4), InputError, "missing.pt");
}

}  // namespace
}  // namespace pathkernel

namespace pathkernel {
namespace {

// A recorded model's Dropout site (issue 26): inside a TrainingForward of a step's masks the
// forward is the network with each hidden unit times mask / (1 - p), written out here by hand
// in ATen; outside it (and after an exception leaves the scope) the prediction, Dropout off.
// The loss rows in a training context are each example's gradient through that masked forward
// (autograd of the hand-written network); a mask given to the wrong example gives other rows.
TEST(ScriptedModelTest, DropoutSitesApplyAStepsMasksOnlyInsideATrainingForward) {
  auto m = scripted("scripted_dropout_mlp.pt", 4);
  at::manual_seed(3);
  const at::Tensor x = at::randn({5, 1, 8, 8}, at::kDouble);
  const at::Tensor y = at::tensor({0, 3, 1, 2, 3}, at::kLong);
  const at::Tensor mask = at::bernoulli(at::full({5, 6}, 0.75, at::kDouble));
  auto params = m->named_parameters();
  auto by_hand = [&](const at::Tensor& scale) {
    const at::Tensor h = at::tanh(at::linear(x.flatten(1), params["1.weight"], params["1.bias"]));
    return at::linear(h * scale, params["4.weight"], params["4.bias"]);
  };
  const at::Tensor predicted = forward_nograd(*m, x);
  EXPECT_LT(max_rel(predicted, by_hand(at::ones({5, 6}, at::kDouble))), 1e-15);
  models::TrainingContext ctx;
  ctx.dropout_masks["3"] = mask.to(at::kByte);
  {
    const models::TrainingForward tf(*m, ctx);
    EXPECT_TRUE(m->in_training_context());
    EXPECT_LT(max_rel(forward_nograd(*m, x), by_hand(mask / 0.75)), 1e-15);
    const at::Tensor rows = explicit_loss_jacobian(*m, x, y, LossKind::kCrossEntropy);
    const std::vector<at::Tensor> ps = m->parameters();
    const at::Tensor out = by_hand(mask / 0.75);
    for (int64_t i = 0; i < 5; ++i) {
      const auto g = torch::autograd::grad({at::cross_entropy_loss(out.slice(0, i, i + 1), y.slice(0, i, i + 1))}, ps,
                                           {}, /*retain_graph=*/true);
      std::vector<at::Tensor> flat;
      for (const auto& t : g) flat.push_back(t.reshape({-1}));
      EXPECT_LT(max_rel(rows[i], at::cat(flat)), 1e-13) << "example " << i;
    }
    ctx.dropout_masks["3"] = mask.roll(1, 0).to(at::kByte);  // each example given its neighbour's mask
    m->set_training_context(ctx);
    EXPECT_GT(max_rel(explicit_loss_jacobian(*m, x, y, LossKind::kCrossEntropy), rows), 1e-3);
  }
  EXPECT_FALSE(m->in_training_context());
  EXPECT_LT(max_rel(forward_nograd(*m, x), predicted), 1e-15) << "predictions again after the scope";
  try {
    const models::TrainingForward tf(*m, ctx);
    throw std::runtime_error("leaves the scope");
  } catch (const std::runtime_error&) {
  }
  EXPECT_LT(max_rel(forward_nograd(*m, x), predicted), 1e-15) << "predictions again after an exception";
  // A site the model does not have, and a zoo model, which has none, are refused.
  models::TrainingContext unknown;
  unknown.dropout_masks["2"] = mask.to(at::kByte);
  EXPECT_THROW_WITH(m->set_training_context(unknown), InputError, "no recorded Dropout site '2'");
  auto zoo = models::build_model(models::parse_model_spec("mlp:6:tanh"), {1, 8, 8}, 4);
  EXPECT_THROW(zoo->set_training_context(ctx), std::invalid_argument);
  EXPECT_FALSE(zoo->in_training_context());
}

}  // namespace
}  // namespace pathkernel
