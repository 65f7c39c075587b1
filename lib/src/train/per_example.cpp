#include "pathkernel/train/per_example.h"

#include <ATen/ATen.h>

namespace pathkernel {

at::Tensor conv_per_example_weight_grad(const models::Tap& tap, int64_t repeat) {
  const auto& c = tap.conv;
  const at::Tensor u = at::im2col(tap.input, {c.kernel_h, c.kernel_w}, /*dilation=*/{1, 1},
                                  {c.pad_h, c.pad_w}, {c.stride_h, c.stride_w});  // [P, Cin*k*k, L]
  const int64_t n = tap.grad_output.size(0), cout = tap.grad_output.size(1), p = u.size(0);
  // Rows p*R .. p*R + R-1 share input p: [P, R*Cout, L] against that input's patches.
  const at::Tensor g = tap.grad_output.reshape({p, repeat * cout, -1});
  return at::bmm(g, u.transpose(1, 2)).reshape({n, cout, -1});
}

namespace {

template <typename T>
void accumulate_row_sq(const T* p, int64_t rows, int64_t cols, double* out);

/// out[i] = |row i|^2 for a float or double 2-D-able tensor (made contiguous).
void row_sq_into(const at::Tensor& t, double* out) {
  const at::Tensor c = t.contiguous();
  const int64_t n = c.size(0), d = n ? c.numel() / n : 0;
  if (c.scalar_type() == at::kFloat) {
    accumulate_row_sq(c.data_ptr<float>(), n, d, out);
  } else {
    const at::Tensor dc = c.to(at::kDouble);
    accumulate_row_sq(dc.data_ptr<double>(), n, d, out);
  }
}

template <typename T>
void accumulate_row_sq(const T* p, int64_t rows, int64_t cols, double* out) {
  // Eight independent accumulators: one serial chain of double adds would be latency-bound.
  for (int64_t i = 0; i < rows; ++i) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const T* row = p + i * cols;
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      for (int u = 0; u < 8; ++u) acc[u] += static_cast<double>(row[j + u]) * static_cast<double>(row[j + u]);
    }
    for (; j < cols; ++j) acc[0] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    out[i] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
}

/// Squared norm of every row of a [N, ...] float or double tensor, float64 [N]. A plain loop:
/// ATen's row-wise norms allocate [N, D] temporaries, and this runs at every training step.
at::Tensor row_sq_norms(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const int64_t n = c.size(0), d = n ? c.numel() / n : 0;
  at::Tensor out = at::empty({n}, at::kDouble);
  if (c.scalar_type() == at::kFloat) {
    accumulate_row_sq(c.data_ptr<float>(), n, d, out.data_ptr<double>());
  } else {
    accumulate_row_sq(c.to(at::kDouble).data_ptr<double>(), n, d, out.data_ptr<double>());
  }
  return out;
}

}  // namespace

std::vector<double> per_example_grad_sq_norms_vec(const std::vector<models::Tap>& taps, double scale) {
  std::vector<double> total, a_sq, g_sq;
  for (const auto& tap : taps) {
    if (!tap.grad_output.defined()) continue;
    const int64_t n = tap.grad_output.size(0);
    if (total.empty()) total.assign(static_cast<size_t>(n), 0.0);
    if (tap.kind == models::LayerKind::kLinear) {
      a_sq.resize(static_cast<size_t>(n));
      g_sq.resize(static_cast<size_t>(n));
      row_sq_into(tap.input, a_sq.data());
      row_sq_into(tap.grad_output, g_sq.data());
      const double bias = tap.bias.defined() ? 1.0 : 0.0;
      for (int64_t i = 0; i < n; ++i) total[i] += g_sq[i] * scale * scale * (a_sq[i] + bias);
    } else {
      const at::Tensor sq = per_example_grad_sq_norms({tap}, scale).contiguous();
      for (int64_t i = 0; i < n; ++i) total[i] += sq.data_ptr<double>()[i];
    }
  }
  return total;
}

at::Tensor per_example_grad_sq_norms(const std::vector<models::Tap>& taps, double scale) {
  at::Tensor total;
  for (const auto& tap : taps) {
    if (!tap.grad_output.defined()) continue;
    const int64_t n = tap.grad_output.size(0);
    at::Tensor sq;
    if (tap.kind == models::LayerKind::kLinear) {
      const at::Tensor a_sq = row_sq_norms(tap.input);
      if (tap.bias.defined()) a_sq.add_(1.0);
      sq = row_sq_norms(tap.grad_output).mul_(scale * scale).mul_(a_sq);
    } else {
      const at::Tensor g = tap.grad_output.to(at::kDouble) * scale;
      models::Tap scaled = tap;
      scaled.input = tap.input.to(at::kDouble);
      scaled.grad_output = g;
      sq = conv_per_example_weight_grad(scaled).pow(2).reshape({n, -1}).sum(1);
      if (tap.bias.defined()) sq = sq + g.reshape({n, g.size(1), -1}).sum(2).pow(2).sum(1);
    }
    total = total.defined() ? total + sq : sq;
  }
  return total;
}

}  // namespace pathkernel
