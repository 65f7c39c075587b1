#include "pathkernel/analysis/kinks.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "pathkernel/analysis/analyzer.h"

namespace pathkernel {
namespace {

constexpr double kAfter = 1e-9;          // the pattern of a piece is read this far into it
constexpr int64_t kMaxPieces = 1000000;  // a bound on the walk, far beyond any real step


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

std::vector<NodeRound> row_node_rounds(const RowKinks& rows, int64_t q) {
  std::vector<NodeRound> rounds;
  for (size_t i = 0; i < rows.breaks.size(); ++i) {
    std::vector<double> b = {0.0};
    b.insert(b.end(), rows.breaks[i].begin(), rows.breaks[i].end());
    b.push_back(1.0);
    const auto [x, w] = piecewise_nodes(b, q);
    if (rounds.size() < x.size()) rounds.resize(x.size());
    for (size_t j = 0; j < x.size(); ++j) {
      rounds[j].rows.push_back(static_cast<int64_t>(i));
      rounds[j].t.push_back(x[j]);
      rounds[j].weight.push_back(w[j]);
    }
  }
  return rounds;
}

void set_weights_along(models::Model& model, const ParamMap& w0, const ParamMap& dw, double t) {
  at::NoGradGuard ng;
  for (const auto& item : model.named_parameters()) item.value().copy_(w0.at(item.key()) + dw.at(item.key()) * t);
}

SegmentRestore::~SegmentRestore() {
  model_.set_kink_mode(models::KinkMode::kOff);
  model_.set_row_segment({});
  at::NoGradGuard ng;
  for (const auto& item : model_.named_parameters()) item.value().copy_(w0_.at(item.key()));
}

models::RowSegment segment_along(models::Model& model, const ParamMap& dw, const at::Tensor& t) {
  models::RowSegment seg;
  seg.t = t;
  for (const auto& tap : model.taps()) {
    seg.weight.push_back(dw.at(tap.name + ".weight"));
    seg.bias.push_back(tap.bias.defined() ? dw.at(tap.name + ".bias") : at::Tensor());
  }
  return seg;
}

namespace {

/// The model's forward of rows xa, each at its own point t of the segment w0 + t dw.
void forward_along(models::Model& model, const ParamMap& dw, const at::Tensor& xa, const at::Tensor& t) {
  model.set_row_segment(segment_along(model, dw, t.to(xa.scalar_type())));
  model.forward(xa);
}

/// Whether some row needs at least max_pieces pieces, known from the ends alone: each row's kinks
/// are at least its sites that differ between t = 0 and t = 1.
bool ends_need_too_many(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x,
                        int64_t max_pieces) {
  std::vector<at::Tensor> ends;
  model.set_kink_mode(models::KinkMode::kRecord);
  at::Tensor differ = at::zeros({x.size(0)}, at::kLong);
  for (double t : {0.0, 1.0}) {
    set_weights_along(model, w0, dw, t);
    model.forward(x);
    const auto& sites = model.kink_sites();
    for (size_t i = 0; i < sites.size(); ++i) {
      if (t == 0.0) {
        ends.push_back(sites[i].pattern.clone());
      } else {
        differ += sites[i].pattern.ne(ends[i]).flatten(1).sum(1);
      }
    }
  }
  return x.size(0) > 0 && differ.max().item<int64_t>() >= max_pieces;
}

/// After a forward in KinkMode::kRecord: adds to `changed` each active row's sites whose pattern
/// differs from that row's last piece, keeps the new patterns in `previous`, and returns the
/// deepest site's degree.
int64_t record_patterns(models::Model& model, bool first_round, const at::Tensor& idx,
                        std::vector<at::Tensor>& previous, at::Tensor& changed) {
  std::vector<models::KinkSite>& sites = model.kink_sites();
  int64_t degree = 1;
  for (size_t i = 0; i < sites.size(); ++i) {
    if (sites[i].degree > 2) {
      throw std::invalid_argument("kink splitting solves kinks up to two layers deep; model '" + model.spec().str() +
                                  "' has one " + std::to_string(sites[i].degree) + " layers deep");
    }
    degree = std::max(degree, sites[i].degree);
    const at::Tensor& p = sites[i].pattern;
    if (first_round) {
      previous.push_back(p.clone());
    } else {
      changed += p.ne(previous[i].index_select(0, idx)).flatten(1).sum(1);
      previous[i].index_copy_(0, idx, p);
    }
  }
  return degree;
}

/// For each active row, the first s in [0, 1] at which a unit of the frozen network (the current
/// piece's pattern, KinkMode::kFrozen) crosses zero on t = ta + s (1 - ta); infinity if none.
/// The site values are polynomials in s of at most `degree`: fitted at degree + 1 Chebyshev points.
at::Tensor first_crossing(models::Model& model, const ParamMap& dw, const at::Tensor& xa, const at::Tensor& ta,
                          int64_t degree) {
  const int64_t n = degree + 1;
  std::vector<double> sn(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) sn[j] = 0.5 - 0.5 * std::cos(M_PI * (2.0 * j + 1.0) / (2.0 * n));
  const size_t n_sites = model.kink_sites().size();
  std::vector<std::vector<at::Tensor>> values(n_sites);
  model.set_kink_mode(models::KinkMode::kFrozen);
  for (int64_t j = 0; j < n; ++j) {
    forward_along(model, dw, xa, ta + sn[j] * (1.0 - ta));
    for (size_t i = 0; i < n_sites; ++i) values[i].push_back(model.kink_sites()[i].values.reshape({xa.size(0), -1}));
  }
  // Monomial coefficients in s per unit: one Vandermonde solve for all rows and units.
  at::Tensor vander = at::empty({n, n}, at::kDouble);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t k = 0; k < n; ++k) vander[j][k] = std::pow(sn[j], static_cast<double>(k));
  }
  const at::Tensor inv = at::linalg_inv(vander);
  at::Tensor s_min = at::full({xa.size(0)}, std::numeric_limits<double>::infinity(), at::kDouble);
  for (size_t i = 0; i < n_sites; ++i) {
    const at::Tensor v = at::stack(values[i]).to(at::kDouble);                     // [n, rows, U]
    const at::Tensor coef = at::mm(inv, v.flatten(1)).view(v.sizes());            // [n, rows, U]
    const at::Tensor scale = v.abs().amax(0);
    const int64_t d = std::min<int64_t>(model.kink_sites()[i].degree, n - 1);
    // Only units with |c0| <= |c1| + |c2| can have a root in [0, 1]: the rest are skipped.
    const at::Tensor c0 = coef[0].flatten(), c1 = coef[1].flatten();
    const at::Tensor c2 = d >= 2 ? coef[2].flatten() : at::Tensor();
    const at::Tensor bound = d >= 2 ? c1.abs() + c2.abs() : c1.abs();
    const at::Tensor cand = at::nonzero(c0.abs() <= bound).squeeze(1);
    if (cand.numel() == 0) continue;
    at::Tensor root = at::full({c0.numel()}, std::numeric_limits<double>::infinity(), at::kDouble);
    root.index_put_({cand}, first_root(c0.index_select(0, cand), c1.index_select(0, cand),
                                       d >= 2 ? c2.index_select(0, cand) : at::Tensor(),
                                       scale.flatten().index_select(0, cand)));
    s_min = at::minimum(s_min, std::get<0>(root.view(scale.sizes()).min(1)));
  }
  return s_min;
}

}  // namespace

RowKinks walk_rows(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x,
                   int64_t max_pieces) {
  at::NoGradGuard ng;
  const int64_t n_rows = x.size(0);
  RowKinks out;
  out.breaks.assign(static_cast<size_t>(n_rows), {});
  out.kinks.assign(static_cast<size_t>(n_rows), 0);
  const SegmentRestore restore(model, w0);
  if (max_pieces > 0 && ends_need_too_many(model, w0, dw, x, max_pieces)) {
    out.complete = false;
    return out;
  }
  set_weights_along(model, w0, dw, 0.0);
  // Each row at its own t: rows are independent, so each walks only its own kinks, and all rows
  // advance together, one piece per round (rounds: the most kinks of one row, plus one).
  std::vector<int64_t> active(static_cast<size_t>(n_rows));
  for (int64_t i = 0; i < n_rows; ++i) active[static_cast<size_t>(i)] = i;
  at::Tensor t = at::zeros({n_rows}, at::kDouble);  // where each row's current piece starts
  std::vector<at::Tensor> previous;                  // each site's pattern of every row's last piece
  for (int64_t round = 0; !active.empty(); ++round) {
    if (round > kMaxPieces) throw std::runtime_error("kink walk: more than a million pieces in one step");
    if (max_pieces > 0 && round >= max_pieces) {
      out.complete = false;
      return out;
    }
    const at::Tensor idx = at::tensor(active, at::kLong);
    const at::Tensor xa = x.index_select(0, idx);
    const at::Tensor ta = at::clamp_max(t.index_select(0, idx) + kAfter, 1.0);
    model.set_kink_mode(models::KinkMode::kRecord);
    forward_along(model, dw, xa, ta);
    at::Tensor changed = at::zeros({idx.size(0)}, at::kLong);
    const int64_t degree = record_patterns(model, round == 0, idx, previous, changed);
    const at::Tensor s_min = first_crossing(model, dw, xa, ta, degree);
    const auto ch = changed.accessor<int64_t, 1>();
    const auto tav = ta.accessor<double, 1>();
    const auto sv = s_min.accessor<double, 1>();
    std::vector<int64_t> next;
    for (int64_t j = 0; j < idx.size(0); ++j) {
      const int64_t row = active[static_cast<size_t>(j)];
      out.kinks[static_cast<size_t>(row)] += ch[j];
      if (tav[j] >= 1.0 || !std::isfinite(sv[j])) continue;
      const double tn = tav[j] + sv[j] * (1.0 - tav[j]);
      t[row] = tn;
      out.breaks[static_cast<size_t>(row)].push_back(tn);
      next.push_back(row);
    }
    active = std::move(next);
  }
  return out;
}

StepKinks walk_step(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& xp,
                    const at::Tensor& xb, int64_t batch_examples, int64_t max_pieces) {
  StepKinks s;
  s.probes = walk_rows(model, w0, dw, xp, max_pieces);
  if (!s.probes.complete) return s;
  const int64_t nb = batch_examples > 0 ? std::min(batch_examples, xb.size(0)) : xb.size(0);
  const RowKinks batch = walk_rows(model, w0, dw, xb.narrow(0, 0, nb), max_pieces);
  if (!batch.complete) return s;
  s.walked = true;
  s.probe_kinks = s.batch_kinks = s.probe_pieces = 0;
  for (size_t i = 0; i < s.probes.kinks.size(); ++i) {
    s.probe_kinks += static_cast<double>(s.probes.kinks[i]);
    s.probe_pieces += static_cast<double>(s.probes.breaks[i].size() + 1);
  }
  for (int64_t n : batch.kinks) s.batch_kinks += static_cast<double>(n);
  return s;
}

KinkWalk walk_kinks(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x) {
  const RowKinks rows = walk_rows(model, w0, dw, x);
  KinkWalk walk;
  for (size_t i = 0; i < rows.breaks.size(); ++i) {
    walk.breaks.insert(walk.breaks.end(), rows.breaks[i].begin(), rows.breaks[i].end());
    walk.kinks += rows.kinks[i];
  }
  std::sort(walk.breaks.begin(), walk.breaks.end());
  walk.breaks.erase(std::unique(walk.breaks.begin(), walk.breaks.end()), walk.breaks.end());
  walk.breaks.insert(walk.breaks.begin(), 0.0);
  if (walk.breaks.back() < 1.0) walk.breaks.push_back(1.0);
  return walk;
}

}  // namespace pathkernel
