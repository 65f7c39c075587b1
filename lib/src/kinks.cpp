#include "pathkernel/kinks.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "pathkernel/analyzer.h"

namespace pathkernel {
namespace {

constexpr double kAfter = 1e-9;          // the pattern of a piece is read this far into it
constexpr int64_t kMaxPieces = 1000000;  // a bound on the walk, far beyond any real step

void set_weights_at(models::Model& model, const ParamMap& w0, const ParamMap& dw, double t) {
  at::NoGradGuard ng;
  for (const auto& item : model.named_parameters()) item.value().copy_(w0.at(item.key()) + dw.at(item.key()) * t);
}

/// The smallest root in (0, 1] of c0 + c1 s + c2 s^2 per unit (c2 undefined: linear), or +inf.
/// Coefficients below `tiny` times the unit's scale count as zero.
at::Tensor first_root(const at::Tensor& c0, const at::Tensor& c1, const at::Tensor& c2, const at::Tensor& scale) {
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor tiny = scale * 1e-13;
  auto in_range = [&](const at::Tensor& s) { return at::where((s > 1e-14) & (s <= 1.0), s, inf); };
  // Linear: s = -c0 / c1.
  const at::Tensor lin = in_range(at::where(c1.abs() > tiny, -c0 / c1, inf));
  if (!c2.defined()) return lin;
  // Quadratic, in the stable form: q = -(c1 + sign(c1) sqrt(disc)) / 2; roots q / c2 and c0 / q.
  const at::Tensor disc = c1 * c1 - 4.0 * c2 * c0;
  const at::Tensor sq = at::sqrt(at::clamp_min(disc, 0.0));
  const at::Tensor sign = at::where(c1 >= 0, 1.0, -1.0);
  const at::Tensor q = -0.5 * (c1 + sign * sq);
  const at::Tensor r1 = in_range(at::where(c2.abs() > tiny, q / c2, inf));
  const at::Tensor r2 = in_range(at::where(q.abs() > 0, c0 / q, inf));
  const at::Tensor quad = at::where(disc >= 0, at::minimum(r1, r2), inf);
  return at::where(c2.abs() > tiny, quad, lin);
}

}  // namespace

bool has_kinks(models::Model& model) {
  const models::ModelSpec& s = model.spec();
  const bool act = s.activation == "relu" || s.activation == "leaky_relu";
  if (s.kind == "cnn") return true;
  return s.kind == "mlp" && act;
}

int64_t nodes_needed(models::Model& model) {
  const int64_t layers = static_cast<int64_t>(model.taps().size());
  return std::max<int64_t>(1, (layers + 1) / 2);
}

std::pair<std::vector<double>, std::vector<double>> piecewise_nodes(const std::vector<double>& breaks, int64_t q) {
  const auto [x, w] = gauss_legendre(q);
  std::vector<double> nodes, weights;
  for (size_t i = 0; i + 1 < breaks.size(); ++i) {
    const double a = breaks[i], len = breaks[i + 1] - breaks[i];
    if (!(len > 0)) continue;
    for (size_t j = 0; j < x.size(); ++j) {
      nodes.push_back(a + len * x[j]);
      weights.push_back(len * w[j]);
    }
  }
  return {nodes, weights};
}

int64_t pattern_changes(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x) {
  at::NoGradGuard ng;
  std::vector<at::Tensor> before;
  int64_t changes = 0;
  model.set_kink_mode(models::KinkMode::kRecord);
  for (double t : {0.0, 1.0}) {
    set_weights_at(model, w0, dw, t);
    model.forward(x);
    if (t == 0.0) {
      for (const auto& s : model.kink_sites()) before.push_back(s.pattern.clone());
    } else {
      for (size_t i = 0; i < before.size(); ++i) changes += model.kink_sites()[i].pattern.ne(before[i]).sum().item<int64_t>();
    }
  }
  model.set_kink_mode(models::KinkMode::kOff);
  set_weights_at(model, w0, dw, 0.0);
  return changes;
}

KinkWalk walk_kinks(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x) {
  at::NoGradGuard ng;
  KinkWalk walk;
  walk.breaks.push_back(0.0);
  std::vector<at::Tensor> previous;  // the last piece's patterns
  struct Restore {
    models::Model& m;
    const ParamMap& w0;
    ~Restore() {
      m.set_kink_mode(models::KinkMode::kOff);
      at::NoGradGuard g;
      for (const auto& item : m.named_parameters()) item.value().copy_(w0.at(item.key()));
    }
  } restore{model, w0};
  double t = 0.0;
  for (int64_t piece = 0;; ++piece) {
    if (piece > kMaxPieces) throw std::runtime_error("kink walk: more than a million pieces in one step");
    const double ta = std::min(1.0, t + kAfter);
    set_weights_at(model, w0, dw, ta);
    model.set_kink_mode(models::KinkMode::kRecord);
    model.forward(x);
    std::vector<models::KinkSite>& sites = model.kink_sites();
    if (piece == 0) {
      for (const auto& s : sites) {
        if (s.degree > 2) {
          throw std::invalid_argument("kink splitting solves kinks up to two layers deep; model '" +
                                      model.spec().str() + "' has one " + std::to_string(s.degree) + " layers deep");
        }
      }
    }
    if (!previous.empty()) {
      for (size_t i = 0; i < sites.size(); ++i) walk.kinks += sites[i].pattern.ne(previous[i]).sum().item<int64_t>();
    }
    previous.clear();
    int64_t degree = 1;
    for (const auto& s : sites) {
      previous.push_back(s.pattern.clone());
      degree = std::max(degree, s.degree);
    }
    if (ta >= 1.0) break;
    // The frozen network's site values at degree + 1 Chebyshev points of s in [0, 1], t = ta + s (1 - ta).
    const int64_t n = degree + 1;
    std::vector<double> sn(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) sn[j] = 0.5 - 0.5 * std::cos(M_PI * (2.0 * j + 1.0) / (2.0 * n));
    std::vector<std::vector<at::Tensor>> values(sites.size());
    model.set_kink_mode(models::KinkMode::kFrozen);
    for (int64_t j = 0; j < n; ++j) {
      set_weights_at(model, w0, dw, ta + sn[j] * (1.0 - ta));
      model.forward(x);
      for (size_t i = 0; i < sites.size(); ++i) values[i].push_back(model.kink_sites()[i].values.reshape({-1}));
    }
    // Monomial coefficients in s per unit: solve the Vandermonde system once for all units.
    at::Tensor vander = at::empty({n, n}, at::kDouble);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t k = 0; k < n; ++k) vander[j][k] = std::pow(sn[j], static_cast<double>(k));
    }
    const at::Tensor inv = at::linalg_inv(vander);
    double s_min = std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < sites.size(); ++i) {
      const at::Tensor v = at::stack(values[i]).to(at::kDouble);  // [n, U]
      const at::Tensor coef = at::mm(inv, v);                     // [n, U]
      const at::Tensor scale = v.abs().amax(0);
      const int64_t d = std::min<int64_t>(sites[i].degree, n - 1);
      const at::Tensor root = first_root(coef[0], coef[1], d >= 2 ? coef[2] : at::Tensor(), scale);
      s_min = std::min(s_min, root.min().item<double>());
    }
    if (!std::isfinite(s_min)) break;
    t = ta + s_min * (1.0 - ta);
    walk.breaks.push_back(t);
  }
  walk.breaks.push_back(1.0);
  return walk;
}

}  // namespace pathkernel
