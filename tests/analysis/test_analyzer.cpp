// SPEC's invariants on real training runs of tiny synthetic data, each against an independent
// route: closed forms (linear: R = 0; quadratic: R = S), explicit Jacobians, autograd.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "fixtures.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/analysis/sharpness.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/idx.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/trainer.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

class AnalyzerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    testing::write_synthetic_idx(tmp_ / "data", 60, 20, 8, 3);
  }
  std::string run(const std::string& name, const std::string& model, double lr, int64_t steps = 12,
                  const std::string& dtype = "float32", double momentum = 0, double wd = 0) {
    TrainConfig c;
    c.data_dir = (tmp_ / "data").string();
    c.model = model;
    c.steps = steps;
    c.batch = 10;
    c.lr = lr;
    c.dtype = dtype;
    c.momentum = momentum;
    c.weight_decay = wd;
    c.checkpoint_every = 5;
    c.seed = 3;
    c.out = (tmp_ / name).string();
    train(c, "");
    return c.out;
  }
  AnalyzeConfig config(const std::string& run_dir) const {
    AnalyzeConfig a;
    a.run = run_dir;
    a.out = (tmp_ / (fs::path(run_dir).filename().string() + "-analysis")).string();
    a.probes = 6;
    return a;
  }
  static double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }
  testing::TempDir tmp_;
};

TEST_F(AnalyzerTest, LinearModelHasNoResidual) {
  const AnalysisResult r = analyze(config(run("lin", "linear", 0.5, 12, "float32", 0.9, 1e-3)));
  for (int64_t k = 0; k < r.r.size(0); ++k) {
    EXPECT_LE(max_abs(r.r[k]), 1e-12 * max_abs(r.d[k])) << "step " << k;
  }
  EXPECT_LT(r.identity_error, 1e-12);
  EXPECT_LT(r.kernel_split_error, 1e-10);
}

// The zoo's route (forward-mode K and F, the per-example split on every check_every-th analyzed
// step) against the explicit route (per-row Jacobians everywhere, checked on every step): every
// exported array agrees to rounding, on a ReLU CNN with momentum and weight decay; the split was
// checked on exactly the sampled steps.
TEST_F(AnalyzerTest, ForwardModeRouteEqualsExplicitJacobianRoute) {
  const std::string dir = run("cnnmom", "cnn:2,3:relu", 0.1, 11, "float32", 0.9, 1e-3);
  AnalyzeConfig a = config(dir);
  a.check_every = 4;
  a.exact_nodes = 2;
  const AnalysisResult fast = analyze(a);
  a.kernel_route = "explicit";
  a.products = "rows";  // the probes' gradient rows, one backward each: the reference
  a.out += "-explicit";
  const AnalysisResult slow = analyze(a);
  a.products = "double-backward";  // the explicit route's Jacobian-vector products
  a.out += "-db";
  const AnalysisResult db = analyze(a);
  EXPECT_EQ(db.products, "double-backward");
  EXPECT_EQ(slow.products, "rows");
  EXPECT_EQ(fast.kernel_split_checked, 3);  // steps 0, 4, 8 of 11
  EXPECT_EQ(slow.kernel_split_checked, 11);
  EXPECT_LT(fast.kernel_split_error, 1e-12);
  // Each difference against the scale of the whole change (|F|, |D|), never against a part that
  // may itself be rounding: U and Uopt_wd are parts of F, Kexact of D.
  const double whole = std::max(max_abs(slow.f), max_abs(slow.d));
  auto agree = [whole](const at::Tensor& x, const at::Tensor& y) {
    return (x - y).abs().max().item<double>() <= 1e-12 * whole;
  };
  EXPECT_TRUE(agree(fast.k, slow.k));
  EXPECT_TRUE(agree(fast.f, slow.f));
  EXPECT_TRUE(agree(fast.kopt, slow.kopt));
  EXPECT_TRUE(agree(fast.u, slow.u));
  EXPECT_TRUE(agree(fast.uopt_wd, slow.uopt_wd));
  EXPECT_TRUE(agree(fast.kexact, slow.kexact));
  EXPECT_TRUE(agree(fast.koptexact, slow.koptexact));
  EXPECT_TRUE(at::equal(fast.d, slow.d));
  for (at::Tensor AnalysisResult::*q : {&AnalysisResult::k, &AnalysisResult::f, &AnalysisResult::kopt, &AnalysisResult::u,
                                        &AnalysisResult::uopt_wd, &AnalysisResult::kexact, &AnalysisResult::koptexact}) {
    EXPECT_TRUE(agree(db.*q, slow.*q));
  }
  EXPECT_EQ(db.kernel_split_checked, 3);
}

// explain's per-example split K_{k,m} on the explicit route (Jacobian-vector products for K and
// F, the rows only for the split): formed a probe at a time (rows_memory of one byte), and all at
// once, it equals the factorized route's on every step; the CNN's rows come from one batched
// backward per probe (conv, ReLU, max-pool and linear layers all have batching rules).
TEST_F(AnalyzerTest, ExplicitSplitInBoundedBlocksEqualsTheFactorizedSplit) {
  const std::string dir = run("cnnblocks", "cnn:2,3:relu", 0.1, 6, "float32", 0.9);
  auto split_of = [&](const std::string& route, int64_t rows_memory, std::string* rows_used) {
    AnalyzeConfig a = config(dir);
    a.kernel_route = route;
    a.products = route == "explicit" ? "double-backward" : "auto";
    a.rows_memory = rows_memory;
    a.out += "-" + route + std::to_string(rows_memory);
    std::vector<at::Tensor> k_per;
    a.on_step = [&](const StepTerms& t) { k_per.push_back(t.k_per.clone()); };
    const AnalysisResult r = analyze(a);
    if (rows_used) *rows_used = r.rows_used;
    return at::stack(k_per);
  };
  std::string used;
  const at::Tensor want = split_of("auto", AnalyzeConfig{}.rows_memory, nullptr);
  const at::Tensor one = split_of("explicit", 1, &used), all = split_of("explicit", AnalyzeConfig{}.rows_memory, nullptr);
  EXPECT_NE(used.find("as a batch"), std::string::npos) << used;
  const double scale = max_abs(want);
  EXPECT_LE(max_abs(one - want), 1e-12 * scale);
  EXPECT_LE(max_abs(all - want), 1e-12 * scale);
}

// Issue 13: split at the kinks, the exact path kernel reproduces D to 1e-12 on ReLU and max-pool
// models at lr 0.1, where the plain Q-node rule leaves far more; the kinks are counted.
TEST_F(AnalyzerTest, KinkSplitExactKernelReproducesDOnReluModels) {
  for (const char* spec : {"mlp:16:relu", "mlp:8,6:leaky_relu", "cnn:2,3:relu"}) {
    const std::string dir = run(std::string("kinks-") + spec[0] + spec[4], spec, 0.1, 8);
    AnalyzeConfig a = config(dir);
    a.exact_nodes = 2;
    const AnalysisResult plain = analyze(a);
    a.kink_split = true;
    a.out += "-kinks";
    const AnalysisResult split = analyze(a);
    double worst_plain = 0, worst_split = 0, kinks = 0;
    for (size_t k = 0; k < split.steps.size(); ++k) {
      worst_plain = std::max(worst_plain, plain.steps[k].quad_error / plain.steps[k].d_norm);
      worst_split = std::max(worst_split, split.steps[k].quad_error / split.steps[k].d_norm);
      EXPECT_FALSE(std::isnan(split.steps[k].kinks_batch)) << spec;
      EXPECT_GE(split.steps[k].kink_pieces, 1.0) << spec;
      kinks += split.steps[k].kinks_probes;
      EXPECT_TRUE(std::isnan(plain.steps[k].kinks_probes)) << spec;
    }
    EXPECT_LT(worst_split, 1e-12) << spec << " plain " << worst_plain;
    EXPECT_GT(worst_plain, 1e-9) << spec;  // the test would fail without the split
    EXPECT_GT(kinks, 0) << spec;
    EXPECT_TRUE(at::equal(plain.d, split.d)) << spec;
    // --kinks-max 2: the steps on which an example crosses two kinks or more are not walked, and
    // their exact kernel is the plain rule's; the quadrature gate leaves them out.
    a.kinks_max = 2;
    a.out += "-max";
    const AnalysisResult capped = analyze(a);
    int64_t skipped = 0;
    for (size_t k = 0; k < split.steps.size(); ++k) {
      if (!std::isnan(capped.steps[k].kinks_probes)) {
        EXPECT_EQ(capped.steps[k].kinks_probes, split.steps[k].kinks_probes) << spec;
        EXPECT_EQ(capped.steps[k].kinks_batch, split.steps[k].kinks_batch) << spec;
        continue;
      }
      ++skipped;
      EXPECT_TRUE(std::isnan(capped.steps[k].kinks_batch)) << spec;
      EXPECT_TRUE(at::equal(capped.kexact[static_cast<int64_t>(k)], plain.kexact[static_cast<int64_t>(k)])) << spec;
      EXPECT_GT(split.steps[k].kinks_probes + split.steps[k].kinks_batch, 1.0) << spec;
    }
    EXPECT_GT(skipped, 0) << spec;
    EXPECT_EQ(capped.kinks_skipped, skipped) << spec;
    a.kinks_max = 0;
    // --kinks without --exact: the same counts, no exact kernel.
    a.exact_nodes = 0;
    a.out += "-count";
    const AnalysisResult counted = analyze(a);
    ASSERT_EQ(counted.steps.size(), split.steps.size());
    EXPECT_FALSE(counted.kexact.defined()) << spec;
    for (size_t k = 0; k < split.steps.size(); ++k) {
      EXPECT_EQ(counted.steps[k].kinks_probes, split.steps[k].kinks_probes) << spec;
      EXPECT_EQ(counted.steps[k].kinks_batch, split.steps[k].kinks_batch) << spec;
    }
  }
}

// --kinks counts the batch's kinks; on one hidden layer (pre-activations linear in t) they are
// the units whose sign differs between w_k and w_{k+1}: two plain forwards of the batch from the
// run's checkpoint files. --kinks-examples N walks the first N examples of the batch.
TEST_F(AnalyzerTest, BatchKinksEqualSignChangesBetweenTheCheckpoints) {
  const std::string dir = run("batchkinks", "mlp:16:relu", 2.0, 1);
  const RunDir run_dir(dir);
  const Dataset train_set = load_split(tmp_ / "data", "train");
  auto changes = [&](const at::Tensor& idx) {
    auto m = models::build_model(models::parse_model_spec("mlp:16:relu"), {1, 8, 8}, 3);
    m->to(at::kDouble);
    m->set_kink_mode(models::KinkMode::kRecord);
    const at::Tensor x = to_inputs(train_set.images.index_select(0, idx), at::kDouble, {});
    at::Tensor before;
    for (int64_t k : {0, 1}) {
      at::NoGradGuard ng;
      for (const auto& [name, t] : load_tensor_dict(run_dir.checkpoint(k))) m->named_parameters()[name].copy_(t);
      m->forward(x);
      if (k == 0) before = m->kink_sites()[0].pattern.clone();
    }
    return static_cast<double>(m->kink_sites()[0].pattern.ne(before).sum().item<int64_t>());
  };
  for (int64_t cap : {0, 4}) {
    AnalyzeConfig a = config(dir);
    a.kink_split = true;
    a.kinks_examples = cap;
    a.out += "-" + std::to_string(cap);
    at::Tensor batch;
    a.on_step = [&](const StepTerms& t) { batch = t.batch.clone(); };
    const AnalysisResult r = analyze(a);
    ASSERT_EQ(r.steps.size(), 1u);
    ASSERT_EQ(batch.size(0), 10);
    const double expected = changes(cap > 0 ? batch.narrow(0, 0, cap) : batch);
    EXPECT_GT(expected, 0) << cap;
    EXPECT_EQ(r.steps[0].kinks_batch, expected) << cap;
  }
}

// A kink three layers deep has a cubic pre-activation the walk does not solve: refused, naming
// the model.
TEST_F(AnalyzerTest, KinkSplitRefusesWhatItCannotSolve) {
  AnalyzeConfig a = config(run("deep", "mlp:4,3,3:relu", 0.1, 2));
  a.exact_nodes = 2;
  a.kink_split = true;
  try {
    analyze(a);
    FAIL() << "a kink three layers deep was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("mlp:4,3,3:relu"), std::string::npos) << e.what();
  }
}

// --sharpness: lambda_max of the training subset's loss at w_k equals the explicit Hessian's
// largest eigenvalue, computed here from the run's checkpoint; the cosine between consecutive
// batch gradients equals autograd's.
TEST_F(AnalyzerTest, SharpnessAndGradientCosinesEqualIndependentRoutes) {
  const std::string dir = run("sharp", "mlp:4:tanh", 0.5, 11);
  AnalyzeConfig a = config(dir);
  a.sharpness_every = 5;
  a.sharpness_examples = 30;
  std::map<int64_t, at::Tensor> batches;
  a.on_step = [&](const StepTerms& t) { batches[t.step] = t.batch.clone(); };
  const AnalysisResult r = analyze(a);
  ASSERT_EQ(r.steps.size(), 11u);
  const RunDir run_dir(dir);
  const Dataset train_set = load_split(tmp_ / "data", "train");
  const at::Tensor xs = to_inputs(train_set.images.slice(0, 0, 30), at::kDouble, {});
  const at::Tensor ys = train_set.labels.slice(0, 0, 30);
  for (int64_t k : {0, 5, 10}) {
    ASSERT_FALSE(std::isnan(r.steps[k].lambda_train)) << k;
    auto m = models::build_model(models::parse_model_spec("mlp:4:tanh"), {1, 8, 8}, 3);
    m->to(at::kDouble);
    {
      at::NoGradGuard ng;
      for (const auto& [name, t] : load_tensor_dict(run_dir.checkpoint(k))) {
        m->named_parameters()[name].copy_(t);
      }
    }
    const double top = at::linalg_eigvalsh(explicit_hessian(*m, xs, ys, LossKind::kCrossEntropy)).max().item<double>();
    EXPECT_NEAR(r.steps[k].lambda_train, top, 1e-8 * std::abs(top)) << k;
    // The batch's (10 of the run's examples, not the subset): its own Hessian.
    const at::Tensor& bi = batches.at(k);
    const at::Tensor xb = to_inputs(train_set.images.index_select(0, bi), at::kDouble, {});
    const double top_b =
        at::linalg_eigvalsh(explicit_hessian(*m, xb, train_set.labels.index_select(0, bi), LossKind::kCrossEntropy))
            .max()
            .item<double>();
    EXPECT_NEAR(r.steps[k].lambda_batch, top_b, 1e-8 * std::abs(top_b)) << k;
    EXPECT_FALSE(std::isnan(r.steps[k].subset_loss_after)) << k;
  }
  EXPECT_TRUE(std::isnan(r.steps[1].lambda_train));
  EXPECT_TRUE(std::isnan(r.steps[0].grad_cos));
  for (size_t k = 1; k < r.steps.size(); ++k) {
    EXPECT_GE(r.steps[k].grad_cos, -1.0);
    EXPECT_LE(r.steps[k].grad_cos, 1.0);
  }
  // Every other step: the cosine is still between consecutive steps' gradients.
  AnalyzeConfig b = config(dir);
  b.every = 2;
  b.out += "-every2";
  const AnalysisResult r2 = analyze(b);
  for (size_t i = 1; i < r2.steps.size(); ++i) {
    EXPECT_NEAR(r2.steps[i].grad_cos, r.steps[static_cast<size_t>(r2.steps[i].step)].grad_cos, 1e-12) << i;
  }
}

TEST_F(AnalyzerTest, BalancedProbesTakeEachClassInTurn) {
  AnalyzeConfig c = config(run("bal", "linear", 0.1, 2));
  c.probes = 7;
  c.balanced = true;
  const AnalysisResult r = analyze(c);
  // Against the labels as read from the IDX file: 3 classes -> 3, 2, 2 probes.
  const at::Tensor labels = load_split(tmp_ / "data", "test").labels;
  std::vector<int64_t> per_class(3, 0);
  ASSERT_EQ(r.probe_indices.size(), 7u);
  for (size_t i = 0; i < r.probe_indices.size(); ++i) {
    const int64_t y = labels[r.probe_indices[i]].item<int64_t>();
    EXPECT_EQ(r.probe_labels[i], y);
    ++per_class[static_cast<size_t>(y)];
  }
  EXPECT_EQ(per_class, (std::vector<int64_t>{3, 2, 2}));
  EXPECT_TRUE(std::is_sorted(r.probe_indices.begin(), r.probe_indices.end()));
}

TEST_F(AnalyzerTest, QuadraticModelResidualIsExactlySecondOrder) {
  AnalyzeConfig a = config(run("quad", "quadratic:5", 0.3));
  a.second_order = true;
  const AnalysisResult r = analyze(a);
  for (int64_t k = 0; k < r.r.size(0); ++k) {
    EXPECT_GT(max_abs(r.r[k]), 0.0);
    EXPECT_LE(max_abs(r.r[k] - r.s[k]), 1e-9 * max_abs(r.d[k])) << "step " << k;
  }
}

TEST_F(AnalyzerTest, KernelTermEqualsExplicitJacobianRouteFromCheckpoints) {
  const std::string dir = run("mlp", "mlp:7:tanh", 0.2, 10, "float32", 0.5, 1e-2);
  const AnalysisResult r = analyze(config(dir));
  EXPECT_LT(r.kernel_split_error, 1e-10);
  EXPECT_LT(r.identity_error, 1e-12);
  // Independently, at checkpointed step 5: the model in float64 from step_5.pt and step_6 by
  // training's own log, K = -a_5 J_probe . grad L_5 with explicit Jacobians.
  const RunDir run_dir(dir);
  const auto log = read_step_log(run_dir.steps_log());
  at::manual_seed(0);
  auto model = models::build_model(models::parse_model_spec("mlp:7:tanh"), {1, 8, 8}, 3);
  model->to(at::kDouble);
  {
    at::NoGradGuard ng;
    const NamedTensors w = load_tensor_dict(run_dir.checkpoint(5));
    auto params = model->named_parameters();
    for (const auto& [name, t] : w) params[name].copy_(t);
  }
  const Dataset train_set = load_split(tmp_ / "data", "train"), test_set = load_split(tmp_ / "data", "test");
  const at::Tensor pidx = at::tensor(r.probe_indices, at::kLong);
  const at::Tensor xp = to_inputs(test_set.images.index_select(0, pidx), at::kDouble, {});
  const at::Tensor bidx = at::tensor(log[5]["batch"].get<std::vector<int64_t>>(), at::kLong);
  const at::Tensor xb = to_inputs(train_set.images.index_select(0, bidx), at::kDouble, {});
  const at::Tensor jp = explicit_probe_jacobian(*model, xp, {0, 1, 2});
  const at::Tensor jb = explicit_loss_jacobian(*model, xb, train_set.labels.index_select(0, bidx), LossKind::kCrossEntropy);
  const at::Tensor grad_l = jb.mean(0);
  const at::Tensor k_explicit = at::mv(jp, grad_l).mul(-log[5]["lr"].get<double>()).reshape({-1, 3});
  EXPECT_LE(max_abs(r.k[5] - k_explicit), 1e-10 * max_abs(k_explicit));
}

TEST_F(AnalyzerTest, UpdateTermSplitsIntoWeightDecayAndMomentum) {
  // In float64 training the stored update has no float32 rounding: U is U_wd + U_mom alone.
  const AnalysisResult r = analyze(config(run("mom64", "mlp:6:tanh", 0.1, 10, "float64", 0.9, 1e-2)));
  for (const auto& s : r.steps) {
    if (s.step == 0) {
      EXPECT_EQ(s.u_mom_norm, 0.0) << "v_{-1} = 0";
    } else {
      EXPECT_GT(s.u_mom_norm, 0.0);
    }
    EXPECT_GT(s.u_wd_norm, 0.0);
    EXPECT_LE(s.u_round_norm, 1e-9 * s.f_norm) << "step " << s.step;  // a part of F, against F
  }
  // In float32 the rounding of the stored update is a source of its own.
  const AnalysisResult r32 = analyze(config(run("plain32", "mlp:6:tanh", 0.1, 10)));
  for (const auto& s : r32.steps) {
    EXPECT_GT(s.u_round_norm, 0.0);
    EXPECT_LT(s.u_round_norm, 1e-4 * s.f_norm);
  }
}

TEST_F(AnalyzerTest, ResidualRatioGrowsLinearlyWithLearningRate) {
  // SPEC invariant 6: |R|/|F| ~ lr, slope about 1 on a log-log plot from 1e-4 to 1e-1.
  std::vector<double> x, y;
  for (double lr : {1e-4, 1e-3, 1e-2, 1e-1}) {
    const AnalysisResult r = analyze(config(run("lr" + std::to_string(lr), "mlp:6:tanh", lr, 8)));
    std::vector<double> rs;
    for (const auto& s : r.steps) rs.push_back(s.r);
    std::sort(rs.begin(), rs.end());
    x.push_back(std::log(lr));
    y.push_back(std::log(rs[rs.size() / 2]));
  }
  double mx = 0, my = 0;
  for (size_t i = 0; i < x.size(); ++i) mx += x[i] / x.size(), my += y[i] / y.size();
  double sxy = 0, sxx = 0;
  for (size_t i = 0; i < x.size(); ++i) sxy += (x[i] - mx) * (y[i] - my), sxx += (x[i] - mx) * (x[i] - mx);
  const double slope = sxy / sxx;
  EXPECT_GT(slope, 0.8);
  EXPECT_LT(slope, 1.2);
}

TEST_F(AnalyzerTest, QuadratureErrorFallsWithNodesAndExactKernelClosesTheStep) {
  const std::string dir = run("big", "mlp:6:tanh", 2.0, 4);
  std::vector<double> errs;
  for (int64_t q : {1, 2, 3, 5, 12}) {
    AnalyzeConfig a = config(dir);
    a.exact_nodes = q;
    a.step_begin = 2;
    a.step_end = 3;
    const AnalysisResult r = analyze(a);
    errs.push_back(r.steps[0].quad_error);
    if (q == 12) {
      // D = sum_m Kexact_m + Uexact exactly for the exact gbar; the gap is the quadrature error,
      // which Gauss-Legendre drives down exponentially on this smooth (tanh) path.
      EXPECT_LE(max_abs(r.d[0] - r.kexact[0] - r.uexact[0]), 1e-10 * max_abs(r.d[0]));
    }
  }
  for (size_t i = 1; i < errs.size(); ++i) EXPECT_LT(errs[i], errs[i - 1]) << "Q index " << i;
  EXPECT_LT(errs.back(), 1e-8 * errs.front());
}

TEST_F(AnalyzerTest, ExplicitJacobianRouteGivesTheSameAnalysis) {
  for (const char* spec : {"mlp:5:softplus", "cnn:2,2:tanh"}) {
    const std::string dir = run(std::string("route-") + spec[0], spec, 0.2, 4, "float32", 0.9, 1e-3);
    AnalyzeConfig a = config(dir);
    a.probes = 3;
    a.exact_nodes = 2;
    const AnalysisResult fast = analyze(a);
    a.kernel_route = "explicit";
    const AnalysisResult slow = analyze(a);
    const double whole = std::max(max_abs(slow.f), max_abs(slow.d));  // U and R are parts of it
    for (const auto& [x, y] : {std::pair{fast.k, slow.k}, {fast.f, slow.f}, {fast.u, slow.u}, {fast.r, slow.r},
                               {fast.kexact, slow.kexact}}) {
      EXPECT_LE(max_abs(x - y), 1e-10 * whole) << spec;
    }
  }
}

// --threads 2 gives the analysis of one thread: the replayed steps run with the BLAS threads the
// run was trained with (OpenBLAS rounds differently with another count; without that the
// replayed weights drift from the checkpoints' by float rounding), the analysis with its own.
// The sizes are large enough for OpenBLAS to split its products over two threads.
TEST_F(AnalyzerTest, TwoThreadsGiveTheAnalysisOfOne) {
  testing::write_synthetic_idx(tmp_ / "data28", 256, 40, 28, 10);
  TrainConfig c;
  c.data_dir = (tmp_ / "data28").string();
  c.model = "mlp:64:tanh";
  c.steps = 14;
  c.batch = 32;
  c.checkpoint_every = 7;
  c.out = (tmp_ / "threads-run").string();
  train(c, "");
  AnalyzeConfig a = config(c.out);
  a.probes = 32;
  const AnalysisResult one = analyze(a);
  a.threads = 2;
  const AnalysisResult two = analyze(a);
  EXPECT_EQ(one.threads, 1);
  EXPECT_EQ(two.threads, 2);
  // Against the scale of the whole change: on plain SGD U is rounding alone (max|U| 6.9e-8 on an
  // AMD EPYC's Cooperlake kernels), so a tolerance relative to U itself measured noise by noise.
  const double whole = std::max(max_abs(one.f), max_abs(one.d));
  for (const auto& [x, y] : {std::pair{one.d, two.d}, {one.f, two.f}, {one.k, two.k}, {one.u, two.u}, {one.r, two.r}}) {
    EXPECT_LE(max_abs(x - y), 1e-12 * whole);
  }
}

TEST(GaussLegendreTest, IntegratesPolynomialsExactly) {
  const auto [x2, w2] = gauss_legendre(2);
  EXPECT_NEAR(x2[0], 0.5 - 0.5 / std::sqrt(3.0), 1e-15);
  EXPECT_NEAR(x2[1], 0.5 + 0.5 / std::sqrt(3.0), 1e-15);
  for (int64_t q : {1, 3, 7, 16}) {
    const auto [x, w] = gauss_legendre(q);
    for (int deg = 0; deg <= 2 * q - 1; ++deg) {
      double sum = 0;
      for (size_t i = 0; i < x.size(); ++i) sum += w[i] * std::pow(x[i], deg);
      EXPECT_NEAR(sum, 1.0 / (deg + 1), 1e-14) << "q " << q << " degree " << deg;
    }
  }
}

TEST(ComplexStepsTest, TauAndOutlierRules) {
  std::vector<StepRow> steps(40);
  for (size_t k = 0; k < steps.size(); ++k) steps[k].r = 0.2 + 0.01 * static_cast<double>(k % 3);
  steps[30].r = 0.9;  // a spike
  AnalyzeConfig c;
  c.tau = 0.215;
  mark_complex_steps(steps, c);
  int64_t n = 0;
  for (const auto& s : steps) n += s.in_tc;
  EXPECT_EQ(n, 14);  // the r = 0.22 steps and the spike
  c.tc_rule = "outlier";
  c.tc_window = 20;
  mark_complex_steps(steps, c);
  for (size_t k = 0; k < steps.size(); ++k) EXPECT_EQ(steps[k].in_tc, k == 30) << "step " << k;
}

TEST_F(AnalyzerTest, WritesFilesAndRejectsBadSettings) {
  const std::string dir = run("files", "cnn:2,3:relu", 0.1, 6);
  AnalyzeConfig a = config(dir);
  a.second_order = true;
  const AnalysisResult r = analyze(a);
  write_analysis(r, a);
  for (const char* f : {"steps.csv", "probes.csv", "summary.json", "arrays/D.npy", "arrays/R.npy", "arrays/S.npy"}) {
    EXPECT_TRUE(fs::exists(fs::path(a.out) / f)) << f;
  }
  EXPECT_EQ(r.d.sizes(), (std::vector<int64_t>{6, 6, 3}));
  EXPECT_THROW_WITH(write_analysis(r, a), InputError, "already exists");
  a.step_end = 99;
  EXPECT_THROW_WITH(analyze(a), InputError, "outside the run's steps");
  a = config(dir);
  testing::write_file(tmp_ / "probes.txt", "1\n2\n77\n", false);
  a.probe_indices_file = (tmp_ / "probes.txt").string();
  EXPECT_THROW_WITH(analyze(a), InputError, "probe index 77 is outside");
  a = config(dir);
  a.outputs = "true";
  const AnalysisResult t = analyze(a);
  EXPECT_EQ(t.d.size(2), 1);
  for (int64_t p = 0; p < 6; ++p) EXPECT_EQ(t.outputs[p][0].item<int64_t>(), t.probe_labels[p]);
}

}  // namespace
}  // namespace pathkernel
