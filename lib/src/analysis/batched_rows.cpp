#include "pathkernel/analysis/batched_rows.h"

#include <ATen/ATen.h>
#include <ATen/BatchedTensorImpl.h>
#include <ATen/VmapMode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>

namespace pathkernel {

namespace {

using Stack = torch::jit::Stack;

// Every rule below handles one layout: the operator's first argument (the incoming gradient) is
// batched at one vmap level, and no other tensor argument is. That is the layout of a backward
// pass whose only batched input is its incoming gradient. The batch is always the leading
// dimension of the physical tensors the rules compute on.

/// The incoming gradient's physical value, batch dimension first, and its level.
struct Batch {
  at::Tensor grad;
  int64_t level = 0;
  int64_t size() const { return grad.size(0); }
  at::Tensor wrap(const at::Tensor& physical) const { return at::makeBatched(physical, {at::BatchDim(level, 0)}); }
};

Batch batch_of(const c10::OperatorHandle& op, const Stack& s) {
  const size_t n = op.schema().arguments().size();
  const auto args = torch::jit::last(s, n);
  Batch b;
  bool fits = args[0].isTensor();
  for (size_t i = 0; fits && i < n; ++i) {
    if (args[i].isTensorList()) fits = false;
    if (!args[i].isTensor()) continue;
    const at::BatchedTensorImpl* bt = at::maybeGetBatchedImpl(args[i].toTensor());
    if (i > 0) {
      fits = bt == nullptr;
    } else if (bt && bt->bdims().size() == 1) {
      b.grad = bt->value().movedim(bt->bdims()[0].dim(), 0);
      b.level = bt->bdims()[0].level();
    } else {
      fits = false;
    }
  }
  if (!fits) {
    throw BatchedRowsUnsupported("no batching rule for this call of " + op.schema().name() +
                                 " (only its incoming gradient may be batched)");
  }
  return b;
}

/// t repeated along a new leading batch dimension of size b, contiguous: [b, *t.shape].
at::Tensor repeated(const at::Tensor& t, int64_t b) {
  std::vector<int64_t> shape{b};
  shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
  return t.unsqueeze(0).expand(shape).contiguous();
}

/// [b, n, ...] -> [b * n, ...].
at::Tensor folded(const at::Tensor& t) {
  std::vector<int64_t> shape{t.size(0) * t.size(1)};
  shape.insert(shape.end(), t.sizes().begin() + 2, t.sizes().end());
  return t.reshape(shape);
}

/// Activation backwards (tanh, GELU, SiLU, ...): elementwise and linear in the incoming gradient,
/// so the derivative is computed once (the operator on a gradient of ones) and multiplies the
/// whole batch, rather than the operator running on every batch entry (GELU's erf ten times).
void elementwise_rule(const c10::OperatorHandle& op, Stack* s) {
  const Batch b = batch_of(op, *s);
  const size_t n = op.schema().arguments().size(), at0 = s->size() - n;
  const at::Tensor& other = (*s)[at0 + n - 1].isTensor() ? (*s)[at0 + n - 1].toTensor() : (*s)[at0 + 1].toTensor();
  (*s)[at0] = at::ones_like(other);
  op.callBoxed(s);
  s->back() = b.wrap(b.grad * s->back().toTensor());
}

/// _softmax_backward_data / _log_softmax_backward_data(grad_output, output, dim, input_dtype).
void softmax_rule(const c10::OperatorHandle& op, Stack* s) {
  const Batch b = batch_of(op, *s);
  const size_t n = op.schema().arguments().size(), at0 = s->size() - n;
  const at::Tensor output = (*s)[at0 + 1].toTensor();
  const int64_t dim = c10::maybe_wrap_dim((*s)[at0 + 2].toInt(), output.dim());
  (*s)[at0] = b.grad;
  (*s)[at0 + 1] = repeated(output, b.size());
  (*s)[at0 + 2] = dim + 1;
  op.callBoxed(s);
  s->back() = b.wrap(s->back().toTensor());
}

void push_three(Stack* s, size_t n, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  torch::jit::drop(*s, n);
  s->emplace_back(a);
  s->emplace_back(b);
  s->emplace_back(c);
}

/// A 2-d convolution's stride, padding or dilation: a list of one value stands for both.
std::vector<int64_t> pair(const c10::IValue& v) {
  std::vector<int64_t> out = v.toIntVector();
  if (out.size() == 1) out.push_back(out.front());
  return out;
}

/// convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
/// transposed, output_padding, groups, output_mask), 2-d, not transposed, one group. The input's
/// gradient folds the batch into the examples; the weight's is one product of the incoming
/// gradients with the input's patches (im2col), shared by the whole batch.
void convolution_backward_rule(const c10::OperatorHandle& op, Stack* s) {
  const Batch b = batch_of(op, *s);
  const size_t n = op.schema().arguments().size();
  const auto a = torch::jit::last(*s, n);
  const at::Tensor x = a[1].toTensor(), w = a[2].toTensor();
  if (x.dim() != 4 || a[7].toBool() || a[9].toInt() != 1) {
    throw BatchedRowsUnsupported("no batching rule for a transposed, grouped or non-2-d convolution_backward");
  }
  const auto stride = pair(a[4]), padding = pair(a[5]), dilation = pair(a[6]);
  const auto mask = a[10].toBoolList();
  const at::Tensor& go = b.grad;  // [B, N, Cout, Ho, Wo]
  const int64_t nb = b.size(), ne = x.size(0), co = w.size(0), l = go.size(3) * go.size(4);
  at::Tensor gi, gw, gbias;
  if (mask[0]) {
    const auto r = at::convolution_backward(folded(go), folded(repeated(x, nb)), w, c10::nullopt, stride, padding,
                                            dilation, false, a[8].toIntVector(), 1, {true, false, false});
    gi = b.wrap(std::get<0>(r).view({nb, ne, x.size(1), x.size(2), x.size(3)}));
  }
  if (mask[1]) {
    const at::Tensor cols = at::im2col(x, {w.size(2), w.size(3)}, dilation, padding, stride);  // [N, K, L]
    const at::Tensor g2 = go.reshape({nb, ne, co, l}).permute({0, 2, 1, 3}).reshape({nb * co, ne * l});
    const at::Tensor c2 = cols.permute({1, 0, 2}).reshape({cols.size(1), ne * l});
    gw = b.wrap(at::mm(g2, c2.t()).view({nb, co, w.size(1), w.size(2), w.size(3)}));
  }
  if (mask[2]) gbias = b.wrap(go.sum({1, 3, 4}));
  push_three(s, n, gi, gw, gbias);
}

/// max_pool2d_with_indices_backward(grad_output, self, kernel, stride, padding, dilation,
/// ceil_mode, indices): the batch folded into the examples (or made them, for a 3-d input).
void max_pool_rule(const c10::OperatorHandle& op, Stack* s) {
  const Batch b = batch_of(op, *s);
  const size_t n = op.schema().arguments().size();
  const auto a = torch::jit::last(*s, n);
  const at::Tensor self = a[1].toTensor(), idx = a[7].toTensor();
  const bool four = self.dim() == 4;
  auto fold = [&](const at::Tensor& t) { return four ? folded(t) : t; };
  const at::Tensor r = at::max_pool2d_with_indices_backward(
      fold(b.grad), fold(repeated(self, b.size())), a[2].toIntVector(), a[3].toIntVector(), a[4].toIntVector(),
      a[5].toIntVector(), a[6].toBool(), fold(repeated(idx, b.size())));
  std::vector<int64_t> shape{b.size()};
  shape.insert(shape.end(), self.sizes().begin(), self.sizes().end());
  torch::jit::drop(*s, n);
  s->emplace_back(b.wrap(r.view(shape)));
}

/// The dimensions of [B, *input] that a per-feature gradient (weight, bias) sums over: all but
/// the batch and the `keep` features.
std::vector<int64_t> summed_dims(int64_t dims, const std::vector<int64_t>& keep) {
  std::vector<int64_t> out;
  for (int64_t d = 1; d < dims; ++d) {
    if (std::find(keep.begin(), keep.end(), d) == keep.end()) out.push_back(d);
  }
  return out;
}

/// native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias,
/// output_mask): the input's gradient with the batch as extra rows; the weight's and bias's as
/// sums of the incoming gradient (times the normalized input) per batch entry.
void layer_norm_rule(const c10::OperatorHandle& op, Stack* s) {
  const Batch b = batch_of(op, *s);
  const size_t n = op.schema().arguments().size();
  const auto a = torch::jit::last(*s, n);
  const at::Tensor x = a[1].toTensor(), mean = a[3].toTensor(), rstd = a[4].toTensor();
  const auto shape = a[2].toIntVector();
  const auto mask = a[7].toBoolList();
  std::vector<int64_t> keep;  // the normalized dimensions, in [B, *input]
  for (int64_t d = x.dim() - static_cast<int64_t>(shape.size()); d < x.dim(); ++d) keep.push_back(d + 1);
  const auto red = summed_dims(x.dim() + 1, keep);
  at::Tensor gi, gw, gbias;
  const at::Tensor xhat = (x - mean) * rstd;
  if (mask[0]) {
    // dx = rstd (g - mean(g) - xhat mean(g xhat)), g the incoming gradient times the weight, the
    // means over the normalized dimensions: the batch broadcasts, nothing is repeated.
    const auto w = a[5].toOptional<at::Tensor>();
    const at::Tensor g = w && w->defined() ? b.grad * *w : b.grad;
    gi = b.wrap(rstd * (g - g.mean(keep, true) - xhat * (g * xhat).mean(keep, true)));
  }
  if (mask[1]) gw = b.wrap((b.grad * xhat).sum(red));
  if (mask[2]) gbias = b.wrap(b.grad.sum(red));
  push_three(s, n, gi, gw, gbias);
}

/// native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
/// save_invstd, train, eps, output_mask) in eval mode: per channel (dimension 1), an affine map
/// of the running statistics.
void batch_norm_rule(const c10::OperatorHandle& op, Stack* s) {
  const Batch b = batch_of(op, *s);
  const size_t n = op.schema().arguments().size();
  const auto a = torch::jit::last(*s, n);
  if (a[7].toBool() || a[3].isNone() || a[4].isNone()) {
    throw BatchedRowsUnsupported("no batching rule for native_batch_norm_backward in training mode");
  }
  const at::Tensor x = a[1].toTensor();
  const auto w = a[2].toOptional<at::Tensor>();
  std::vector<int64_t> per_channel(static_cast<size_t>(x.dim()), 1);
  per_channel[1] = x.size(1);
  const at::Tensor invstd = (a[4].toTensor() + a[8].toDouble()).rsqrt().view(per_channel);
  const at::Tensor mean = a[3].toTensor().view(per_channel);
  const auto mask = a[9].toBoolList();
  const auto red = summed_dims(x.dim() + 1, {2});
  at::Tensor gi, gw, gbias;
  if (mask[0]) gi = b.wrap(b.grad * (w && w->defined() ? invstd * w->view(per_channel) : invstd));
  if (mask[1]) gw = b.wrap((b.grad * ((x - mean) * invstd)).sum(red));
  if (mask[2]) gbias = b.wrap(b.grad.sum(red));
  push_three(s, n, gi, gw, gbias);
}

}  // namespace

BatchOperand batch_operand(const at::Tensor& t, const std::string& op) {
  const at::BatchedTensorImpl* bt = t.defined() ? at::maybeGetBatchedImpl(t) : nullptr;
  if (bt == nullptr) return {t, -1};
  if (bt->bdims().size() != 1) throw BatchedRowsUnsupported("no batching rule for " + op + " nested in vmap levels");
  return {bt->value().movedim(bt->bdims()[0].dim(), 0), bt->bdims()[0].level()};
}

namespace {

/// mm(self [n, k], mat2 [k, m]) and bmm(self [B, n, k], mat2 [B, k, m]) when one side is batched:
/// the batch folded into the rows (a batched left side) or the columns (a batched right side) of
/// one product, instead of LibTorch's own rule, which makes it the batch of a bmm (a loop over
/// tiny matrices on CPU: the backward of attention's products). Both sides batched at one level:
/// a broadcasting matmul of the physical values.
void product_rule(const c10::OperatorHandle& op, Stack* s) {
  const std::string name = op.schema().name();
  const bool batch_of_matrices = name == "aten::bmm";
  const BatchOperand left = batch_operand((*s)[s->size() - 2].toTensor(), name);
  const BatchOperand right = batch_operand((*s)[s->size() - 1].toTensor(), name);
  const at::Tensor &a = left.t, &b = right.t;
  const int64_t la = left.level, lb = right.level;
  torch::jit::drop(*s, 2);
  const int64_t level = std::max(la, lb);
  at::Tensor r;
  if (la >= 0 && lb >= 0) {
    if (la != lb) throw BatchedRowsUnsupported("no batching rule for " + name + " of two vmap levels");
    r = at::matmul(a, b);
  } else if (!batch_of_matrices) {
    const int64_t nb = la >= 0 ? a.size(0) : b.size(0);
    if (la >= 0) {  // [N, n, k] x [k, m]
      r = at::mm(a.reshape({nb * a.size(1), a.size(2)}), b).view({nb, a.size(1), b.size(1)});
    } else {  // [n, k] x [N, k, m], as (x^T a^T)^T: a weight's gradient, transposed next, comes out contiguous
      r = at::mm(b.transpose(1, 2).reshape({nb * b.size(2), b.size(1)}), a.t())
              .view({nb, b.size(2), a.size(0)})
              .transpose(1, 2);
    }
  } else if (la >= 0) {  // [N, B, n, k] x [B, k, m]
    const int64_t nb = a.size(0), bb = a.size(1), n = a.size(2), m = b.size(2);
    r = at::bmm(a.transpose(0, 1).reshape({bb, nb * n, a.size(3)}), b).view({bb, nb, n, m}).transpose(0, 1);
  } else {  // [B, n, k] x [N, B, k, m]
    const int64_t nb = b.size(0), bb = b.size(1), n = a.size(1), m = b.size(3);
    r = at::bmm(a, b.permute({1, 2, 0, 3}).reshape({bb, b.size(2), nb * m})).view({bb, n, nb, m}).permute({2, 0, 1, 3});
  }
  s->emplace_back(at::makeBatched(r, {at::BatchDim(level, 0)}));
}

TORCH_LIBRARY_IMPL(aten, Batched, m) {
  // LibTorch 1.13 has rules of its own for threshold_backward (ReLU) and sigmoid_backward.
  for (const char* name : {"tanh_backward", "gelu_backward", "silu_backward", "elu_backward", "hardtanh_backward",
                           "leaky_relu_backward", "softplus_backward", "hardswish_backward", "mish_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&elementwise_rule>());
  }
  m.impl("_softmax_backward_data", torch::CppFunction::makeFromBoxedFunction<&softmax_rule>());
  m.impl("_log_softmax_backward_data", torch::CppFunction::makeFromBoxedFunction<&softmax_rule>());
  m.impl("convolution_backward", torch::CppFunction::makeFromBoxedFunction<&convolution_backward_rule>());
  m.impl("max_pool2d_with_indices_backward", torch::CppFunction::makeFromBoxedFunction<&max_pool_rule>());
  m.impl("native_layer_norm_backward", torch::CppFunction::makeFromBoxedFunction<&layer_norm_rule>());
  m.impl("native_batch_norm_backward", torch::CppFunction::makeFromBoxedFunction<&batch_norm_rule>());
}

/// Collects the names of the operators ATen's vmap fallback ran while it is installed (its
/// warnings are shown only while the context's switch is on); passes other warnings on.
class FallbackRecorder : public c10::WarningHandler {
 public:
  explicit FallbackRecorder(std::vector<std::string>* out) : out_(out), prev_(c10::Warning::get_warning_handler()) {
    c10::Warning::set_warning_handler(this);
    was_on_ = at::globalContext().areVmapFallbackWarningsEnabled();
    at::globalContext().setDisplayVmapFallbackWarnings(true);
  }
  ~FallbackRecorder() override {
    at::globalContext().setDisplayVmapFallbackWarnings(was_on_);
    c10::Warning::set_warning_handler(prev_);
  }
  FallbackRecorder(const FallbackRecorder&) = delete;
  FallbackRecorder& operator=(const FallbackRecorder&) = delete;
  void process(const c10::SourceLocation& where, const std::string& msg, const bool verbatim) override {
    const std::string key = "batching rule for ";
    const size_t at = msg.find(key);
    if (at == std::string::npos) return prev_->process(where, msg, verbatim);
    const size_t from = at + key.size();
    std::string name = msg.substr(from, msg.find_first_of(". ", from) - from);
    if (std::find(out_->begin(), out_->end(), name) == out_->end()) out_->push_back(name);
  }

 private:
  std::vector<std::string>* out_;
  c10::WarningHandler* prev_;
  bool was_on_ = false;
};

}  // namespace

/// mm and bmm have Batched kernels of LibTorch's own: product_rule replaces them on first use (a
/// registration at load time would print the dispatcher's notice in every run of every program).
void use_product_rules() {
  static const std::unique_ptr<torch::Library> lib = [] {
    const QuietOverride quiet;
    auto l = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::Batched, __FILE__,
                                              static_cast<uint32_t>(__LINE__));
    l->impl("mm", torch::CppFunction::makeFromBoxedFunction<&product_rule>());
    l->impl("bmm", torch::CppFunction::makeFromBoxedFunction<&product_rule>());
    return l;
  }();
}

void batched_output_rows(const std::vector<at::Tensor>& params, const at::Tensor& out, const at::Tensor& cols,
                         at::Tensor rows, std::vector<std::string>* fallbacks) {
  use_product_rules();
  const int64_t c = cols.numel();
  at::Tensor seeds = at::zeros({c, out.numel()}, out.options());
  seeds.scatter_(1, cols.reshape({c, 1}).to(at::kLong), 1.0);
  std::vector<int64_t> shape{c};
  shape.insert(shape.end(), out.sizes().begin(), out.sizes().end());
  std::vector<at::Tensor> g;
  {
    std::unique_ptr<FallbackRecorder> rec = fallbacks ? std::make_unique<FallbackRecorder>(fallbacks) : nullptr;
    const VmapLevel level;
    g = torch::autograd::grad({out}, params, {at::_add_batch_dim(seeds.view(shape), 0, level.id())},
                              /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
    for (auto& t : g) {
      if (t.defined()) t = at::_remove_batch_dim(t, level.id(), c, 0);
    }
  }
  gradients_into_rows(params, g, rows);
}

void gradients_into_rows(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, at::Tensor rows) {
  const int64_t c = rows.size(0);
  int64_t at_ = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = params[i].numel();
    if (grads[i].defined()) {
      // Straight from the gradient's own layout (a reshape would copy a strided one first): the
      // rows' stretch viewed as the gradient's leading dims when they count the rows ([B, C']
      // from functorch), else as [C].
      std::vector<int64_t> shape;
      int64_t count = 1;
      for (int64_t d = 0; d < grads[i].dim() - params[i].dim(); ++d) {
        shape.push_back(grads[i].size(d));
        count *= grads[i].size(d);
      }
      if (shape.empty() || count != c) shape = {c};
      shape.insert(shape.end(), params[i].sizes().begin(), params[i].sizes().end());
      rows.narrow(1, at_, n).view(shape).copy_(grads[i]);
    } else {
      rows.narrow(1, at_, n).zero_();
    }
    at_ += n;
  }
}

}  // namespace pathkernel
