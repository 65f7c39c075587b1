// The kink walk against a brute-force scan of the activation patterns along the segment, and the
// piecewise quadrature nodes.
#include <ATen/ATen.h>

#include "fixtures.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/kinks.h"

namespace pathkernel {
namespace {

ParamMap weights_of(models::Model& m) {
  ParamMap w;
  for (const auto& item : m.named_parameters()) w[item.key()] = item.value().detach().clone();
  return w;
}

/// A tiny float64 model on 4x4 inputs, `rows` inputs and a long step from its initial weights
/// (many kinks), all drawn from `seed`.
struct LongStep {
  std::shared_ptr<models::Model> m;
  at::Tensor x;
  ParamMap w0, dw;
};
LongStep long_step(const char* spec, uint64_t seed, int64_t rows) {
  at::manual_seed(seed);
  LongStep s;
  s.m = models::build_model(models::parse_model_spec(spec), {1, 4, 4}, 3);
  s.m->to(at::kDouble);
  s.x = at::rand({rows, 1, 4, 4}, at::kDouble) - 0.3;
  for (const auto& item : s.m->named_parameters()) {
    s.w0[item.key()] = item.value().detach().clone();
    s.dw[item.key()] = at::randn_like(item.value()) * 0.6;
  }
  return s;
}

/// Pattern changes between consecutive points of a grid of `n` + 1 values of t, and the cells in
/// which they happened.
int64_t brute_force(models::Model& m, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x, int64_t n,
                    std::vector<int64_t>* cells) {
  at::NoGradGuard ng;
  std::vector<at::Tensor> prev;
  int64_t changes = 0;
  m.set_kink_mode(models::KinkMode::kRecord);
  for (int64_t j = 0; j <= n; ++j) {
    const double t = static_cast<double>(j) / static_cast<double>(n);
    for (const auto& item : m.named_parameters()) item.value().copy_(w0.at(item.key()) + dw.at(item.key()) * t);
    m.forward(x);
    std::vector<at::Tensor> now;
    for (const auto& s : m.kink_sites()) now.push_back(s.pattern.clone());
    if (!prev.empty()) {
      int64_t c = 0;
      for (size_t i = 0; i < now.size(); ++i) c += now[i].ne(prev[i]).sum().item<int64_t>();
      if (c > 0) cells->push_back(j);
      changes += c;
    }
    prev = now;
  }
  m.set_kink_mode(models::KinkMode::kOff);
  return changes;
}

TEST(KinksTest, WalkFindsTheKinksABruteForceScanFinds) {
  for (const char* spec : {"mlp:6:relu", "mlp:4,3:leaky_relu", "cnn:2,2:relu"}) {
    at::manual_seed(8);
    auto m = models::build_model(models::parse_model_spec(spec), {1, 4, 4}, 3);
    m->to(at::kDouble);
    const at::Tensor x = at::rand({3, 1, 4, 4}, at::kDouble) - 0.3;
    const ParamMap w0 = weights_of(*m);
    ParamMap dw;
    for (const auto& [k, v] : w0) dw[k] = at::randn_like(v) * 0.6;  // a long step: many kinks
    const KinkWalk walk = walk_kinks(*m, w0, dw, x);
    // The model is left at w0 with kink mode off.
    EXPECT_EQ(m->kink_mode(), models::KinkMode::kOff);
    for (const auto& item : m->named_parameters()) EXPECT_TRUE(at::equal(item.value(), w0.at(item.key()))) << spec;
    std::vector<int64_t> cells;
    const int64_t n = 20000;
    const int64_t brute = brute_force(*m, w0, dw, x, n, &cells);
    EXPECT_GT(brute, 3) << spec;
    EXPECT_EQ(walk.kinks, brute) << spec;
    // Every interior break lies in a grid cell where the pattern changed, and vice versa.
    ASSERT_GE(walk.breaks.size(), 2u);
    EXPECT_EQ(walk.breaks.front(), 0.0);
    EXPECT_EQ(walk.breaks.back(), 1.0);
    std::vector<int64_t> walk_cells;
    for (size_t i = 1; i + 1 < walk.breaks.size(); ++i) {
      walk_cells.push_back(static_cast<int64_t>(std::ceil(walk.breaks[i] * static_cast<double>(n))));
    }
    walk_cells.erase(std::unique(walk_cells.begin(), walk_cells.end()), walk_cells.end());
    EXPECT_EQ(walk_cells, cells) << spec;
  }
}

TEST(KinksTest, PiecewiseNodesIntegratePolynomialsPieceByPiece) {
  const auto [x, w] = piecewise_nodes({0.0, 0.25, 0.7, 1.0}, 2);
  ASSERT_EQ(x.size(), 6u);
  // |t - 1/4| t^2 is a cubic on each piece, so 2 nodes per piece are exact:
  // int_0^1 |t - 1/4| t^2 dt = 1/6 + 2 (1/768 - 1/1024).
  double s = 0;
  for (size_t i = 0; i < x.size(); ++i) s += w[i] * std::abs(x[i] - 0.25) * x[i] * x[i];
  EXPECT_NEAR(s, 1.0 / 6.0 + 2.0 * (1.0 / 768.0 - 1.0 / 1024.0), 1e-15);
  // One piece of [0, 1] is plain Gauss-Legendre.
  EXPECT_EQ(piecewise_nodes({0.0, 1.0}, 3).first, gauss_legendre(3).first);
}


/// Sites whose pattern differs between the segment's ends, summed over the inputs: two forwards.
int64_t pattern_changes(models::Model& m, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x) {
  std::vector<int64_t> cells;
  return brute_force(m, w0, dw, x, /*n=*/1, &cells);
}

// The count at the segment's ends, by two plain forwards, equals the walk's where every kink is
// of degree 1 (one hidden layer: each pre-activation is linear in t and crosses zero at most
// once) and never exceeds it.
TEST(KinksTest, PatternChangesAtTheEndsCountDegreeOneKinksExactly) {
  for (const char* spec : {"mlp:6:relu", "mlp:4,3:leaky_relu"}) {
    auto [m, x, w0, dw] = long_step(spec, /*seed=*/9, /*rows=*/5);
    const int64_t walk = walk_kinks(*m, w0, dw, x).kinks, ends = pattern_changes(*m, w0, dw, x);
    EXPECT_GT(ends, 0) << spec;
    EXPECT_LE(ends, walk) << spec;
    if (std::string(spec) == "mlp:6:relu") {
      EXPECT_EQ(ends, walk);
    }
  }
}


// Walking the rows together, each at its own t, finds for every row what walking it alone finds.
TEST(KinksTest, RowsWalkedTogetherEqualEachRowWalkedAlone) {
  for (const char* spec : {"mlp:6,4:relu", "cnn:2,2:relu"}) {
    auto [m, x, w0, dw] = long_step(spec, /*seed=*/10, /*rows=*/4);
    const RowKinks rows = walk_rows(*m, w0, dw, x);
    ASSERT_EQ(rows.kinks.size(), 4u);
    int64_t total = 0;
    for (int64_t i = 0; i < 4; ++i) {
      const KinkWalk alone = walk_kinks(*m, w0, dw, x.narrow(0, i, 1));
      EXPECT_EQ(rows.kinks[static_cast<size_t>(i)], alone.kinks) << spec << " row " << i;
      ASSERT_EQ(rows.breaks[static_cast<size_t>(i)].size() + 2, alone.breaks.size()) << spec << " row " << i;
      for (size_t j = 0; j < rows.breaks[static_cast<size_t>(i)].size(); ++j) {
        EXPECT_NEAR(rows.breaks[static_cast<size_t>(i)][j], alone.breaks[j + 1], 1e-12);
      }
      total += rows.kinks[static_cast<size_t>(i)];
    }
    EXPECT_GT(total, 4) << spec;
    EXPECT_TRUE(rows.complete);
    // A limit above every row's pieces changes nothing; one below gives up, as does one the
    // segment's ends already exceed (a row's kinks are at least its sites that differ there).
    int64_t most = 0;
    for (const auto& b : rows.breaks) most = std::max<int64_t>(most, static_cast<int64_t>(b.size()) + 1);
    const RowKinks enough = walk_rows(*m, w0, dw, x, most);
    EXPECT_TRUE(enough.complete) << spec;
    EXPECT_EQ(enough.kinks, rows.kinks) << spec;
    EXPECT_FALSE(walk_rows(*m, w0, dw, x, most - 1).complete) << spec;
    EXPECT_FALSE(walk_rows(*m, w0, dw, x, 1).complete) << spec;
  }
}

}  // namespace
}  // namespace pathkernel
