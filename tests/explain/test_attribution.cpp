// The kernel-machine view through optimizers with memory or a preconditioner (SPEC, "Optimizers
// with memory or a preconditioner"), against an independent explicit route: every step's
// weights and optimizer state read from the checkpoint files, explicit Jacobians, the
// coefficients c_{k,j} in closed form, and the double sum over j <= k done directly.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <functional>

#include "fixtures.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/idx.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/trainer.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

struct Setting {
  const char* name;
  std::function<void(TrainConfig&)> set;
};

/// c_{k,j} of torch.optim's rules, written out (not through Optimizer::linear_update).
double coefficient(const TrainConfig& c, int64_t k, int64_t j) {
  if (c.optimizer == "rmsprop") {  // the buffer holds preconditioned gradients: P_j stays with j
    return c.momentum == 0 ? (j == k ? 1.0 : 0.0) : std::pow(c.momentum, static_cast<double>(k - j));
  }
  if (c.optimizer == "adagrad") return j == k ? 1.0 / (1.0 + static_cast<double>(k) * c.lr_decay) : 0.0;
  if (c.optimizer == "adadelta") return j == k ? 1.0 : 0.0;
  if (c.optimizer != "sgd") {
    return (1 - c.beta1) * std::pow(c.beta1, static_cast<double>(k - j)) /
           (1 - std::pow(c.beta1, static_cast<double>(k + 1)));
  }
  if (c.momentum == 0) return j == k ? 1.0 : 0.0;
  const double s = j == 0 ? 1.0 : 1.0 - c.dampening;  // the buffer starts as the first gradient
  const double buffer = std::pow(c.momentum, static_cast<double>(k - j)) * s;
  return c.nesterov ? c.momentum * buffer + (j == k ? 1.0 : 0.0) : buffer;
}

class AttributionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    testing::write_synthetic_idx(tmp_ / "data", 40, 12, 8, 3);
  }
  TrainConfig train_run(const Setting& s, const std::string& dtype = "float32", int64_t every = 1) {
    TrainConfig c;
    c.data_dir = (tmp_ / "data").string();
    c.model = "mlp:5:tanh";
    c.steps = 9;  // a little over two epochs: examples are drawn more than once
    c.batch = 16;
    c.lr = 0.1;
    c.dtype = dtype;
    c.checkpoint_every = every;
    c.seed = 2;
    s.set(c);
    c.out = (tmp_ / (std::string(s.name) + "-" + dtype + "-" + std::to_string(every))).string();
    train(c, "");
    return c;
  }
  ExplainConfig explain_config(const TrainConfig& c, const std::string& out) const {
    ExplainConfig e;
    e.run = c.out;
    e.out = (tmp_ / out).string();
    e.probe_indices = {1, 5};
    e.output = 2;
    return e;
  }

  /// The explicit route, from the files: aopt [2, 40], Kopt and Uopt_wd [steps, 2], self-influence [40].
  struct Explicit {
    at::Tensor aopt, kopt, uopt_wd, self;
  };
  Explicit explicit_route(const TrainConfig& c) {
    const RunDir dir(c.out);
    const auto log = read_step_log(dir.steps_log());
    const int64_t n = static_cast<int64_t>(log.size());
    const Dataset train_set = load_split(tmp_ / "data", "train"), test_set = load_split(tmp_ / "data", "test");
    at::manual_seed(0);
    auto model = models::build_model(models::parse_model_spec(c.model), {1, 8, 8}, 3);
    model->to(at::kDouble);
    auto load = [&](int64_t k) {
      at::NoGradGuard ng;
      auto params = model->named_parameters();
      for (const auto& [name, t] : load_tensor_dict(dir.checkpoint(k))) params[name].copy_(t);
    };
    auto flat_weights = [&] {
      std::vector<at::Tensor> f;
      for (const auto& p : model->parameters()) f.push_back(p.detach().reshape({-1}).clone());
      return at::cat(f);
    };
    const at::Tensor xp = to_inputs(test_set.images.index_select(0, at::tensor({1, 5}, at::kLong)), at::kDouble, {});
    std::vector<at::Tensor> jp(n), jb(n), precond(n), w(n);
    std::vector<at::Tensor> batches(n);
    for (int64_t k = 0; k < n; ++k) {
      load(k);
      batches[k] = at::tensor(log[k]["batch"].get<std::vector<int64_t>>(), at::kLong);
      const at::Tensor xb = to_inputs(train_set.images.index_select(0, batches[k]), at::kDouble, {});
      jb[k] = explicit_loss_jacobian(*model, xb, train_set.labels.index_select(0, batches[k]), LossKind::kCrossEntropy);
      jp[k] = explicit_probe_jacobian(*model, xp, std::vector<int64_t>{2});
      w[k] = flat_weights();
      // P_k from the state after step k, as the state file of step k + 1 holds it (torch.optim's
      // formulas, written out here; Adadelta's also from the state before step k).
      precond[k] = at::ones_like(w[k]);
      auto slot = [&](int64_t step, const std::string& name) {
        const TrainerState st = load_trainer_state(dir.state(step));
        for (const auto& [sname, tensors] : st.optimizer_state) {
          if (sname != name) continue;
          std::vector<at::Tensor> v;
          for (const auto& [pname, t] : tensors) v.push_back(t.to(at::kDouble).reshape({-1}));
          return at::cat(v);
        }
        return at::zeros_like(w[k]);  // not kept yet (before step 0)
      };
      if (c.optimizer == "adam" || c.optimizer == "adamw") {
        const double bc2 = 1 - std::pow(c.beta2, static_cast<double>(k + 1));
        precond[k] = 1.0 / ((slot(k + 1, "exp_avg_sq") / bc2).sqrt() + c.eps);
      } else if (c.optimizer == "rmsprop") {
        at::Tensor v = slot(k + 1, "square_avg");
        if (c.centered) v = v - slot(k + 1, "grad_avg").pow(2);
        precond[k] = 1.0 / (v.sqrt() + c.eps);
      } else if (c.optimizer == "adagrad") {
        precond[k] = 1.0 / (slot(k + 1, "sum").sqrt() + c.eps);
      } else if (c.optimizer == "adadelta") {
        precond[k] = (slot(k, "acc_delta") + c.eps).sqrt() / (slot(k + 1, "square_avg") + c.eps).sqrt();
      }
    }
    const double lc = c.optimizer == "adamw" ? 0.0 : c.weight_decay, ld = c.optimizer == "adamw" ? c.weight_decay : 0.0;
    Explicit e;
    e.aopt = at::zeros({2, 40}, at::kDouble);
    e.kopt = at::zeros({n, 2}, at::kDouble);
    e.uopt_wd = at::zeros({n, 2}, at::kDouble);
    e.self = at::zeros({40}, at::kDouble);
    // RMSprop with momentum keeps P_j with gradient j (its buffer holds P_j (.) gtilde_j).
    const bool inner = c.optimizer == "rmsprop" && c.momentum > 0;
    for (int64_t k = 0; k < n; ++k) {
      const double a_k = log[k]["lr"].get<double>();
      const at::Tensor gp = inner ? jp[k] : jp[k] * precond[k];  // [2, n_params]: P_k (.) g(x; w_k)
      at::Tensor decay = w[k] * ld / precond[k];  // ld w_k sits outside P_k
      for (int64_t j = 0; j <= k; ++j) {
        const double ckj = coefficient(c, k, j);
        const double nb = static_cast<double>(batches[j].size(0));
        // Kopt_{k,j,m} = -(a_k c_{k,j} / |B_j|) < g(x; w_k), P_k (.) grad l_m(w_j) > (P_j inside)
        const at::Tensor per = at::mm(gp, (inner ? jb[j] * precond[j] : jb[j]).t()) * (-a_k * ckj / nb);  // [2, M]
        e.aopt.index_add_(1, batches[j], per);
        e.kopt[k] += per.sum(1);
        decay = decay + w[j] * (ckj * lc) * (inner ? precond[j] : at::ones_like(w[j]));
      }
      e.uopt_wd[k] = at::mv(gp, decay) * (-a_k);
      e.self.index_add_(0, batches[k], at::mv(jb[k].pow(2), precond[k]) * (a_k / static_cast<double>(batches[k].size(0))));
    }
    return e;
  }

  static double rel(const at::Tensor& a, const at::Tensor& b) {
    return (a - b).abs().max().item<double>() / std::max(1e-300, b.abs().max().item<double>());
  }
  testing::TempDir tmp_;
};

const std::vector<Setting> kMemorySettings = {
    {"momentum", [](TrainConfig& c) { c.momentum = 0.9; }},
    {"nesterov", [](TrainConfig& c) { c.momentum = 0.9, c.nesterov = true, c.weight_decay = 0.01; }},
    {"dampening", [](TrainConfig& c) { c.momentum = 0.8, c.dampening = 0.25; }},
    {"adam", [](TrainConfig& c) { c.optimizer = "adam", c.lr = 0.02, c.beta1 = 0.8, c.beta2 = 0.9; }},
    {"adam_l2", [](TrainConfig& c) { c.optimizer = "adam", c.lr = 0.02, c.weight_decay = 0.05; }},
    {"adamw", [](TrainConfig& c) { c.optimizer = "adamw", c.lr = 0.02, c.weight_decay = 0.1; }},
    {"rmsprop", [](TrainConfig& c) { c.optimizer = "rmsprop", c.lr = 0.01, c.alpha = 0.9, c.weight_decay = 0.01; }},
    {"rmsprop_centered_momentum",
     [](TrainConfig& c) { c.optimizer = "rmsprop", c.lr = 0.01, c.momentum = 0.9, c.centered = true, c.weight_decay = 0.01; }},
    {"adagrad",
     [](TrainConfig& c) {
       c.optimizer = "adagrad", c.lr = 0.1, c.lr_decay = 0.05, c.initial_accumulator = 0.1, c.weight_decay = 0.01;
       c.eps = 1e-10;
     }},
    {"adadelta", [](TrainConfig& c) { c.optimizer = "adadelta", c.lr = 1.0, c.rho = 0.9, c.eps = 1e-6, c.weight_decay = 0.01; }},
};

TEST_F(AttributionTest, AoptKoptAndDecayEqualTheExplicitDoubleSum) {
  for (const Setting& s : kMemorySettings) {
    const TrainConfig c = train_run(s);
    ExplainConfig e = explain_config(c, std::string("x-") + s.name);
    e.self_influence = true;
    const ExplainResult r = explain(e);
    ASSERT_TRUE(r.through_optimizer) << s.name;
    const Explicit x = explicit_route(c);
    EXPECT_LT(rel(r.attributions, x.aopt), 1e-10) << s.name;
    EXPECT_LT(rel(r.self_influence, x.self), 1e-10) << s.name;
    // The run identity with the optimizer's terms: sum_i aopt_i + sum Uopt + sum R = f_N - f_0.
    EXPECT_LT(r.sum_error, 1e-10) << s.name;

    AnalyzeConfig a;
    a.run = c.out;
    a.out = (tmp_ / (std::string("a-") + s.name)).string();
    a.probe_indices_file = (tmp_ / "probes.txt").string();
    testing::write_file(a.probe_indices_file, "1\n5\n", false);
    a.outputs = "class";
    a.output_class = 2;
    const AnalysisResult an = analyze(a);
    EXPECT_TRUE(an.uses_kopt);
    EXPECT_LT(rel(an.kopt.reshape({-1, 2}), x.kopt), 1e-10) << s.name;
    if (c.weight_decay != 0) {
      EXPECT_LT(rel(an.uopt_wd.reshape({-1, 2}), x.uopt_wd), 1e-10) << s.name;
    } else {
      EXPECT_EQ(an.uopt_wd.abs().max().item<double>(), 0.0) << s.name;
    }
    // With memory, Kopt is not the note's K: the momentum series moves the output too.
    EXPECT_GT(rel(an.kopt, an.k), 1e-3) << s.name;
  }
}

TEST_F(AttributionTest, RoundingIsAllThatIsLeftOnFloat32Runs) {
  for (const Setting& s : {kMemorySettings[0], kMemorySettings[3]}) {
    const TrainConfig c = train_run(s);
    const ExplainResult r = explain(explain_config(c, std::string("r-") + s.name));
    // Weight decay 0: sum Uopt is the float32 rounding of the stored updates alone.
    // Against the largest change, not each probe's own (a probe that hardly moved would divide
    // rounding by rounding).
    const double change = (r.f_final - r.f_initial).abs().max().item<double>();
    EXPECT_LT(r.sum_u.abs().max().item<double>(), 1e-4 * change) << s.name;
    EXPECT_GT(r.sum_u.abs().max().item<double>(), 0.0) << s.name << ": float32 updates round";
  }
  // In float64 the optimizer's linear form is the stored update up to float64 rounding.
  const TrainConfig c = train_run(kMemorySettings[5], "float64");
  AnalyzeConfig a;
  a.run = c.out;
  a.out = (tmp_ / "a64").string();
  a.probes = 4;
  const AnalysisResult an = analyze(a);
  EXPECT_LT(an.uopt_round.abs().max().item<double>(), 1e-12 * an.f.abs().max().item<double>());
  EXPECT_GT(an.uopt_wd.abs().max().item<double>(), 1e-6);
}

TEST_F(AttributionTest, StretchesOfCheckpointsGiveTheSameAttribution) {
  // Checkpoints every 4 steps: the backward pass replays stretch by stretch.
  const TrainConfig dense = train_run(kMemorySettings[3], "float32", 1);
  const TrainConfig sparse = train_run(kMemorySettings[3], "float32", 4);
  const ExplainResult a = explain(explain_config(dense, "dense")), b = explain(explain_config(sparse, "sparse"));
  EXPECT_TRUE(at::equal(a.attributions, b.attributions));
  EXPECT_EQ(a.drawn_at, b.drawn_at);
}

TEST_F(AttributionTest, BackwardRouteEqualsTheStepByStepRouteOnPlainSgd) {
  for (const char* model : {"mlp:5:tanh", "cnn:2,3:relu"}) {
  const TrainConfig c = train_run({model[0] == 'm' ? "sgd" : "sgd-cnn", [model](TrainConfig& c) {
                                     c.weight_decay = 0.01;
                                     c.model = model;
                                   }});
  ExplainConfig e = explain_config(c, "forward");
  e.self_influence = true;
  e.exact_nodes = model[0] == 'm' ? 4 : 0;  // explain --exact refuses the CNN's max-pool kinks
  const ExplainResult f = explain(e);
  EXPECT_FALSE(f.through_optimizer);
  e.route = "backward";
  e.out = (tmp_ / "backward").string();
  const ExplainResult b = explain(e);
  EXPECT_TRUE(b.through_optimizer);
  EXPECT_LT(rel(b.attributions, f.attributions), 1e-12) << model;
  if (e.exact_nodes > 0) {
    EXPECT_LT(rel(b.attributions_exact, f.attributions_exact), 1e-12) << model;
  }
  EXPECT_LT(rel(b.self_influence, f.self_influence), 1e-12) << model;
  EXPECT_EQ(b.drawn_at, f.drawn_at);
  }
}

TEST_F(AttributionTest, ExactVersionLeavesOnlyTheQuadratureError) {
  for (const Setting& s : {kMemorySettings[1], kMemorySettings[5]}) {
    const TrainConfig c = train_run(s);
    ExplainConfig e = explain_config(c, std::string("exact-") + s.name);
    e.exact_nodes = 6;
    const ExplainResult r = explain(e);
    EXPECT_LT(r.sum_error_exact, 1e-9) << s.name;
    EXPECT_LT(r.max_quad_error, 1e-9) << s.name;
    EXPECT_GT((r.attributions_exact - r.attributions).abs().max().item<double>(), 0.0) << s.name;
  }
}

}  // namespace
}  // namespace pathkernel
