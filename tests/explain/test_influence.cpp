// TracInCP (influence.h) against explicit per-example Jacobians at the same checkpoints.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include "fixtures.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/explain/influence.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/train/trainer.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

class InfluenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    testing::write_synthetic_idx(tmp_ / "data", 60, 20, 8, 3);
  }
  std::string train_run(const std::string& model, const std::string& loss) {
    TrainConfig c;
    c.data_dir = (tmp_ / "data").string();
    c.model = model;
    c.loss = loss;
    c.steps = 12;
    c.batch = 10;
    c.lr = 0.3;
    c.lr_schedule = "step:4:0.5";
    c.checkpoint_every = 5;
    c.out = (tmp_ / ("run-" + model.substr(0, 3) + loss)).string();
    train(c, "");
    return c.out;
  }
  testing::TempDir tmp_;
};

TEST_F(InfluenceTest, EqualsExplicitPerExampleGradientsSummedOverCheckpoints) {
  for (const auto& [spec, loss] : {std::pair{"mlp:6:tanh", "ce"}, {"cnn:2,3:relu", "mse"}}) {
    InfluenceConfig c;
    c.run = train_run(spec, loss);
    c.out = (tmp_ / "influence").string();
    c.checkpoints = "0,7,12";  // 7 is not stored: replayed
    c.train_examples = 25;
    c.probes = 4;
    c.chunk = 7;  // chunks that do not divide 25
    const InfluenceResult r = influence(c);
    ASSERT_EQ(r.influence.sizes(), (at::IntArrayRef{4, 25}));
    EXPECT_EQ(r.rates, (std::vector<double>{0.3, 0.15, 0.075}));  // steps 0, 7 and the end's last step 11

    const auto traj = open_trajectory(c.run);
    auto model = traj->make_model();
    model->to(at::kDouble);
    const at::Tensor pidx = at::tensor(r.probe_indices, at::kLong), tidx = at::arange(25, at::kLong);
    at::Tensor want = at::zeros({4, 25}, at::kDouble), want_self = at::zeros({25}, at::kDouble);
    for (size_t i = 0; i < r.checkpoints.size(); ++i) {
      const NamedTensors w = traj->weights_at(r.checkpoints[i]);  // a replay needs autograd
      {
        at::NoGradGuard ng;
        size_t j = 0;
        for (const auto& item : model->named_parameters()) item.value().copy_(w[j++].second);
      }
      const LossKind lk = parse_loss(loss);
      const at::Tensor jp = explicit_loss_jacobian(*model, traj->inputs("test", pidx, at::kDouble), traj->labels("test", pidx), lk);
      const at::Tensor jt = explicit_loss_jacobian(*model, traj->inputs("train", tidx, at::kDouble), traj->labels("train", tidx), lk);
      want.add_(at::mm(jp, jt.t()), r.rates[i]);
      want_self.add_(jt.pow(2).sum(1), r.rates[i]);
    }
    const double scale = want.abs().max().item<double>();
    EXPECT_LT((r.influence - want).abs().max().item<double>(), 1e-12 * scale) << spec;
    EXPECT_LT((r.self_influence - want_self).abs().max().item<double>(), 1e-12 * want_self.abs().max().item<double>())
        << spec;

    write_influence(r, c);
    EXPECT_TRUE(at::equal(load_npy(fs::path(c.out) / "influence.npy"), r.influence));
    EXPECT_THROW_WITH(write_influence(r, c), InputError, "already exists");
    fs::remove_all(c.out);
  }
}

TEST_F(InfluenceTest, BadCheckpointListsAreRefused) {
  EXPECT_TRUE(parse_checkpoint_list("all").empty());
  EXPECT_EQ(parse_checkpoint_list("30,0,30,7"), (std::vector<int64_t>{0, 7, 30}));
  for (const char* bad : {"", "1,,2", "-1", "1.5", "x", "3,4a"}) {
    SCOPED_TRACE(bad);
    EXPECT_THROW_WITH(parse_checkpoint_list(bad), InputError, "--checkpoints");
  }
  InfluenceConfig c;
  c.run = train_run("linear", "ce");
  c.out = (tmp_ / "i").string();
  c.checkpoints = "13";
  EXPECT_THROW_WITH(influence(c), InputError, "past the run's last step 12");
}

}  // namespace
}  // namespace pathkernel
