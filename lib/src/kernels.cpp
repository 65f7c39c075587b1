#include "pathkernel/kernels.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "pathkernel/per_example.h"

namespace pathkernel {
namespace {

std::vector<at::Tensor> parameters_of(models::Model& model) {
  std::vector<at::Tensor> p;
  for (const auto& item : model.named_parameters()) p.push_back(item.value());
  return p;
}

/// Per-row weight gradients of a conv tap, flattened: [R, Cout*Cin*kh*kw], and bias: [R, Cout].
std::pair<at::Tensor, at::Tensor> conv_row_grads(const models::Tap& t) {
  const int64_t n = t.grad_output.size(0), cout = t.grad_output.size(1);
  return {conv_per_example_weight_grad(t).reshape({n, -1}), t.grad_output.reshape({n, cout, -1}).sum(2)};
}

/// Runs a forward pass with capture on and a backward from `seed_fn(outputs)`, returning the taps.
template <typename SeedFn>
RowSignals capture(models::Model& model, const at::Tensor& x, SeedFn seed_fn, at::Tensor* logits) {
  model.set_capture(true);
  const at::Tensor out = model.forward(x);
  const at::Tensor s = seed_fn(out);
  // Gradients with respect to all parameters make the engine reach every tapped layer; the
  // parameter gradients themselves are dropped.
  torch::autograd::grad({s}, parameters_of(model), {}, /*retain_graph=*/false, /*create_graph=*/false,
                        /*allow_unused=*/true);
  model.set_capture(false);
  RowSignals r;
  r.taps = model.taps();
  r.rows = x.size(0);
  model.clear_captures();
  for (const auto& t : r.taps) {
    if (t.kind == models::LayerKind::kConv2d) {
      auto [w, b] = conv_row_grads(t);
      r.conv_weight_grads.push_back(w);
      r.conv_bias_grads.push_back(b);
    } else {
      r.conv_weight_grads.emplace_back();
      r.conv_bias_grads.emplace_back();
    }
  }
  if (logits) *logits = out.detach();
  return r;
}

}  // namespace

at::Tensor shared_columns(int64_t probes, const std::vector<int64_t>& outputs) {
  return at::tensor(outputs, at::kLong).unsqueeze(0).expand({probes, static_cast<int64_t>(outputs.size())}).contiguous();
}

RowSignals probe_signals(models::Model& model, const at::Tensor& x, const at::Tensor& cols, at::Tensor* logits) {
  const int64_t c = cols.size(1), p = x.size(0);
  // Each probe row repeated once per chosen output, each copy seeded with a one-hot on its
  // output: one backward pass serves every probe and output.
  const at::Tensor xr = x.repeat_interleave(c, 0);
  at::Tensor out_rep;
  RowSignals r = capture(
      model, xr,
      [&](const at::Tensor& out) {
        const at::Tensor seed = at::one_hot(cols.reshape({-1}), out.size(1)).to(out.scalar_type());
        return (out * seed).sum();
      },
      &out_rep);
  if (logits) *logits = out_rep.index_select(0, at::arange(0, p * c, c, at::kLong));
  return r;
}

RowSignals probe_signals(models::Model& model, const at::Tensor& x, const std::vector<int64_t>& outputs,
                         at::Tensor* logits) {
  return probe_signals(model, x, shared_columns(x.size(0), outputs), logits);
}

RowSignals loss_signals(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss) {
  // The sum of the per-example losses: row m of each signal is then d l_m / d z_m.
  return capture(
      model, x, [&](const at::Tensor& out) { return batch_loss(out, y, loss) * static_cast<double>(x.size(0)); },
      nullptr);
}

bool factorizable(models::Model& model) {
  int64_t tapped = 0;
  for (const auto& t : model.taps()) tapped += t.weight.numel() + (t.bias.defined() ? t.bias.numel() : 0);
  int64_t all = 0;
  for (const auto& p : model.parameters()) all += p.numel();
  return tapped == all;
}

at::Tensor factorized_gram(const RowSignals& a, const RowSignals& b) {
  at::Tensor gram;
  for (size_t l = 0; l < a.taps.size(); ++l) {
    const auto& ta = a.taps[l];
    const auto& tb = b.taps[l];
    at::Tensor g;
    if (ta.kind == models::LayerKind::kLinear) {
      at::Tensor aa = at::mm(ta.input, tb.input.t());
      if (ta.bias.defined()) aa.add_(1.0);
      g = at::mm(ta.grad_output, tb.grad_output.t()).mul_(aa);
    } else {
      g = at::mm(a.conv_weight_grads[l], b.conv_weight_grads[l].t());
      if (ta.bias.defined()) g.add_(at::mm(a.conv_bias_grads[l], b.conv_bias_grads[l].t()));
    }
    gram = gram.defined() ? gram.add_(g) : g;
  }
  return gram;
}

at::Tensor factorized_directional(const RowSignals& a, const ParamMap& v) {
  at::Tensor out;
  for (size_t l = 0; l < a.taps.size(); ++l) {
    const auto& t = a.taps[l];
    const at::Tensor& dw = v.at(t.name + ".weight");
    at::Tensor d;
    if (t.kind == models::LayerKind::kLinear) {
      d = (at::mm(t.grad_output, dw) * t.input).sum(1);  // G_r^T dW A_r
      if (t.bias.defined()) d.add_(at::mv(t.grad_output, v.at(t.name + ".bias")));
    } else {
      d = at::mv(a.conv_weight_grads[l], dw.reshape({-1}));
      if (t.bias.defined()) d.add_(at::mv(a.conv_bias_grads[l], v.at(t.name + ".bias")));
    }
    out = out.defined() ? out.add_(d) : d;
  }
  return out;
}

namespace {

at::Tensor jacobian_rows(models::Model& model, const at::Tensor& rows_out) {
  const auto params = parameters_of(model);
  std::vector<at::Tensor> rows;
  for (int64_t r = 0; r < rows_out.size(0); ++r) {
    const auto g = torch::autograd::grad({rows_out[r]}, params, {}, /*retain_graph=*/true, false, true);
    std::vector<at::Tensor> flat;
    for (size_t i = 0; i < g.size(); ++i) {
      flat.push_back(g[i].defined() ? g[i].reshape({-1}) : at::zeros({params[i].numel()}, params[i].options()));
    }
    rows.push_back(at::cat(flat));
  }
  return at::stack(rows);
}

}  // namespace

at::Tensor explicit_probe_jacobian(models::Model& model, const at::Tensor& x, const at::Tensor& cols) {
  const at::Tensor out = model.forward(x);
  return jacobian_rows(model, out.gather(1, cols).reshape({-1}));
}

at::Tensor explicit_probe_jacobian(models::Model& model, const at::Tensor& x, const std::vector<int64_t>& outputs) {
  return explicit_probe_jacobian(model, x, shared_columns(x.size(0), outputs));
}

at::Tensor explicit_loss_jacobian(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss) {
  std::vector<at::Tensor> rows;
  for (int64_t m = 0; m < x.size(0); ++m) {
    rows.push_back(batch_loss(model.forward(x.slice(0, m, m + 1)), y.slice(0, m, m + 1), loss));
  }
  return jacobian_rows(model, at::stack(rows));
}

at::Tensor flatten_params(models::Model& model, const ParamMap& v) {
  std::vector<at::Tensor> flat;
  for (const auto& item : model.named_parameters()) flat.push_back(v.at(item.key()).reshape({-1}));
  return at::cat(flat);
}

at::Tensor second_order(models::Model& model, const at::Tensor& x, const std::vector<int64_t>& outputs,
                        const ParamMap& dw) {
  return second_order(model, x, shared_columns(x.size(0), outputs), dw);
}

at::Tensor second_order(models::Model& model, const at::Tensor& x, const at::Tensor& cols, const ParamMap& dw) {
  const auto params = parameters_of(model);
  std::vector<at::Tensor> dirs;
  for (const auto& item : model.named_parameters()) dirs.push_back(dw.at(item.key()));
  // jvp(out, dw) = d/du <grad(out . u, w), dw>: differentiable in w, so it can be applied twice,
  // giving dw^T H dw for every output at once.
  auto jvp = [&](const at::Tensor& out) {
    const at::Tensor u = at::zeros_like(out).requires_grad_(true);
    const auto v = torch::autograd::grad({out}, params, {u}, /*retain_graph=*/true, /*create_graph=*/true, true);
    at::Tensor s = at::zeros({}, out.options());
    for (size_t i = 0; i < v.size(); ++i) {
      if (v[i].defined()) s = s + (v[i] * dirs[i]).sum();
    }
    return torch::autograd::grad({s}, {u}, {}, true, true, false)[0];
  };
  const at::Tensor out = model.forward(x);
  const at::Tensor first = jvp(out);
  // A model linear in w has first derivative constant in w: the second jvp has no graph to follow.
  if (!first.requires_grad()) return at::zeros({cols.numel()}, out.options());
  const at::Tensor second = jvp(first).detach();
  return (second.gather(1, cols) * 0.5).reshape({-1});
}

namespace {

std::vector<std::string> names_of(models::Model& model) {
  std::vector<std::string> n;
  for (const auto& item : model.named_parameters()) n.push_back(item.key());
  return n;
}

}  // namespace

RowGradients probe_rows(models::Model& model, const at::Tensor& x, const at::Tensor& cols, bool explicit_route) {
  RowGradients r;
  if (explicit_route) {
    r.jacobian = explicit_probe_jacobian(model, x, cols).detach();
    r.names = names_of(model);
  } else {
    r.signals = probe_signals(model, x, cols);
  }
  return r;
}

RowGradients loss_rows(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss,
                       bool explicit_route) {
  RowGradients r;
  if (explicit_route) {
    r.jacobian = explicit_loss_jacobian(model, x, y, loss).detach();
    r.names = names_of(model);
  } else {
    r.signals = loss_signals(model, x, y, loss);
  }
  return r;
}

at::Tensor row_gram(const RowGradients& a, const RowGradients& b) {
  return a.is_explicit() ? at::mm(a.jacobian, b.jacobian.t()) : factorized_gram(a.signals, b.signals);
}

at::Tensor row_directional(const RowGradients& a, const ParamMap& v) {
  if (!a.is_explicit()) return factorized_directional(a.signals, v);
  std::vector<at::Tensor> flat;
  for (const auto& n : a.names) flat.push_back(v.at(n).reshape({-1}));
  return at::mv(a.jacobian, at::cat(flat));
}

}  // namespace pathkernel
