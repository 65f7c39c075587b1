#include "pathkernel/sgd.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>

#include "pathkernel/errors.h"
#include "pathkernel/per_example.h"

namespace pathkernel {

LossKind parse_loss(const std::string& name) {
  if (name == "ce") return LossKind::kCrossEntropy;
  if (name == "mse") return LossKind::kMse;
  throw InputError("--loss must be ce or mse, got '" + name + "'");
}

std::string loss_name(LossKind kind) { return kind == LossKind::kCrossEntropy ? "ce" : "mse"; }

at::Tensor batch_loss(const at::Tensor& logits, const at::Tensor& labels, LossKind kind) {
  if (kind == LossKind::kCrossEntropy) return at::cross_entropy_loss(logits, labels);
  const at::Tensor onehot = at::one_hot(labels, logits.size(1)).to(logits.scalar_type());
  return (logits - onehot).pow(2).sum(1).mean() * 0.5;
}

NamedTensors state_dict_of(models::Model& model) {
  NamedTensors out;
  for (const auto& item : model.named_parameters()) out.emplace_back(item.key(), item.value().detach());
  return out;
}

void load_weights(models::Model& model, const NamedTensors& weights, const std::string& source) {
  auto params = model.named_parameters();
  if (weights.size() != params.size()) {
    throw InputError(source + ": has " + std::to_string(weights.size()) + " tensors, model '" +
                     model.spec().str() + "' has " + std::to_string(params.size()) + " parameters");
  }
  at::NoGradGuard no_grad;
  for (const auto& [name, t] : weights) {
    at::Tensor* p = params.find(name);
    if (!p) throw InputError(source + ": unexpected tensor '" + name + "' for model '" + model.spec().str() + "'");
    if (p->sizes() != t.sizes()) {
      throw InputError(source + ": tensor '" + name + "' has shape " + c10::str(t.sizes()) + ", model expects " +
                       c10::str(p->sizes()));
    }
    p->copy_(t);
  }
}

SgdStepper::SgdStepper(models::Model& model, SgdOptions options, LossKind loss)
    : model_(model), options_(options), loss_(loss) {
  for (const auto& item : model.named_parameters()) {
    names_.push_back(item.key());
    params_.push_back(item.value());
  }
  buffers_.resize(params_.size());
  grads_.resize(params_.size());
  grad_sq_.resize(params_.size());
  sync_norms();
}

int64_t SgdStepper::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : params_) n += p.numel();
  return n;
}

namespace {

std::string layer_of(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(0, dot);
}

/// |t|^2 as one BLAS dot product (no temporary). Accumulates in t's dtype: these norms are
/// diagnostics, good to about 1e-6 relative in float32.
double squared_norm(const at::Tensor& t) {
  const at::Tensor flat = t.reshape({-1});
  return at::dot(flat, flat).item<double>();
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

StepRecord SgdStepper::step(const at::Tensor& x, const at::Tensor& y, double lr, bool per_example) {
  StepRecord rec;
  rec.lr = lr;
  // Zeroed in place, as torch::optim does: a fresh gradient tensor per step costs an mmap.
  for (auto& p : params_) {
    if (p.grad().defined()) p.mutable_grad().zero_();
  }
  model_.set_capture(per_example);
  const at::Tensor logits = model_.forward(x);
  const at::Tensor loss = batch_loss(logits, y, loss_);
  loss.backward();
  model_.set_capture(false);
  rec.loss = loss.item<double>();
  rec.accuracy = static_cast<double>(logits.argmax(1).eq(y).sum().item<int64_t>()) / static_cast<double>(y.size(0));

  std::map<std::string, double> layer_sq;
  std::vector<std::string> layer_order;
  double grad_sq = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    grads_[i] = params_[i].grad();
    const double sq = squared_norm(grads_[i]);
    grad_sq_[i] = sq;
    grad_sq += sq;
    const std::string layer = layer_of(names_[i]);
    if (!layer_sq.count(layer)) layer_order.push_back(layer);
    layer_sq[layer] += sq;
  }
  rec.grad_norm = std::sqrt(grad_sq);
  for (const auto& l : layer_order) rec.layer_grad_norms.emplace_back(l, std::sqrt(layer_sq[l]));

  if (per_example && model_.taps().empty()) {
    rec.pe_grad_min = rec.pe_grad_median = rec.pe_grad_max = NAN;  // no taps: logged as null
  } else if (per_example) {
    std::vector<double> v = per_example_grad_sq_norms_vec(model_.taps(), static_cast<double>(x.size(0)));
    for (double& e : v) e = std::sqrt(e);
    rec.pe_grad_min = *std::min_element(v.begin(), v.end());
    rec.pe_grad_max = *std::max_element(v.begin(), v.end());
    rec.pe_grad_median = median_of(v);
    model_.clear_captures();
  }

  if (!std::isfinite(rec.loss)) {
    rec.finite = false;
    rec.nonfinite = "loss";
    return rec;
  }
  if (!std::isfinite(rec.grad_norm)) {
    rec.finite = false;
    rec.nonfinite = "gradient";
    return rec;
  }

  at::NoGradGuard no_grad;
  if (!update_in_place_is_safe(lr)) return update_out_of_place(rec, lr);
  // In place, as torch::optim::SGD does it: v = mu v + (g + lambda w); w -= lr v.
  double update_sq = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor d = grads_[i];
    if (options_.weight_decay != 0) d = d.add(params_[i], options_.weight_decay);
    if (options_.momentum != 0) {
      if (buffers_[i].defined()) {
        buffers_[i].mul_(options_.momentum).add_(d);
      } else {
        buffers_[i] = d.clone();
      }
      d = buffers_[i];
    }
    update_sq += d.data_ptr() == grads_[i].data_ptr() ? grad_sq_[i] : squared_norm(d);
    params_[i].add_(d, -lr);
  }
  rec.update_norm = lr * std::sqrt(update_sq);
  // Running upper bounds instead of a pass over the weights every step.
  buffer_norm_ = options_.momentum != 0 ? std::sqrt(update_sq) : 0.0;
  weight_norm_ += rec.update_norm;
  return rec;
}

bool SgdStepper::update_in_place_is_safe(double lr) {
  if (!(upper_bound(lr) < safe_limit())) sync_norms();  // the running bound may be loose: tighten
  return upper_bound(lr) < safe_limit();
}

double SgdStepper::safe_limit() const {
  return params_.empty() || params_[0].scalar_type() == at::kDouble ? 1e300 : 1e36;
}

double SgdStepper::upper_bound(double lr) const {
  // Triangle inequality: |w_{k+1}|_inf <= |w_k| + lr (mu |v_{k-1}| + |g| + lambda |w_k|). When
  // that is far below the dtype's largest value, no weight can overflow and the update can be
  // made in place; otherwise the step goes the careful way. |w_k| and |v_{k-1}| are running
  // upper bounds, made exact again by sync_norms() when they grow too large.
  double g_sq = 0;
  for (double v : grad_sq_) g_sq += v;
  const double bound = weight_norm_ + lr * (options_.momentum * buffer_norm_ + std::sqrt(g_sq) +
                                             options_.weight_decay * weight_norm_);
  return std::isfinite(bound) ? bound : HUGE_VAL;
}

StepRecord SgdStepper::update_out_of_place(StepRecord rec, double lr) {
  // The update is formed out of place and committed only when every new weight is finite, so a
  // diverging step leaves w_k and v_{k-1} intact for the run directory. Since w_k is finite,
  // w_{k+1} is finite exactly when w_{k+1} - w_k is.
  std::vector<at::Tensor> next(params_.size()), next_buffers(params_.size());
  double update_sq = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor d = grads_[i];
    if (options_.weight_decay != 0) d = d.add(params_[i], options_.weight_decay);
    if (options_.momentum != 0) {
      next_buffers[i] = buffers_[i].defined() ? buffers_[i].mul(options_.momentum).add_(d) : d.clone();
      d = next_buffers[i];
    }
    next[i] = at::add(params_[i], d, -lr);
    const double sq = squared_norm(next[i] - params_[i]);
    if (!std::isfinite(sq)) {
      rec.finite = false;
      rec.nonfinite = "weights (" + names_[i] + ")";
      return rec;
    }
    update_sq += sq;
  }
  double weight_sq = 0, buffer_sq = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].copy_(next[i]);
    weight_sq += squared_norm(params_[i]);
    if (options_.momentum != 0) {
      buffers_[i] = next_buffers[i];
      buffer_sq += squared_norm(buffers_[i]);
    }
  }
  weight_norm_ = std::sqrt(weight_sq);
  buffer_norm_ = std::sqrt(buffer_sq);
  rec.update_norm = std::sqrt(update_sq);
  return rec;
}

at::Tensor SgdStepper::flat_gradient() const {
  std::vector<at::Tensor> flat;
  for (const auto& g : grads_) flat.push_back(g.reshape({-1}).to(at::kFloat));
  return at::cat(flat);
}

NamedTensors SgdStepper::momentum_buffers() const {
  NamedTensors out;
  for (size_t i = 0; i < buffers_.size(); ++i) {
    if (buffers_[i].defined()) out.emplace_back(names_[i], buffers_[i].clone());
  }
  return out;
}

void SgdStepper::sync_norms() {
  double w = 0, v = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    w += squared_norm(params_[i].detach());
    if (buffers_[i].defined()) v += squared_norm(buffers_[i]);
  }
  weight_norm_ = std::sqrt(w);
  buffer_norm_ = std::sqrt(v);
}

void SgdStepper::set_momentum_buffers(const NamedTensors& buffers) {
  for (auto& b : buffers_) b = at::Tensor();
  for (const auto& [name, t] : buffers) {
    auto it = std::find(names_.begin(), names_.end(), name);
    if (it == names_.end()) throw InputError("momentum buffer '" + name + "' matches no parameter");
    const size_t i = static_cast<size_t>(it - names_.begin());
    if (t.sizes() != params_[i].sizes()) throw InputError("momentum buffer '" + name + "' has the wrong shape");
    buffers_[i] = t.to(params_[i].scalar_type()).clone();
  }
  sync_norms();
}

}  // namespace pathkernel
