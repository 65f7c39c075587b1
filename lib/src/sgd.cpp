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

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

StepRecord SgdStepper::step(const at::Tensor& x, const at::Tensor& y, double lr, bool per_example) {
  StepRecord rec;
  rec.lr = lr;
  for (auto& p : params_) p.mutable_grad() = at::Tensor();
  model_.set_capture(per_example);
  const at::Tensor logits = model_.forward(x);
  const at::Tensor loss = batch_loss(logits, y, loss_);
  loss.backward();
  model_.set_capture(false);
  rec.loss = loss.item<double>();
  rec.accuracy = logits.argmax(1).eq(y).to(at::kDouble).mean().item<double>();

  std::map<std::string, double> layer_sq;
  std::vector<std::string> layer_order;
  double grad_sq = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    grads_[i] = params_[i].grad();
    const double sq = grads_[i].to(at::kDouble).pow(2).sum().item<double>();
    grad_sq += sq;
    const std::string layer = layer_of(names_[i]);
    if (!layer_sq.count(layer)) layer_order.push_back(layer);
    layer_sq[layer] += sq;
  }
  rec.grad_norm = std::sqrt(grad_sq);
  for (const auto& l : layer_order) rec.layer_grad_norms.emplace_back(l, std::sqrt(layer_sq[l]));

  if (per_example) {
    const at::Tensor sq = per_example_grad_sq_norms(model_.taps(), static_cast<double>(x.size(0)));
    const at::Tensor norms = sq.sqrt().contiguous();
    std::vector<double> v(norms.data_ptr<double>(), norms.data_ptr<double>() + norms.numel());
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

  // The update is formed out of place and committed only when every new weight is finite, so a
  // diverging step leaves w_k and v_{k-1} intact for the run directory.
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> new_params(params_.size()), new_buffers(params_.size());
  double update_sq = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor d = grads_[i];
    if (options_.weight_decay != 0) d = d.add(params_[i], options_.weight_decay);
    if (options_.momentum != 0) {
      new_buffers[i] = buffers_[i].defined() ? buffers_[i].mul(options_.momentum).add_(d) : d.clone();
      d = new_buffers[i];
    }
    new_params[i] = at::add(params_[i], d, -lr);
    if (!at::isfinite(new_params[i]).all().item<bool>()) {
      rec.finite = false;
      rec.nonfinite = "weights (" + names_[i] + ")";
      return rec;
    }
    update_sq += (new_params[i].to(at::kDouble) - params_[i].to(at::kDouble)).pow(2).sum().item<double>();
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].copy_(new_params[i]);
    if (options_.momentum != 0) buffers_[i] = new_buffers[i];
  }
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
    if (buffers_[i].defined()) out.emplace_back(names_[i], buffers_[i]);
  }
  return out;
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
}

}  // namespace pathkernel
