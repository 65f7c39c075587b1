#pragma once
/// \file per_example.h
/// Per-example gradient norms from captured layer inputs and output signals, without a
/// per-example backward loop. For a Linear layer z = a W^T + b the gradient of example i is
/// (g_i a_i^T, g_i), so its squared norm is |g_i|^2 (|a_i|^2 + 1). For a Conv2d layer the
/// per-example weight gradient g_i U_i^T (U_i the unfolded input) is small and formed directly.

#include <ATen/core/Tensor.h>

#include <vector>

#include "pathkernel/models/model.h"

namespace pathkernel {

/// Squared norms of the per-example gradients over all tapped layers, float64 [N]. The taps must
/// hold the input and signal of one backward pass; `scale` multiplies every signal (pass the
/// batch size when the loss was averaged over the batch, to get per-example loss gradients).
at::Tensor per_example_grad_sq_norms(const std::vector<models::Tap>& taps, double scale);

/// The same as per_example_grad_sq_norms, into a plain vector: raw loops over contiguous memory
/// for Linear taps (this runs at every training step, where ATen's per-call overhead on
/// batch-sized tensors is most of the cost), the tensor route for Conv2d taps.
std::vector<double> per_example_grad_sq_norms_vec(const std::vector<models::Tap>& taps, double scale);

/// Per-example weight gradient of a Conv2d tap: [N, Cout, Cin*kh*kw] (bias gradient: signal
/// summed over positions). Exposed for the analyzer's kernels. With `repeat` R, input row i
/// serves the R signal rows i*R .. i*R + R-1 (probe rows: one input, one signal per output):
/// the input is unfolded once per input row, not once per signal row.
at::Tensor conv_per_example_weight_grad(const models::Tap& tap, int64_t repeat = 1);

}  // namespace pathkernel
