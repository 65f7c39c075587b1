#pragma once
/// \file sharpness.h
/// The top eigenvalue lambda_max of the Hessian of a loss (issue 13, `analyze --sharpness`): Lanczos
/// with full reorthogonalization on exact Hessian-vector products (double backward), float64.
/// Gradient descent on a quadratic is stable iff lr * lambda_max < 2 ("edge of stability",
/// Cohen et al. 2021).

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "pathkernel/models/model.h"
#include "pathkernel/train/stepper.h"

namespace pathkernel {

struct Sharpness {
  double lambda_max = 0;  ///< the largest (algebraic) eigenvalue found
  int64_t iterations = 0;
  /// |H v - lambda v| / |lambda| for the Ritz vector v: the estimate's accuracy (its eigenvalue
  /// error is about residual^2 |lambda| / gap).
  double residual = 0;
};

/// lambda_max of the Hessian of the mean loss over (x, y) at the model's current weights, in
/// chunks of `chunk` examples. Stops when the relative residual is below `tolerance`, after
/// `max_iterations`, or when the Krylov space is exhausted. The start vector is Gaussian from
/// `seed`, so the same call gives the same number.
Sharpness hessian_top_eigenvalue(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss,
                                 int64_t max_iterations = 100, double tolerance = 1e-7, uint64_t seed = 0,
                                 int64_t chunk = 1000);

/// The mean loss over (x, y) at the model's current weights, without a graph, in chunks.
double mean_loss(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss, int64_t chunk = 1000);

/// The explicit Hessian [n, n] of the same loss (one double backward per parameter): the tests'
/// independent route, for small models only.
at::Tensor explicit_hessian(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss);

}  // namespace pathkernel
