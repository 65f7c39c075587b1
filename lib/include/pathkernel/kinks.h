#pragma once
/// \file kinks.h
/// Where a segment of weights w + t dw, t in [0, 1], crosses the kinks of a piecewise-linear
/// network (ReLU, leaky ReLU, 2x2 max-pool; issue 13): the t at which a pre-activation of one of
/// the inputs changes sign or a max-pool window's argmax switches. Between two such points the
/// network with its pattern frozen is a polynomial in t (each layer's weights are affine in t),
/// so its gradients are too and Gauss-Legendre integrates them exactly; the analyzer's exact path
/// kernel is then exact again (SPEC, "exact path kernel").
///
/// The walk: the pattern of the piece that starts at t is the one at t + 1e-9 (a plain forward);
/// with it frozen, every site's values are interpolated as polynomials over [t + 1e-9, 1] from
/// degree + 1 Chebyshev points, and the piece ends at their first root. A kink within 1e-9 of the
/// previous one is taken at the previous one. Degrees up to 2 (two layers before the deepest
/// kink: mlp with up to two hidden layers, the zoo's cnn) are solved in closed form.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "pathkernel/models/model.h"
#include "pathkernel/stepper.h"

namespace pathkernel {

struct KinkWalk {
  /// 0 = t_0 < t_1 < ... < t_n = 1: the pieces [t_i, t_{i+1}] of constant pattern.
  std::vector<double> breaks;
  /// Sites that switched over the segment, summed over inputs: ReLU units whose sign changed
  /// and max-pool windows whose argmax changed, at every break.
  int64_t kinks = 0;
};

/// True when the model's forward has kink sites the walk understands (a zoo model with ReLU or
/// leaky ReLU, or the cnn's max-pool) and none of higher degree than the walk solves.
bool has_kinks(models::Model& model);

/// The walk for inputs x from w0 along dw (both by parameter name, float64). Leaves the model at
/// w0 with kink mode off. Throws std::invalid_argument for a model the walk cannot solve.
KinkWalk walk_kinks(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x);

/// Sites whose pattern differs between w0 and w0 + dw, summed over the inputs: two plain forwards.
/// Exact for kinks of degree 1 (a pre-activation linear in t crosses zero at most once), a lower
/// bound for deeper ones; the cheap count for many inputs (the batch). Leaves the model at w0.
int64_t pattern_changes(models::Model& model, const ParamMap& w0, const ParamMap& dw, const at::Tensor& x);

/// Gauss-Legendre nodes and weights on [0, 1] with q nodes on each piece of `breaks`.
std::pair<std::vector<double>, std::vector<double>> piecewise_nodes(const std::vector<double>& breaks, int64_t q);

/// The nodes per piece that make the kink-split quadrature exact for this model: its polynomial
/// gradients have degree (layers - 1), exact with ceil(layers / 2) nodes.
int64_t nodes_needed(models::Model& model);

}  // namespace pathkernel
