#include <ATen/ATen.h>

#include <map>

#include "fixtures.h"
#include "pathkernel/models/model.h"

namespace pathkernel::models {
namespace {

std::vector<std::string> names_of(Model& m) {
  std::vector<std::string> n;
  for (const auto& p : m.named_parameters()) n.push_back(p.key());
  return n;
}

TEST(ModelSpecTest, ParsesAndPrintsCanonically) {
  EXPECT_EQ(parse_model_spec("mlp:256,128:relu").str(), "mlp:256,128:relu");
  EXPECT_EQ(parse_model_spec("mlp:128").str(), "mlp:128:tanh");
  EXPECT_EQ(parse_model_spec("cnn:8,16").str(), "cnn:8,16:relu");
  EXPECT_EQ(parse_model_spec("quadratic").str(), "quadratic:64");
  EXPECT_EQ(parse_model_spec("linear").str(), "linear");
  EXPECT_THROW_WITH(parse_model_spec("mlp:12a"), std::invalid_argument, "'12a' is not a positive integer");
  EXPECT_THROW_WITH(parse_model_spec("mlp:64:sigmoidish"), std::invalid_argument, "unknown activation");
  EXPECT_THROW_WITH(parse_model_spec("cnn:8"), std::invalid_argument, "exactly two");
  EXPECT_THROW_WITH(parse_model_spec("resnet"), std::invalid_argument, "unknown model 'resnet'");
  EXPECT_THROW_WITH(parse_model_spec("linear:3"), std::invalid_argument, "no arguments");
  EXPECT_EQ(parse_model_spec("mlp:64:relu:dropout=0.5").str(), "mlp:64:relu:dropout=0.5");
  EXPECT_EQ(parse_model_spec("mlp:64:dropout=0.1").str(), "mlp:64:tanh:dropout=0.1");
  EXPECT_EQ(parse_model_spec("cnn:4,8:dropout=.25").str(), "cnn:4,8:relu:dropout=0.25");
  EXPECT_EQ(parse_model_spec("mlp:64:dropout=0.1").dropout, 0.1);
  EXPECT_THROW_WITH(parse_model_spec("mlp:64:relu:dropout=1"), std::invalid_argument, "'1' is not a rate in (0, 1)");
  EXPECT_THROW_WITH(parse_model_spec("mlp:64:relu:dropout=0"), std::invalid_argument, "not a rate");
  EXPECT_THROW_WITH(parse_model_spec("mlp:64:relu:dropout=0.5x"), std::invalid_argument, "not a rate");
  EXPECT_THROW_WITH(parse_model_spec("quadratic:8:dropout=0.5"), std::invalid_argument, "only mlp and cnn");
  EXPECT_EQ(parse_model_spec("mlp:64:relu:bn").str(), "mlp:64:relu:bn");
  EXPECT_EQ(parse_model_spec("cnn:4,8:dropout=0.5:bn").str(), "cnn:4,8:relu:bn:dropout=0.5");
  EXPECT_TRUE(parse_model_spec("mlp:64:bn").batchnorm);
  EXPECT_THROW_WITH(parse_model_spec("mlp:64:relu:bn:bn"), std::invalid_argument, "bn given twice");
  EXPECT_THROW_WITH(parse_model_spec("linear:bn"), std::invalid_argument, "no arguments");
  EXPECT_THROW_WITH(parse_model_spec("quadratic:8:bn"), std::invalid_argument, "only mlp and cnn take :bn");
  EXPECT_EQ(parse_model_spec("toy:wave").str(), "toy:wave");
  EXPECT_THROW_WITH(parse_model_spec("toy:bowl"), std::invalid_argument, "toy:wave");
}

TEST(ModelTest, StateDictNamesAndShapesFollowPyTorch) {
  auto mlp = build_model(parse_model_spec("mlp:256,128:relu"), {1, 28, 28}, 10);
  EXPECT_EQ(names_of(*mlp), (std::vector<std::string>{"layers.0.weight", "layers.0.bias", "layers.1.weight",
                                                      "layers.1.bias", "layers.2.weight", "layers.2.bias"}));
  EXPECT_EQ(mlp->named_parameters()["layers.0.weight"].sizes(), (std::vector<int64_t>{256, 784}));
  auto cnn = build_model(parse_model_spec("cnn:8,16:relu"), {1, 28, 28}, 10);
  EXPECT_EQ(names_of(*cnn), (std::vector<std::string>{"convs.0.weight", "convs.0.bias", "convs.1.weight",
                                                      "convs.1.bias", "fc.weight", "fc.bias"}));
  EXPECT_EQ(cnn->named_parameters()["fc.weight"].sizes(), (std::vector<int64_t>{10, 16 * 7 * 7}));
  auto lin = build_model(parse_model_spec("linear"), {1, 12, 12}, 3);
  EXPECT_EQ(names_of(*lin), (std::vector<std::string>{"layers.0.weight", "layers.0.bias"}));
  EXPECT_THROW_WITH(build_model(parse_model_spec("cnn:4,4"), {1, 3, 3}, 2), std::invalid_argument, "at least 4x4");
}

TEST(ModelTest, ForwardShapesAndTapsCaptureInputsAndSignals) {
  at::manual_seed(0);
  for (const char* spec : {"linear", "quadratic:5", "mlp:7,6:gelu", "cnn:3,4:tanh"}) {
    auto m = build_model(parse_model_spec(spec), {1, 8, 8}, 4);
    m->to(at::kDouble);
    const at::Tensor x = at::rand({5, 1, 8, 8}, at::kDouble);
    EXPECT_EQ(m->forward(x).sizes(), (std::vector<int64_t>{5, 4})) << spec;
    EXPECT_FALSE(m->taps()[0].input.defined()) << "capture is off by default";
    m->set_capture(true);
    const at::Tensor out = m->forward(x);
    out.pow(2).sum().backward();
    for (const auto& t : m->taps()) {
      ASSERT_TRUE(t.input.defined()) << spec << " " << t.name;
      ASSERT_TRUE(t.grad_output.defined()) << spec << " " << t.name;
      EXPECT_EQ(t.grad_output.size(0), 5);
    }
    // The last layer's signal of sum(out^2) is 2 * out.
    EXPECT_TRUE(at::allclose(m->taps().back().grad_output, 2 * out.detach())) << spec;
  }
}

TEST(ModelTest, QuadraticModelHasNoNonlinearity) {
  at::manual_seed(1);
  auto m = build_model(parse_model_spec("quadratic:6"), {1, 4, 4}, 3);
  m->to(at::kDouble);
  const at::Tensor x = at::rand({2, 1, 4, 4}, at::kDouble);
  const auto p = m->named_parameters();
  const at::Tensor expected =
      at::linear(at::linear(x.reshape({2, -1}), p["layers.0.weight"], p["layers.0.bias"]), p["layers.1.weight"],
                 p["layers.1.bias"]);
  EXPECT_TRUE(at::allclose(m->forward(x), expected, 1e-14, 1e-14));
}

// A row segment runs each row at its own weights w + t[n] dw: the same logits, and the same
// gradient with respect to w, as moving the model's weights there and forwarding the row alone.
TEST(ModelTest, RowSegmentRunsEachRowAtItsOwnWeights) {
  for (const char* spec : {"mlp:5,4:relu", "cnn:2,3:relu", "linear"}) {
    at::manual_seed(2);
    auto m = build_model(parse_model_spec(spec), {1, 4, 4}, 3);
    m->to(at::kDouble);
    const at::Tensor x = at::rand({3, 1, 4, 4}, at::kDouble);
    const at::Tensor t = at::tensor({0.0, 0.37, 1.2}, at::kDouble);
    std::map<std::string, at::Tensor> w0, dw;
    for (const auto& p : m->named_parameters()) {
      w0[p.key()] = p.value().detach().clone();
      dw[p.key()] = at::randn_like(p.value());
    }
    RowSegment seg;
    seg.t = t;
    for (const auto& tap : m->taps()) {
      seg.weight.push_back(dw.at(tap.name + ".weight"));
      seg.bias.push_back(dw.at(tap.name + ".bias"));
    }
    m->set_row_segment(seg);
    m->zero_grad();
    const at::Tensor rows = m->forward(x);
    rows.sum().backward();
    std::map<std::string, at::Tensor> grad_rows;
    for (const auto& p : m->named_parameters()) grad_rows[p.key()] = p.value().grad().clone();
    m->set_row_segment({});
    std::map<std::string, at::Tensor> grad_alone;
    for (int64_t n = 0; n < 3; ++n) {
      {
        at::NoGradGuard ng;
        for (const auto& p : m->named_parameters()) p.value().copy_(w0[p.key()] + dw[p.key()] * t[n].item<double>());
      }
      m->zero_grad();
      const at::Tensor alone = m->forward(x.narrow(0, n, 1));
      EXPECT_TRUE(at::allclose(rows.narrow(0, n, 1), alone, 1e-12, 1e-12)) << spec << " row " << n;
      alone.sum().backward();
      for (const auto& p : m->named_parameters()) {
        auto& g = grad_alone[p.key()];
        g = g.defined() ? g + p.value().grad() : p.value().grad().clone();
      }
    }
    for (const auto& [k, g] : grad_rows) EXPECT_TRUE(at::allclose(g, grad_alone[k], 1e-12, 1e-12)) << spec << " " << k;
  }
}

TEST(ModelTest, RowSegmentRefusesDirectionsThatDoNotMatchTheTaps) {
  auto m = build_model(parse_model_spec("mlp:5:relu"), {1, 4, 4}, 3);
  RowSegment seg;
  seg.t = at::zeros({2});
  EXPECT_THROW(m->set_row_segment(seg), std::invalid_argument);  // no directions
  for (const auto& tap : m->taps()) {
    seg.weight.push_back(at::zeros_like(tap.weight));
    seg.bias.push_back(at::zeros_like(tap.bias));
  }
  seg.weight[1] = at::zeros({2, 2});
  try {
    m->set_row_segment(seg);
    FAIL() << "a wrong shape was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("layers.1"), std::string::npos) << e.what();
  }
}

// The zoo's Dropout sites (`:dropout=P`): a prediction passes through them; a step's training
// forward multiplies by its masks over 1 - p, checked against the same network written out by
// hand; masks that do not fit are refused, and the masks are a function of seed and step.
TEST(ModelTest, DropoutSitesApplyTheStepsMasksInATrainingForwardOnly) {
  at::manual_seed(3);
  auto m = build_model(parse_model_spec("mlp:6,5:tanh:dropout=0.25"), {1, 3, 3}, 4);
  auto plain = build_model(parse_model_spec("mlp:6,5:tanh"), {1, 3, 3}, 4);
  m->to(at::kDouble);
  plain->to(at::kDouble);
  {
    at::NoGradGuard ng;
    for (const auto& p : plain->named_parameters()) p.value().copy_(m->named_parameters()[p.key()]);
  }
  ASSERT_EQ(m->dropout_sites().size(), 2u);
  EXPECT_EQ(m->dropout_sites()[0].name, "dropout.0");
  EXPECT_EQ(m->dropout_sites()[1].shape, (std::vector<int64_t>{5}));
  EXPECT_TRUE(plain->dropout_sites().empty());
  const at::Tensor x = at::randn({7, 1, 3, 3}, at::kDouble);
  EXPECT_TRUE(at::equal(m->forward(x), plain->forward(x))) << "a prediction has no Dropout";

  const TrainingContext ctx = draw_dropout_masks(*m, 11, 4, 7);
  ASSERT_EQ(ctx.dropout_masks.size(), 2u);
  const at::Tensor m0 = ctx.dropout_masks.at("dropout.0"), m1 = ctx.dropout_masks.at("dropout.1");
  EXPECT_EQ(m0.sizes(), (std::vector<int64_t>{7, 6}));
  EXPECT_GT(m0.sum().item<int64_t>(), 0);
  EXPECT_LT(m0.sum().item<int64_t>(), 42);
  at::Tensor want;
  {
    auto w = [&](const char* n) { return m->named_parameters()[n]; };
    at::Tensor h = at::linear(x.reshape({7, -1}), w("layers.0.weight"), w("layers.0.bias"));
    h = at::linear(at::tanh(h) * m0.to(at::kDouble) / 0.75, w("layers.1.weight"), w("layers.1.bias"));
    want = at::linear(at::tanh(h) * m1.to(at::kDouble) / 0.75, w("layers.2.weight"), w("layers.2.bias"));
  }
  {
    const TrainingForward training(*m, ctx);
    EXPECT_TRUE(m->in_training_context());
    EXPECT_FALSE(m->batch_coupled());
    EXPECT_LT((m->forward(x) - want).abs().max().item<double>(), 1e-14);
  }
  EXPECT_TRUE(at::equal(m->forward(x), plain->forward(x))) << "predictions again after the step";

  // The same seed and step draw the same masks; another step others.
  EXPECT_TRUE(at::equal(draw_dropout_masks(*m, 11, 4, 7).dropout_masks.at("dropout.1"), m1));
  EXPECT_FALSE(at::equal(draw_dropout_masks(*m, 11, 5, 7).dropout_masks.at("dropout.1"), m1));
  EXPECT_TRUE(draw_dropout_masks(*plain, 11, 4, 7).empty());

  TrainingContext wrong = ctx;
  wrong.dropout_masks["dropout.0"] = m0.slice(1, 0, 5);
  EXPECT_THROW_WITH(m->set_training_context(wrong), std::invalid_argument, "is [7, 5], not [M, 6]");
  wrong = ctx;
  wrong.dropout_masks["dropout.7"] = m0;
  EXPECT_THROW_WITH(m->set_training_context(wrong), std::invalid_argument, "no Dropout site 'dropout.7'");
  EXPECT_THROW_WITH(plain->set_training_context(ctx), std::invalid_argument, "no Dropout site 'dropout.0'");
  TrainingContext norm;
  norm.batchnorm_train = {"bn"};
  EXPECT_THROW_WITH(m->set_training_context(norm), std::invalid_argument, "no BatchNorm module 'bn'");

  // The CNN's one site, on the flattened features before its head.
  auto cnn = build_model(parse_model_spec("cnn:2,3:relu:dropout=0.5"), {1, 8, 8}, 4);
  ASSERT_EQ(cnn->dropout_sites().size(), 1u);
  EXPECT_EQ(cnn->dropout_sites()[0].shape, (std::vector<int64_t>{3 * 2 * 2}));
  cnn->to(at::kDouble);
  const at::Tensor xc = at::randn({5, 1, 8, 8}, at::kDouble);
  const at::Tensor mc = draw_dropout_masks(*cnn, 1, 0, 5).dropout_masks.at("dropout");
  auto w = [&](const char* n) { return cnn->named_parameters()[n]; };
  at::Tensor h = at::max_pool2d(at::relu(at::conv2d(xc, w("convs.0.weight"), w("convs.0.bias"), 1, 1)), {2, 2});
  h = at::max_pool2d(at::relu(at::conv2d(h, w("convs.1.weight"), w("convs.1.bias"), 1, 1)), {2, 2});
  const at::Tensor plain_out = at::linear(h.reshape({5, -1}), w("fc.weight"), w("fc.bias"));
  const at::Tensor masked_out = at::linear(h.reshape({5, -1}) * mc.to(at::kDouble) * 2, w("fc.weight"), w("fc.bias"));
  EXPECT_LT((cnn->forward(xc) - plain_out).abs().max().item<double>(), 1e-14);
  TrainingContext cc;
  cc.dropout_masks["dropout"] = mc;
  const TrainingForward training(*cnn, cc);
  EXPECT_LT((cnn->forward(xc) - masked_out).abs().max().item<double>(), 1e-14);
}

// The zoo's BatchNorm (`:bn`): a prediction normalizes by the running statistics, a step's
// training forward by the batch's own, against the formulas written out; an analysis's context
// leaves the running statistics as they were, the training step's moves them as torch.nn does
// (momentum 0.1, the unbiased variance) and counts the batch; the count stays int64 through to().
TEST(ModelTest, BatchNormNormalizesByTheBatchInATrainingForwardAndMovesItsStatisticsOnlyInTheStep) {
  at::manual_seed(5);
  auto m = build_model(parse_model_spec("mlp:6:tanh:bn"), {1, 2, 2}, 3);
  m->to(at::kDouble);
  ASSERT_EQ(m->norm_sites().size(), 1u);
  const NormSite& s = m->norm_sites()[0];
  EXPECT_EQ(s.name, "norms.0");
  EXPECT_EQ(s.tracked.scalar_type(), at::kLong);
  {
    at::NoGradGuard ng;
    s.running_mean.uniform_(-1, 1);
    s.running_var.uniform_(0.5, 2);
    s.weight.uniform_(0.5, 1.5);
    s.bias.uniform_(-1, 1);
  }
  auto w = [&](const char* n) { return m->named_parameters()[n]; };
  const at::Tensor x = at::randn({9, 1, 2, 2}, at::kDouble);
  const at::Tensor z = at::linear(x.reshape({9, -1}), w("layers.0.weight"), w("layers.0.bias")).detach();
  auto head = [&](const at::Tensor& zn) {
    return at::linear(at::tanh(zn * s.weight + s.bias), w("layers.1.weight"), w("layers.1.bias"));
  };
  const at::Tensor mean0 = s.running_mean.clone(), var0 = s.running_var.clone();
  const at::Tensor predicted = head((z - mean0) / at::sqrt(var0 + 1e-5));
  EXPECT_LT((m->forward(x) - predicted).abs().max().item<double>(), 1e-13);

  const at::Tensor bm = z.mean(0), bv = z.var(0, /*unbiased=*/false);
  const at::Tensor trained = head((z - bm) / at::sqrt(bv + 1e-5));
  TrainingContext ctx;
  ctx.batchnorm_train = {"norms.0"};
  {
    const TrainingForward analysis(*m, ctx);
    EXPECT_TRUE(m->batch_coupled());
    EXPECT_LT((m->forward(x) - trained).abs().max().item<double>(), 1e-13);
  }
  EXPECT_TRUE(at::equal(s.running_mean, mean0)) << "an analysis never moves the statistics";
  EXPECT_TRUE(at::equal(s.running_var, var0));
  EXPECT_EQ(s.tracked.item<int64_t>(), 0);
  ctx.moves_statistics = true;
  {
    const TrainingForward step(*m, ctx);
    EXPECT_LT((m->forward(x) - trained).abs().max().item<double>(), 1e-13);
  }
  EXPECT_LT((s.running_mean - (0.9 * mean0 + 0.1 * bm)).abs().max().item<double>(), 1e-15);
  EXPECT_LT((s.running_var - (0.9 * var0 + 0.1 * z.var(0, /*unbiased=*/true))).abs().max().item<double>(), 1e-15);
  EXPECT_EQ(s.tracked.item<int64_t>(), 1);
  m->to(at::kFloat);
  EXPECT_EQ(s.tracked.scalar_type(), at::kLong);
  EXPECT_EQ(s.running_mean.scalar_type(), at::kFloat);

  TrainingContext other;
  other.batchnorm_train = {"norms.3"};
  EXPECT_THROW_WITH(m->set_training_context(other), std::invalid_argument, "no BatchNorm module 'norms.3'");
  auto cnn = build_model(parse_model_spec("cnn:2,3:relu:bn"), {1, 4, 4}, 2);
  EXPECT_EQ(names_of(*cnn), (std::vector<std::string>{"convs.0.weight", "convs.0.bias", "convs.1.weight", "convs.1.bias",
                                                      "norms.0.weight", "norms.0.bias", "norms.1.weight", "norms.1.bias",
                                                      "fc.weight", "fc.bias"}));
}

}  // namespace
}  // namespace pathkernel::models
