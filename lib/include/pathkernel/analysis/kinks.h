#pragma once
/// \file kinks.h
/// Where a segment of weights w + t dw, t in [0, 1], crosses the kinks of a piecewise-linear
/// network (ReLU, leaky ReLU, 2x2 max-pool; issue 13): the t at which a pre-activation of one of
/// the inputs changes sign or a max-pool window's argmax switches. Between two such points the
/// network with its pattern frozen is a polynomial in t (each layer's weights are affine in t),
/// so its gradients are too and Gauss-Legendre integrates them exactly; the analyzer's exact path
/// kernel is then exact again (SPEC, "exact path kernel").
///
/// The walk, row by row: the pattern of a row's piece that starts at t is the one at t + 1e-9 (a
/// plain forward); with it frozen, every site's values are interpolated as polynomials over
/// [t + 1e-9, 1] from degree + 1 Chebyshev points, and the piece ends at their first root. A kink within 1e-9 of the
/// previous one is taken at the previous one. Degrees up to 2 (two layers before the deepest
/// kink: mlp with up to two hidden layers, the zoo's cnn) are solved in closed form.

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "pathkernel/models/model.h"
#include "pathkernel/train/stepper.h"

namespace pathkernel {

struct KinkWalk {
  /// 0 = t_0 < t_1 < ... < t_n = 1: the pieces [t_i, t_{i+1}] of constant pattern.
  std::vector<double> breaks;
  /// Sites that switched over the segment, summed over inputs: ReLU units whose sign changed
  /// and max-pool windows whose argmax changed, at every break.
  int64_t kinks = 0;
};

/// Sets the model's weights to w0 + t dw (both by parameter name).
void set_weights_along(models::Model& model, const ParamMap& w0, const ParamMap& dw, double t);

/// On destruction, puts the model back at w0 with kink mode off and no row segment: the state the
/// walks and the per-row quadrature promise to leave, also when they throw.
class SegmentRestore {
 public:
  SegmentRestore(models::Model& model, const ParamMap& w0) : model_(model), w0_(w0) {}
  ~SegmentRestore();
  SegmentRestore(const SegmentRestore&) = delete;
  SegmentRestore& operator=(const SegmentRestore&) = delete;

 private:
  models::Model& model_;
  const ParamMap& w0_;
};

/// The row segment along dw (by parameter name) at positions t [N], in the model's dtype.
models::RowSegment segment_along(models::Model& model, const ParamMap& dw, const at::Tensor& t);

/// The walk of each input row on its own (rows are independent): row i's kinks and the interior
/// points 0 < t < 1 where its pattern changes, in order.
struct RowKinks {
  std::vector<std::vector<double>> breaks;
  std::vector<int64_t> kinks;
  /// False when a row needed more than the walk's max_pieces: breaks and kinks are then incomplete.
  bool complete = true;
};

/// Each row of x walked from w0 along dw at once, every row at its own t (Model::set_row_segment):
/// as many rounds as one row has pieces, each a few forwards of the rows still walking. With
/// max_pieces > 0 it gives up (complete = false) as soon as one row is seen to need more: first by
/// the sites that differ between the segment's ends (a lower bound of each row's kinks, two plain
/// forwards), then by counting rounds. Leaves the model at w0 with kink mode off and no row
/// segment. Throws std::invalid_argument for a model the walk cannot solve.
RowKinks walk_rows(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x,
                   int64_t max_pieces = 0);

/// One analyzed step's kinks (analyze --kinks): the probes' walk, kept for the quadrature, and the
/// counts summed over the probes and over the first `batch_examples` (0: all) batch rows. When one
/// row needs more than max_pieces (> 0), the step is not walked: walked false, the counts NaN.
struct StepKinks {
  RowKinks probes;
  bool walked = false;
  double probe_kinks = NAN, batch_kinks = NAN, probe_pieces = NAN;
};
StepKinks walk_step(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& xp,
                    const at::Tensor& xb, int64_t batch_examples, int64_t max_pieces);

/// The walk for inputs x from w0 along dw (both by parameter name, float64): the breaks are the
/// union of every row's (walk_rows). Leaves the model at w0 with kink mode off. Throws
/// std::invalid_argument for a model the walk cannot solve.
KinkWalk walk_kinks(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x);

/// Gauss-Legendre nodes and weights on [0, 1] with q nodes on each piece of `breaks`.
std::pair<std::vector<double>, std::vector<double>> piecewise_nodes(const std::vector<double>& breaks, int64_t q);

/// The quadrature of per-row pieces, round by round: round r holds, for every row with more than r
/// nodes, its r-th node and weight (q Gauss-Legendre nodes on each of the row's pieces). A forward
/// of a round's rows at their own nodes (Model::set_row_segment) does the work of one node for
/// each; the rounds are as many as one row has nodes, not as many as the rows' pieces together.
struct NodeRound {
  std::vector<int64_t> rows;
  std::vector<double> t, weight;
};
std::vector<NodeRound> row_node_rounds(const RowKinks& rows, int64_t q);

/// The nodes per piece that make the kink-split quadrature exact for this model: its polynomial
/// gradients have degree (layers - 1), exact with ceil(layers / 2) nodes.
int64_t nodes_needed(models::Model& model);

}  // namespace pathkernel
