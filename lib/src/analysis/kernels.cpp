#include "pathkernel/analysis/kernels.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>

#include "pathkernel/analysis/batched_rows.h"
#include "pathkernel/analysis/functorch_rows.h"
#include "pathkernel/train/per_example.h"

namespace pathkernel {

std::vector<at::Tensor> parameters_of(models::Model& model) {
  std::vector<at::Tensor> p;
  for (const auto& item : model.named_parameters()) p.push_back(item.value());
  return p;
}

namespace {

/// Per-row weight gradients of a conv tap, flattened: [R, Cout*Cin*kh*kw], and bias: [R, Cout].
std::pair<at::Tensor, at::Tensor> conv_row_grads(const models::Tap& t, int64_t repeat) {
  const int64_t n = t.grad_output.size(0), cout = t.grad_output.size(1);
  return {conv_per_example_weight_grad(t, repeat).reshape({n, -1}), t.grad_output.reshape({n, cout, -1}).sum(2)};
}

/// Fills the Conv2d taps' per-row gradients of `r` (formed once, when the signals are captured).
void form_conv_rows(RowSignals& r) {
  for (const auto& t : r.taps) {
    if (t.kind == models::LayerKind::kConv2d) {
      auto [w, b] = conv_row_grads(t, r.repeat);
      r.conv_weight_grads.push_back(w);
      r.conv_bias_grads.push_back(b);
    } else {
      r.conv_weight_grads.emplace_back();
      r.conv_bias_grads.emplace_back();
    }
  }
}

/// Row r's layer inputs, one per row (input row r / repeat), for the few callers that
/// materialize per-row gradients.
at::Tensor row_inputs(const models::Tap& t, int64_t repeat) {
  return repeat == 1 ? t.input : t.input.repeat_interleave(repeat, 0);
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
  for (auto& t : r.taps) t.output = at::Tensor();
  form_conv_rows(r);
  if (logits) *logits = out.detach();
  return r;
}

}  // namespace

at::Tensor shared_columns(int64_t probes, const std::vector<int64_t>& outputs) {
  return at::tensor(outputs, at::kLong).unsqueeze(0).expand({probes, static_cast<int64_t>(outputs.size())}).contiguous();
}

RowSignals probe_signals(models::Model& model, const at::Tensor& x, const at::Tensor& cols, at::Tensor* logits) {
  const int64_t c = cols.size(1), p = x.size(0);
  // One forward of the P probes; then, per column j, one backward seeded with the one-hot of
  // each probe's output cols[p][j], asking autograd for the signals at the tapped layers'
  // outputs only (no parameter gradients, nothing below the first tapped layer).
  model.set_capture(true);
  const at::Tensor out = model.forward(x);
  model.set_capture(false);
  std::vector<at::Tensor> outputs;
  for (const auto& t : model.taps()) {
    TORCH_CHECK(t.output.defined(), "tapped layer ", t.name, " produced no output to differentiate");
    outputs.push_back(t.output);
  }
  std::vector<std::vector<at::Tensor>> signals(outputs.size());
  for (int64_t j = 0; j < c; ++j) {
    const at::Tensor seed = at::one_hot(cols.select(1, j), out.size(1)).to(out.scalar_type());
    const auto g = torch::autograd::grad({(out * seed).sum()}, outputs, {}, /*retain_graph=*/j + 1 < c,
                                         /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t l = 0; l < g.size(); ++l) signals[l].push_back(g[l].defined() ? g[l] : at::zeros_like(outputs[l]));
  }
  RowSignals r;
  r.taps = model.taps();
  r.rows = p * c;
  r.repeat = c;
  model.clear_captures();
  for (size_t l = 0; l < r.taps.size(); ++l) {
    auto& t = r.taps[l];
    t.output = at::Tensor();
    std::vector<int64_t> shape = outputs[l].sizes().vec();
    shape[0] = p * c;
    t.grad_output = at::stack(signals[l], 1).reshape(shape);  // row p*C + j
  }
  form_conv_rows(r);
  if (logits) *logits = out.detach();
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
  const int64_t pa = a.rows / a.repeat, pb = b.rows / b.repeat;
  at::Tensor gram;
  for (size_t l = 0; l < a.taps.size(); ++l) {
    const auto& ta = a.taps[l];
    const auto& tb = b.taps[l];
    at::Tensor g;
    if (ta.kind == models::LayerKind::kLinear) {
      // (G_i . G_j)(A_i . A_j + 1), the input side once per pair of distinct inputs.
      at::Tensor aa = at::mm(ta.input, tb.input.t());
      if (ta.bias.defined()) aa.add_(1.0);
      g = at::mm(ta.grad_output, tb.grad_output.t())
              .view({pa, a.repeat, pb, b.repeat})
              .mul_(aa.view({pa, 1, pb, 1}))
              .view({a.rows, b.rows});
    } else {
      g = at::mm(a.conv_weight_grads[l], b.conv_weight_grads[l].t());
      if (ta.bias.defined()) g.add_(at::mm(a.conv_bias_grads[l], b.conv_bias_grads[l].t()));
    }
    gram = gram.defined() ? gram.add_(g) : g;
  }
  return gram;
}

at::Tensor factorized_directional(const RowSignals& a, const ParamMap& v) {
  const int64_t pa = a.rows / a.repeat;
  at::Tensor out;
  for (size_t l = 0; l < a.taps.size(); ++l) {
    const auto& t = a.taps[l];
    const at::Tensor& dw = v.at(t.name + ".weight");
    at::Tensor d;
    if (t.kind == models::LayerKind::kLinear) {
      // G_r^T dW A_r = G_r . (dW A_r): dW A once per distinct input.
      const at::Tensor da = at::mm(t.input, dw.t());  // [P, out]
      d = (t.grad_output.view({pa, a.repeat, -1}) * da.unsqueeze(1)).sum(2).view({a.rows});
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

/// The gradient of the scalar `out` with respect to every parameter, flattened in state_dict
/// order (zeros for parameters it does not depend on) into `row`.
void gradient_row(const std::vector<at::Tensor>& params, const at::Tensor& out, at::Tensor row) {
  gradients_into_rows(params, torch::autograd::grad({out}, params, {}, /*retain_graph=*/true, false, /*allow_unused=*/true),
                      row.view({1, -1}));
}

int64_t count_params(const std::vector<at::Tensor>& params) {
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  return n;
}

}  // namespace

// Each probe is forwarded on its own (examples do not interact: BatchNorm in training mode is
// refused), so that a row's backward runs through one example's graph, not the whole batch's.
at::Tensor explicit_probe_jacobian(models::Model& model, const at::Tensor& x, const at::Tensor& cols) {
  const auto params = parameters_of(model);
  // In the parameters' dtype: the inputs may be int64 tokens.
  return explicit_probe_jacobian_into(model, x, cols,
                                      at::empty({x.size(0) * cols.size(1), count_params(params)}, params.front().options()));
}

at::Tensor explicit_probe_jacobian_into(models::Model& model, const at::Tensor& x, const at::Tensor& cols, at::Tensor jac,
                                        RowsMode mode) {
  const auto params = parameters_of(model);
  const int64_t c = cols.size(1);
  const at::Tensor col = cols.contiguous();
  const auto cl = col.accessor<int64_t, 2>();
  if (jac.dim() != 2 || jac.size(0) != x.size(0) * c || jac.size(1) != count_params(params)) {
    throw std::invalid_argument("explicit_probe_jacobian_into: the output is not [P*C, n_params]");
  }
  if (mode == RowsMode::kFunctorch) {
    const int64_t probe_bytes = std::max<int64_t>(1, c * jac.size(1) * static_cast<int64_t>(jac.element_size()));
    functorch_rows_into(model, x, col, jac, kFunctorchBlockBytes / probe_bytes);
    return jac;
  }
  for (int64_t p = 0; p < x.size(0); ++p) {
    const at::Tensor out = model.forward(x.slice(0, p, p + 1))[0];
    if (mode == RowsMode::kBatchedOutputs) {
      batched_output_rows(params, out, col[p], jac.narrow(0, p * c, c));
      continue;
    }
    for (int64_t j = 0; j < c; ++j) gradient_row(params, out[cl[p][j]], jac[p * c + j]);
  }
  return jac;
}

RowsMode choose_rows_mode(models::Model& model, const at::Tensor& x, const at::Tensor& cols, std::string* why) {
  const auto params = parameters_of(model);
  const int64_t c = cols.size(1), n = count_params(params);
  const int64_t bytes = c * n * static_cast<int64_t>(params.front().element_size());
  auto per_row = [&](const std::string& reason) {
    if (why) *why = "one backward per row: " + reason;
    return RowsMode::kPerRow;
  };
  if (x.size(0) == 0 || c == 0) return per_row("no rows");
  if (bytes > kBatchedRowsMaxBytes) {
    return per_row("a probe's " + std::to_string(c) + " rows take " + std::to_string(bytes >> 20) +
                   " MiB, more than the batched backward's " + std::to_string(kBatchedRowsMaxBytes >> 20) + " MiB");
  }
  const at::Tensor x1 = x.slice(0, 0, 1), c1 = cols.slice(0, 0, 1);
  const at::Tensor want = explicit_probe_jacobian(model, x1, c1);
  const double scale = std::max(want.abs().max().item<double>(), 1e-300);
  auto off = [&](const at::Tensor& got) { return (got - want).abs().max().item<double>() / scale; };
  at::Tensor got = at::empty_like(want);
  std::string passed;  // why functorch's transforms were passed over
  if (model.swaps_parameters()) {
    try {
      functorch_rows_into(model, x1, c1, got, 1);
      const double d = off(got);
      if (d <= 1e-12) {
        if (why) *why = "functorch's vmap over blocks of probes of its grad transform, one backward a block";
        return RowsMode::kFunctorch;
      }
      passed = "functorch's rows differ from the per-row ones by " + std::to_string(d);
    } catch (const FunctorchRowsUnsupported& e) {
      passed = std::string("functorch's transforms refused it: ") + e.what();
    }
    passed = " (" + passed.substr(0, passed.find('\n')) + ")";
  }
  std::vector<std::string> fallbacks;
  try {
    batched_output_rows(params, model.forward(x1)[0], c1[0], got, &fallbacks);
  } catch (const BatchedRowsUnsupported& e) {
    return per_row(e.what() + passed);
  }
  if (!fallbacks.empty()) {
    std::string names;
    for (const auto& f : fallbacks) names += (names.empty() ? "" : ", ") + f;
    return per_row("no batching rule for " + names + passed);
  }
  const double d = off(got);
  if (!(d <= 1e-12)) return per_row("the batched rows differ from the per-row ones by " + std::to_string(d) + passed);
  if (why) *why = "one backward per probe, its " + std::to_string(c) + " rows as a batch" + passed;
  return RowsMode::kBatchedOutputs;
}

at::Tensor explicit_probe_jacobian(models::Model& model, const at::Tensor& x, const std::vector<int64_t>& outputs) {
  return explicit_probe_jacobian(model, x, shared_columns(x.size(0), outputs));
}

at::Tensor explicit_loss_jacobian(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss) {
  const auto params = parameters_of(model);
  at::Tensor jac = at::empty({x.size(0), count_params(params)}, params.front().options());
  if (model.in_training_context()) {
    // Batch-context rows: row m is the gradient of example m's loss as the batch's forward
    // computed it (its Dropout mask), one backward each through that one forward.
    const at::Tensor out = model.forward(x);
    for (int64_t m = 0; m < x.size(0); ++m) {
      gradient_row(params, batch_loss(out.slice(0, m, m + 1), y.slice(0, m, m + 1), loss), jac[m]);
    }
    return jac;
  }
  for (int64_t m = 0; m < x.size(0); ++m) {
    gradient_row(params, batch_loss(model.forward(x.slice(0, m, m + 1)), y.slice(0, m, m + 1), loss), jac[m]);
  }
  return jac;
}

at::Tensor flatten_params(models::Model& model, const ParamMap& v) {
  std::vector<at::Tensor> flat;
  for (const auto& item : model.named_parameters()) flat.push_back(v.at(item.key()).reshape({-1}));
  return at::cat(flat);
}

namespace {

std::vector<std::string> names_of(models::Model& model) {
  std::vector<std::string> n;
  for (const auto& item : model.named_parameters()) n.push_back(item.key());
  return n;
}

}  // namespace

RowGradients probe_rows(models::Model& model, const at::Tensor& x, const at::Tensor& cols, bool explicit_route,
                        at::Tensor* logits, RowsWorkspace* workspace) {
  RowGradients r;
  if (explicit_route && workspace) {
    const auto params = parameters_of(model);
    const int64_t rows = x.size(0) * cols.size(1), n = count_params(params);
    at::Tensor& buf = workspace->buffer;
    if (!buf.defined() || buf.numel() < rows * n || buf.scalar_type() != params.front().scalar_type()) {
      buf = at::empty({rows * n}, params.front().options());
    }
    if (!workspace->mode) workspace->mode = choose_rows_mode(model, x, cols, &workspace->why);
    r.jacobian =
        explicit_probe_jacobian_into(model, x, cols, buf.narrow(0, 0, rows * n).view({rows, n}), *workspace->mode).detach();
  } else if (explicit_route) {
    r.jacobian = explicit_probe_jacobian(model, x, cols).detach();
  }
  if (explicit_route) {
    r.names = names_of(model);
    if (logits) {
      at::NoGradGuard ng;
      *logits = model.forward(x);
    }
  } else {
    r.signals = probe_signals(model, x, cols, logits);
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
    // Dropout masks act per row, so the taps' rows are still each example's gradient; batch
    // statistics couple the rows, and no tapped (zoo) model has them.
    if (model.batch_coupled()) throw std::logic_error("loss_rows: factorized rows of a batch coupled by its statistics");
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

namespace {

/// Where each parameter sits in the flattened state_dict order.
struct Slot {
  int64_t offset = 0, numel = 0;
};
std::map<std::string, Slot> layout_of(models::Model& model) {
  std::map<std::string, Slot> out;
  int64_t offset = 0;
  for (const auto& item : model.named_parameters()) {
    out[item.key()] = {offset, item.value().numel()};
    offset += item.value().numel();
  }
  return out;
}

}  // namespace

at::Tensor row_jacobian(models::Model& model, const RowGradients& rows, at::Tensor out) {
  const auto layout = layout_of(model);
  int64_t n = 0;
  for (const auto& [name, slot] : layout) n += slot.numel;
  const int64_t r = rows.is_explicit() ? rows.jacobian.size(0) : rows.signals.rows;
  at::Tensor j = out.defined() && out.sizes() == at::IntArrayRef{r, n} ? out : at::empty({r, n}, at::kDouble);
  if (rows.is_explicit()) {
    const at::Tensor& src = rows.jacobian;  // already in `out` (a workspace lent to probe_rows): nothing to copy
    if (j.data_ptr() == src.data_ptr() && j.strides() == src.strides() && j.scalar_type() == src.scalar_type()) return j;
    return j.copy_(src);
  }
  // Only parameters outside every tapped layer need zeros (none on the factorized route): j is
  // [rows, n_params] and a pass over it costs about as much as forming it.
  const RowSignals& sig = rows.signals;
  int64_t covered = 0;
  for (const auto& t : sig.taps) {
    covered += layout.at(t.name + ".weight").numel + (t.bias.defined() ? layout.at(t.name + ".bias").numel : 0);
  }
  if (covered != n) j.zero_();
  for (size_t l = 0; l < sig.taps.size(); ++l) {
    const auto& t = sig.taps[l];
    const Slot ws = layout.at(t.name + ".weight");
    at::Tensor wrows = j.narrow(1, ws.offset, ws.numel);
    if (t.kind == models::LayerKind::kLinear) {  // the outer products, formed in place
      at::Tensor outer = wrows.view({r, t.grad_output.size(1), -1});
      at::mul_out(outer, t.grad_output.unsqueeze(2), row_inputs(t, sig.repeat).unsqueeze(1));
    } else {
      wrows.copy_(sig.conv_weight_grads[l]);
    }
    if (t.bias.defined()) {
      j.narrow(1, layout.at(t.name + ".bias").offset, layout.at(t.name + ".bias").numel)
          .copy_(t.kind == models::LayerKind::kLinear ? t.grad_output : sig.conv_bias_grads[l]);
    }
  }
  return j;
}

at::Tensor directions_dot_rows(models::Model& model, const RowGradients& rows, const at::Tensor& dirs) {
  if (rows.is_explicit()) return at::mm(dirs, rows.jacobian.t());
  const auto layout = layout_of(model);
  const int64_t nd = dirs.size(0);
  at::Tensor out = at::zeros({nd, rows.signals.rows}, at::kDouble);
  for (size_t l = 0; l < rows.signals.taps.size(); ++l) {
    const auto& t = rows.signals.taps[l];
    const Slot ws = layout.at(t.name + ".weight");
    const at::Tensor dw = dirs.narrow(1, ws.offset, ws.numel);
    if (t.kind == models::LayerKind::kLinear) {
      // sum_{o,i} G[r,o] Dir[d,o,i] A[r,i] = ((Dir A^T) [d, o, r] * G^T).sum(o)
      // (Dir A^T) once per distinct input: [d, o, P], against the R signal rows of each input.
      const int64_t n_out = t.weight.size(0), n_in = t.weight.size(1), rep = rows.signals.repeat;
      const int64_t p = rows.signals.rows / rep;
      const at::Tensor da = at::mm(dw.reshape({nd * n_out, n_in}), t.input.t()).reshape({nd, n_out, p, 1});
      out.add_((da * t.grad_output.t().reshape({1, n_out, p, rep})).sum(1).reshape({nd, rows.signals.rows}));
    } else {
      out.add_(at::mm(dw, rows.signals.conv_weight_grads[l].t()));
    }
    if (t.bias.defined()) {
      const Slot bs = layout.at(t.name + ".bias");
      const at::Tensor bias_rows =
          t.kind == models::LayerKind::kLinear ? t.grad_output : rows.signals.conv_bias_grads[l];
      out.add_(at::mm(dirs.narrow(1, bs.offset, bs.numel), bias_rows.t()));
    }
  }
  return out;
}

at::Tensor rows_weighted_sq(models::Model& model, const RowGradients& rows, const at::Tensor& p) {
  if (rows.is_explicit()) return at::mv(rows.jacobian.pow(2), p);
  const auto layout = layout_of(model);
  at::Tensor out = at::zeros({rows.signals.rows}, at::kDouble);
  for (size_t l = 0; l < rows.signals.taps.size(); ++l) {
    const auto& t = rows.signals.taps[l];
    const Slot ws = layout.at(t.name + ".weight");
    const at::Tensor pw = p.narrow(0, ws.offset, ws.numel);
    const at::Tensor g2 = t.kind == models::LayerKind::kLinear ? t.grad_output.pow(2) : at::Tensor();
    if (t.kind == models::LayerKind::kLinear) {
      // (G_r A_r^T)^2 = G_r^2 (A_r^2)^T, weighted by P_W: sum_o G_r,o^2 (P_W A_r^2)_o
      const int64_t rep = rows.signals.repeat, p = rows.signals.rows / rep;
      const at::Tensor pa = at::mm(t.input.pow(2), pw.reshape({t.weight.size(0), t.weight.size(1)}).t());
      out.add_((g2.view({p, rep, -1}) * pa.unsqueeze(1)).sum(2).view({rows.signals.rows}));
    } else {
      out.add_(at::mv(rows.signals.conv_weight_grads[l].pow(2), pw));
    }
    if (t.bias.defined()) {
      const Slot bs = layout.at(t.name + ".bias");
      const at::Tensor pb = p.narrow(0, bs.offset, bs.numel);
      out.add_(at::mv(t.kind == models::LayerKind::kLinear ? g2 : rows.signals.conv_bias_grads[l].pow(2), pb));
    }
  }
  return out;
}

}  // namespace pathkernel
