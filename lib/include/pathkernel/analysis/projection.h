#pragma once
/// \file projection.h
/// Seeded random projections of per-row gradients (Johnson-Lindenstrauss), for per-example
/// kernels of models too big for exact ones (issue 12, `explain --project D`). A tapped layer's
/// per-row gradient is an outer product (Linear: g a~^T with a~ = [a; 1]; Conv2d: the sum over
/// output positions s of g(s) u~(s)^T, u~(s) the patch and a 1), so the backpropagated signal and
/// the input are sketched separately and the factorization survives: a TensorSketch (Pham and
/// Pagh 2013). Each side gets a CountSketch to D buckets (a random bucket h(i) and sign s(i) per
/// coordinate); the outer product's sketch is their circular convolution, by FFT:
///     Z = irfft(rfft(CS_G(g)) * rfft(CS_A(a~)))      (Conv2d: the product summed over s),
/// which is the CountSketch of g a~^T under the bucket h_G(i) + h_A(j) mod D and the sign
/// s_G(i) s_A(j). So E <Z_i, Z_j> = <grad row_i, grad row_j> exactly (unbiased), with a spread of
/// about |grad row_i| |grad row_j| / sqrt(D). The per-row gradients are never formed. A layer
/// whose gradient has at most D entries is kept exactly (Z = the gradient itself), so a large
/// enough D gives the exact kernel.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "pathkernel/analysis/kernels.h"

namespace pathkernel {

struct Projection {
  int64_t requested = 0;  ///< D as asked
  uint64_t seed = 0;
  /// Per tap (the model's taps in order): buckets and signs of the output side [out] and of the
  /// input side [in (+1 for the bias)]; undefined for a tap kept exactly.
  std::vector<at::Tensor> hash_out, sign_out, hash_in, sign_in;
  /// Per tap: its part of a projected row (D, or out * in when kept exactly); and their sum.
  std::vector<int64_t> tap_dims;
  int64_t dims = 0;
};

/// The projection of the model's tapped layers for D (> 0) and a seed: the same D, seed and
/// architecture give the same sketch on every machine (LibTorch's CPU generator).
Projection make_projection(models::Model& model, int64_t requested, uint64_t seed);

/// [R, dims]: every row's projected gradient (factorized rows only). <Z_i, Z_j> estimates
/// <grad row_i, grad row_j>.
at::Tensor project_rows(const Projection& projection, const RowGradients& rows);

}  // namespace pathkernel
