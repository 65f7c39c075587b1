#include "pathkernel/analysis/projection.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <stdexcept>

namespace pathkernel {
namespace {

/// The length of a tap's input side: Linear in (+1 with a bias), Conv2d Cin*kh*kw (+1).
int64_t input_side(const models::Tap& t) {
  const int64_t bias = t.bias.defined() ? 1 : 0;
  return t.kind == models::LayerKind::kLinear ? t.weight.size(1) + bias
                                               : t.weight.size(1) * t.conv.kernel_h * t.conv.kernel_w + bias;
}

/// The input side with its column of ones for the bias: [N, in] (Linear) or [N, in, S] (Conv2d).
at::Tensor with_ones(const at::Tensor& t, bool bias, int64_t dim) {
  if (!bias) return t;
  std::vector<int64_t> shape = t.sizes().vec();
  shape[static_cast<size_t>(dim)] = 1;
  return at::cat({t, at::ones(shape, t.options())}, dim);
}

/// CountSketch along the last dim: x [..., n] -> [..., d], entry i added with sign s[i] into
/// bucket h[i]; then its real FFT [..., d/2 + 1].
at::Tensor sketch_fft(const at::Tensor& x, const at::Tensor& h, const at::Tensor& s, int64_t d) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = d;
  const at::Tensor cs = at::zeros(shape, x.options()).index_add_(x.dim() - 1, h, x * s);
  return at::fft_rfft(cs, d, -1);
}

}  // namespace

Projection make_projection(models::Model& model, int64_t requested, uint64_t seed) {
  if (requested < 1) throw std::invalid_argument("projection: D must be at least 1");
  Projection p;
  p.requested = requested;
  p.seed = seed;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  for (const auto& t : model.taps()) {
    const int64_t out = t.weight.size(0), in = input_side(t);
    // Always drawn, used or not, so that one tap's choice does not shift the next tap's draws.
    const at::Tensor ho = at::randint(requested, {out}, gen, i64), hi = at::randint(requested, {in}, gen, i64);
    const at::Tensor so = at::randint(2, {out}, gen, i64).to(at::kDouble) * 2 - 1;
    const at::Tensor si = at::randint(2, {in}, gen, i64).to(at::kDouble) * 2 - 1;
    const bool kept = out * in <= requested;
    p.hash_out.push_back(kept ? at::Tensor() : ho);
    p.sign_out.push_back(kept ? at::Tensor() : so);
    p.hash_in.push_back(kept ? at::Tensor() : hi);
    p.sign_in.push_back(kept ? at::Tensor() : si);
    p.tap_dims.push_back(kept ? out * in : requested);
    p.dims += p.tap_dims.back();
  }
  return p;
}

at::Tensor project_rows(const Projection& p, const RowGradients& rows) {
  if (rows.is_explicit()) throw std::invalid_argument("projection: needs factorized rows");
  const RowSignals& s = rows.signals;
  if (s.taps.size() != p.tap_dims.size()) throw std::invalid_argument("projection: made for another model");
  const int64_t d = p.requested;
  std::vector<at::Tensor> parts;
  for (size_t l = 0; l < s.taps.size(); ++l) {
    const models::Tap& t = s.taps[l];
    const bool bias = t.bias.defined(), kept = !p.hash_out[l].defined();
    const int64_t na = t.input.size(0), rep = s.repeat;
    if (t.kind == models::LayerKind::kLinear) {
      const at::Tensor g = t.grad_output;                              // [R, out]
      const at::Tensor a = with_ones(t.input.reshape({na, -1}), bias, 1);  // [Na, in]
      if (kept) {  // the gradient itself, g a~^T; rows i*rep .. share input i
        parts.push_back((g.reshape({na, rep, -1, 1}) * a.reshape({na, 1, 1, -1})).reshape({s.rows, -1}));
        continue;
      }
      const at::Tensor fg = sketch_fft(g, p.hash_out[l], p.sign_out[l], d);  // [R, F]
      const at::Tensor fa = sketch_fft(a, p.hash_in[l], p.sign_in[l], d);    // [Na, F]
      const at::Tensor prod = fg.reshape({na, rep, -1}) * fa.reshape({na, 1, -1});
      parts.push_back(at::fft_irfft(prod.reshape({s.rows, -1}), d, -1));
    } else {
      const auto& c = t.conv;
      const at::Tensor u = with_ones(at::im2col(t.input, {c.kernel_h, c.kernel_w}, {1, 1}, {c.pad_h, c.pad_w},
                                                {c.stride_h, c.stride_w}),
                                     bias, 1);                                              // [Na, in, S]
      const at::Tensor g = t.grad_output.reshape({s.rows, t.grad_output.size(1), -1});   // [R, Cout, S]
      if (kept) {  // sum_s g(s) u~(s)^T, rows sharing their input's patches
        parts.push_back(at::bmm(g.reshape({na, -1, g.size(2)}), u.transpose(1, 2)).reshape({s.rows, -1}));
        continue;
      }
      // Per position the sketches' spectra multiply; summed over positions. In blocks of inputs,
      // so that [block * rep, S, F] complex stays near 64 MB.
      const int64_t positions = g.size(2), f = d / 2 + 1;
      const int64_t block = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(1, rep * positions * f));
      std::vector<at::Tensor> z;
      for (int64_t i0 = 0; i0 < na; i0 += block) {
        const int64_t n = std::min(block, na - i0);
        const at::Tensor gs = g.narrow(0, i0 * rep, n * rep).transpose(1, 2);  // [n*rep, S, Cout]
        const at::Tensor us = u.narrow(0, i0, n).transpose(1, 2);              // [n, S, in]
        const at::Tensor fg = sketch_fft(gs, p.hash_out[l], p.sign_out[l], d).reshape({n, rep, positions, f});
        const at::Tensor fu = sketch_fft(us, p.hash_in[l], p.sign_in[l], d).reshape({n, 1, positions, f});
        z.push_back(at::fft_irfft((fg * fu).sum(2).reshape({n * rep, f}), d, -1));
      }
      parts.push_back(at::cat(z, 0));
    }
  }
  return at::cat(parts, 1);
}

}  // namespace pathkernel
