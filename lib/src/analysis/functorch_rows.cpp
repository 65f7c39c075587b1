#include "pathkernel/analysis/functorch_rows.h"

#include <ATen/ATen.h>
#include <ATen/functorch/BatchedTensorImpl.h>
#include <ATen/functorch/DynamicLayer.h>
#include <ATen/functorch/TensorWrapper.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>

#include <map>
#include <vector>

#include "pathkernel/analysis/batched_rows.h"
#include "pathkernel/models/model.h"

namespace pathkernel {
namespace {

namespace ft = at::functorch;

/// A functorch transform layer for the scope: popped on every exit (the layers nest, so the
/// innermost is popped first), also when a forward inside it throws.
class TransformLayer {
 public:
  /// A vmap layer of `size` (randomness refused: a row must not depend on its probe's batch).
  explicit TransformLayer(int64_t size)
      : level_(ft::initAndPushDynamicLayer(ft::TransformType::Vmap, size, ft::RandomnessType::Error)) {}
  /// A grad layer (functorch's grad_increment_nesting).
  TransformLayer()
      : level_(ft::initAndPushDynamicLayer(ft::TransformType::Grad, c10::nullopt, c10::nullopt,
                                           c10::GradMode::is_enabled())) {}
  TransformLayer(const TransformLayer&) = delete;
  TransformLayer& operator=(const TransformLayer&) = delete;
  ~TransformLayer() {
    try {
      close();
    } catch (...) {  // a destructor must not throw; the stack is functorch's to check
    }
  }
  void close() {
    if (!open_) return;
    open_ = false;
    ft::popDynamicLayerAndDeleteMetadata();
  }
  int64_t level() const { return level_; }

 private:
  int64_t level_;
  bool open_ = true;
};

/// `t`'s batch dimension of `level` moved first ([size, ...]); broadcast to it when `t` does not
/// vary at that level (a gradient that does not depend on the probe or on the output).
at::Tensor take_level(const at::Tensor& t, int64_t level, int64_t size) {
  if (auto* b = ft::maybeGetBatchedImpl(t); b && b->level() == level) return b->value().movedim(b->bdim(), 0);
  std::vector<int64_t> shape{size};
  shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
  return t.unsqueeze(0).expand(shape);
}

/// The parameters (detached before any layer: an operator under a grad layer wraps its result)
/// wrapped for the grad layer `level`, one wrapper per distinct tensor (a
/// parameter listed twice, shared, gets the sum of its uses' gradients in both places, as
/// autograd gives the model's own).
std::vector<at::Tensor> wrap_parameters(const std::vector<at::Tensor>& params, int64_t level) {
  std::vector<at::Tensor> wrapped;
  std::map<const void*, size_t> seen;
  ft::setInplaceRequiresGradAllowed(true);
  try {
    for (const auto& p : params) {
      const auto [it, fresh] = seen.emplace(p.unsafeGetTensorImpl(), wrapped.size());
      if (!fresh) {
        wrapped.push_back(wrapped[it->second]);
        continue;
      }
      wrapped.push_back(ft::makeTensorWrapper(p, level));
      wrapped.back().requires_grad_(true);
    }
  } catch (...) {
    ft::setInplaceRequiresGradAllowed(false);
    throw;
  }
  ft::setInplaceRequiresGradAllowed(false);
  return wrapped;
}

/// One block of B probes: `grads[i]` [B, C', *shape of params[i]] (undefined: not used).
std::vector<at::Tensor> block_gradients(models::Model& model, const std::vector<at::Tensor>& params,
                                        const at::Tensor& x, const at::Tensor& cols) {
  const int64_t b = x.size(0), c = cols.size(1);
  TransformLayer probes(b);
  const at::Tensor xb = ft::addBatchDim(x.unsqueeze(1), 0, probes.level());  // each probe a batch of one
  std::vector<at::Tensor> wrapped;
  at::Tensor out;
  {
    TransformLayer grad;
    at::AutoGradMode on(true);
    wrapped = wrap_parameters(params, grad.level());
    out = model.forward_with_parameters(wrapped, ft::makeTensorWrapper(xb, grad.level()));
    grad.close();
  }
  // Output cols[p][j] of probe p: a one-hot seed per (j, p), batched over the outputs outside the
  // probes (as vmap(jacrev) nests them), flattened index into the probe's outputs.
  const int64_t k = out.numel();
  std::vector<int64_t> shape{c, b};
  shape.insert(shape.end(), out.sizes().begin(), out.sizes().end());
  const at::Tensor onehot =
      at::zeros({c, b, k}, params.front().options()).scatter_(2, cols.t().unsqueeze(2), 1.0).view(shape);
  TransformLayer outputs(c);
  const at::Tensor seeds = ft::addBatchDim(ft::addBatchDim(onehot, 1, probes.level()), 0, outputs.level());
  std::vector<at::Tensor> g = torch::autograd::grad({out}, wrapped, {seeds}, /*retain_graph=*/false,
                                                    /*create_graph=*/false, /*allow_unused=*/true);
  for (auto& t : g) {
    if (t.defined()) t = take_level(t, outputs.level(), c);
  }
  outputs.close();
  for (auto& t : g) {
    if (t.defined()) t = take_level(t, probes.level(), b);
  }
  return g;
}

}  // namespace

void functorch_rows_into(models::Model& model, const at::Tensor& x, const at::Tensor& cols, at::Tensor rows,
                         int64_t block) {
  if (!model.swaps_parameters()) {
    throw FunctorchRowsUnsupported("the model runs on its own parameters only (" + model.spec().str() + ")");
  }
  std::vector<at::Tensor> params;
  std::map<const void*, at::Tensor> detached;  // one per distinct tensor, so that sharing stays visible
  for (const auto& item : model.named_parameters()) {
    at::Tensor& d = detached[item.value().unsafeGetTensorImpl()];
    if (!d.defined()) d = item.value().detach();
    params.push_back(d);
  }
  const int64_t c = cols.size(1);
  block = std::max<int64_t>(1, block);
  for (int64_t p0 = 0; p0 < x.size(0); p0 += block) {
    const int64_t b = std::min(block, x.size(0) - p0);
    std::vector<at::Tensor> g;
    try {
      g = block_gradients(model, params, x.narrow(0, p0, b), cols.narrow(0, p0, b).contiguous());
    } catch (const c10::Error& e) {  // a transform's own refusal, or the forward's under it
      throw FunctorchRowsUnsupported(e.what_without_backtrace());
    } catch (const std::runtime_error& e) {  // the TorchScript interpreter's
      throw FunctorchRowsUnsupported(e.what());
    }
    gradients_into_rows(params, g, rows.narrow(0, p0 * c, b * c));  // g[i]: [B, C', *shape]
  }
}

}  // namespace pathkernel
