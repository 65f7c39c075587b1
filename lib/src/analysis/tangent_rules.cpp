// Batching rules for the tangents of a forward-mode pass that carries several directions at once
// (ATen's vmap batched tensors as the parameters' tangents): a convolution whose weight tangent
// holds the directions becomes one convolution with the directions stacked as output channels
// (the input's patches formed once), one whose input tangent holds them folds them into the
// examples; a mean reduces the physical dimensions; flatten and gather serve max-pooling's
// tangent; unsafe_split serves an LSTM's gates. ATen's loop fallback (right, one call per
// direction) serves every other layout and operator.
#include <ATen/ATen.h>
#include <ATen/BatchedTensorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>

#include "pathkernel/analysis/batched_rows.h"

namespace pathkernel {

namespace {

using Stack = torch::jit::Stack;

/// The common level of the batched operands (throws for two levels) and their batch size.
std::pair<int64_t, int64_t> level_of(const std::vector<const BatchOperand*>& ops, const std::string& name) {
  int64_t level = -1, size = 0;
  for (const BatchOperand* o : ops) {
    if (!o->batched()) continue;
    if (level >= 0 && level != o->level) throw BatchedRowsUnsupported("no batching rule for " + name + " of two vmap levels");
    level = o->level;
    size = o->t.size(0);
  }
  return {level, size};
}

at::Tensor entry(const BatchOperand& o, int64_t i) { return o.batched() ? o.t.select(0, i) : o.t; }

/// convolution(input, weight, bias?, stride, padding, dilation, transposed, output_padding,
/// groups) with any of input, weight and bias batched at one level.
void convolution_rule(const c10::OperatorHandle& op, Stack* s) {
  const auto a = torch::jit::last(*s, 9);
  const std::string name = op.schema().name();
  const BatchOperand in = batch_operand(a[0].toTensor(), name), w = batch_operand(a[1].toTensor(), name);
  const BatchOperand b = batch_operand(a[2].isTensor() ? a[2].toTensor() : at::Tensor(), name);
  const auto stride = a[3].toIntVector(), padding = a[4].toIntVector(), dilation = a[5].toIntVector();
  const bool transposed = a[6].toBool();
  const auto out_pad = a[7].toIntVector();
  const int64_t groups = a[8].toInt();
  const auto [level, nb] = level_of({&in, &w, &b}, name);
  auto conv = [&](const at::Tensor& x, const at::Tensor& k, const at::Tensor& bias) {
    return at::convolution(x, k, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt, stride, padding,
                           dilation, transposed, out_pad, groups);
  };
  at::Tensor r;
  if (in.batched() && !w.batched() && !b.batched()) {  // the directions as more examples
    const at::Tensor y = conv(in.t.flatten(0, 1), w.t, b.t);
    std::vector<int64_t> shape{nb, in.t.size(1)};
    shape.insert(shape.end(), y.sizes().begin() + 1, y.sizes().end());
    r = y.view(shape);
  } else if (!in.batched() && !transposed && groups == 1) {  // the directions as more output channels
    const int64_t co = w.batched() ? w.t.size(1) : w.t.size(0);
    std::vector<int64_t> wshape{nb};
    wshape.insert(wshape.end(), w.t.sizes().begin() + (w.batched() ? 1 : 0), w.t.sizes().end());
    const at::Tensor k = (w.batched() ? w.t : w.t.unsqueeze(0).expand(wshape)).flatten(0, 1);
    at::Tensor bias;
    if (b.batched()) bias = b.t.flatten(0, 1);
    if (!b.batched() && b.t.defined()) bias = b.t.repeat({nb});
    const at::Tensor y = conv(in.t, k.contiguous(), bias);  // [N, nb * co, ...]
    std::vector<int64_t> shape{y.size(0), nb, co};
    shape.insert(shape.end(), y.sizes().begin() + 2, y.sizes().end());
    // Batch first in memory too: a tangent becomes an output's forward gradient only in that layout.
    r = y.view(shape).transpose(0, 1).contiguous();
  } else {  // one convolution per direction
    std::vector<at::Tensor> parts;
    for (int64_t i = 0; i < nb; ++i) parts.push_back(conv(entry(in, i), entry(w, i), entry(b, i)));
    r = at::stack(parts);
  }
  torch::jit::drop(*s, 9);
  s->emplace_back(at::makeBatched(r, {at::BatchDim(level, 0)}));
}

/// mean.dim(self, dim?, keepdim, dtype?) of a batched self: the same mean over the physical
/// dimensions (every logical one when dim is empty).
void mean_rule(const c10::OperatorHandle& op, Stack* s) {
  const auto a = torch::jit::last(*s, 4);
  const BatchOperand x = batch_operand(a[0].toTensor(), op.schema().name());
  const int64_t rank = x.t.dim() - 1;
  std::vector<int64_t> dims;
  if (!a[1].isNone()) dims = a[1].toIntVector();
  if (dims.empty()) {
    for (int64_t d = 0; d < rank; ++d) dims.push_back(d);
  }
  for (int64_t& d : dims) d = c10::maybe_wrap_dim(d, rank) + 1;
  const bool keepdim = a[2].toBool();
  const c10::optional<at::ScalarType> dtype = a[3].toOptional<at::ScalarType>();
  const at::Tensor r = at::mean(x.t, dims, keepdim, dtype);
  torch::jit::drop(*s, 4);
  s->emplace_back(at::makeBatched(r, {at::BatchDim(x.level, 0)}));
}

/// flatten.using_ints(self, start_dim, end_dim) of a batched self: a view, so ATen's fallback
/// refuses it (max-pooling's tangent formula flattens the tangent).
void flatten_rule(const c10::OperatorHandle& op, Stack* s) {
  const auto a = torch::jit::last(*s, 3);
  const BatchOperand x = batch_operand(a[0].toTensor(), op.schema().name());
  const int64_t rank = x.t.dim() - 1;
  at::Tensor r;
  if (rank == 0) {
    r = x.t.unsqueeze(1);
  } else {
    r = x.t.flatten(c10::maybe_wrap_dim(a[1].toInt(), rank) + 1, c10::maybe_wrap_dim(a[2].toInt(), rank) + 1);
  }
  torch::jit::drop(*s, 3);
  s->emplace_back(at::makeBatched(r, {at::BatchDim(x.level, 0)}));
}

/// gather(self, dim, index, sparse_grad) of a batched self with an index shared by the batch.
void gather_rule(const c10::OperatorHandle& op, Stack* s) {
  const auto a = torch::jit::last(*s, 4);
  const std::string name = op.schema().name();
  const BatchOperand x = batch_operand(a[0].toTensor(), name), index = batch_operand(a[2].toTensor(), name);
  const int64_t rank = x.t.dim() - 1;
  at::Tensor r;
  if (!index.batched() && rank > 0) {
    std::vector<int64_t> shape{x.t.size(0)};
    shape.insert(shape.end(), index.t.sizes().begin(), index.t.sizes().end());
    r = at::gather(x.t, c10::maybe_wrap_dim(a[1].toInt(), rank) + 1, index.t.unsqueeze(0).expand(shape), a[3].toBool());
  } else {  // one gather per batch entry
    const auto [level, nb] = level_of({&x, &index}, name);
    std::vector<at::Tensor> parts;
    for (int64_t i = 0; i < nb; ++i) parts.push_back(at::gather(entry(x, i), a[1].toInt(), entry(index, i), a[3].toBool()));
    torch::jit::drop(*s, 4);
    s->emplace_back(at::makeBatched(at::stack(parts), {at::BatchDim(level, 0)}));
    return;
  }
  torch::jit::drop(*s, 4);
  s->emplace_back(at::makeBatched(r, {at::BatchDim(x.level, 0)}));
}

/// unsafe_split.Tensor(self, split_size, dim) and unsafe_split_with_sizes(self, split_sizes, dim)
/// of a batched self (an LSTM's gates: unsafe_chunk): the physical tensor split along dim + 1.
/// Returns a list, which ATen's fallback cannot.
void split_rule(const c10::OperatorHandle& op, Stack* s) {
  const auto a = torch::jit::last(*s, 3);
  const BatchOperand x = batch_operand(a[0].toTensor(), op.schema().name());
  const int64_t dim = c10::maybe_wrap_dim(a[2].toInt(), x.t.dim() - 1) + 1;
  const std::vector<at::Tensor> parts = a[1].isInt() ? at::unsafe_split(x.t, a[1].toInt(), dim)
                                                     : at::unsafe_split_with_sizes(x.t, a[1].toIntVector(), dim);
  c10::List<at::Tensor> out;
  for (const at::Tensor& p : parts) out.push_back(at::makeBatched(p, {at::BatchDim(x.level, 0)}));
  torch::jit::drop(*s, 3);
  s->emplace_back(std::move(out));
}

/// _new_zeros_with_same_feature_meta(self, other, self_num_batch_dims) of a batched self: what
/// forward AD's set_fw_grad makes when a tangent's layout is not its primal's (attention's
/// transposes), zeros in other's layout with the batch in front, which the tangent is then copied
/// into. LibTorch's own rule refuses a self whose batch is not first in memory; the zeros need
/// only self's batch size, so the batch is moved to the front as a view.
void feature_zeros_rule(const c10::OperatorHandle& op, Stack* s) {
  const auto a = torch::jit::last(*s, 3);
  const std::string name = op.schema().name();
  const BatchOperand x = batch_operand(a[0].toTensor(), name), other = batch_operand(a[1].toTensor(), name);
  if (other.batched() || a[2].toInt() != 0) throw BatchedRowsUnsupported("no batching rule for " + name + " of a batched other");
  const at::Tensor r = at::_new_zeros_with_same_feature_meta(x.t, other.t, 1);
  torch::jit::drop(*s, 3);
  s->emplace_back(at::makeBatched(r, {at::BatchDim(x.level, 0)}));
}

}  // namespace

void use_tangent_rules() {
  use_product_rules();
  // None of these but _new_zeros_with_same_feature_meta has a Batched kernel of LibTorch's own
  // (ATen's loop fallback, which refuses views such as flatten and lists such as unsafe_split's).
  static const std::unique_ptr<torch::Library> lib = [] {
    const QuietOverride quiet;  // _new_zeros_with_same_feature_meta replaces LibTorch's rule
    auto l = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::Batched, __FILE__,
                                              static_cast<uint32_t>(__LINE__));
    l->impl("convolution", torch::CppFunction::makeFromBoxedFunction<&convolution_rule>());
    l->impl("mean.dim", torch::CppFunction::makeFromBoxedFunction<&mean_rule>());
    l->impl("flatten.using_ints", torch::CppFunction::makeFromBoxedFunction<&flatten_rule>());
    l->impl("gather", torch::CppFunction::makeFromBoxedFunction<&gather_rule>());
    l->impl("unsafe_split.Tensor", torch::CppFunction::makeFromBoxedFunction<&split_rule>());
    l->impl("unsafe_split_with_sizes", torch::CppFunction::makeFromBoxedFunction<&split_rule>());
    l->impl("_new_zeros_with_same_feature_meta", torch::CppFunction::makeFromBoxedFunction<&feature_zeros_rule>());
    return l;
  }();
}

}  // namespace pathkernel
