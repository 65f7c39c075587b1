#include "pathkernel/train/stepper.h"

#include <ATen/ATen.h>

#include <algorithm>

#include <fmt/format.h>
#include <map>

#include "pathkernel/io/errors.h"
#include "pathkernel/train/optimizer.h"
#include "pathkernel/train/train_config.h"
#include "pathkernel/train/per_example.h"

namespace pathkernel {

LossKind parse_loss(const std::string& name) {
  if (name == "ce") return LossKind::kCrossEntropy;
  if (name == "mse") return LossKind::kMse;
  throw InputError("--loss must be ce or mse, got '" + name + "'");
}

LossKind config_loss(const TrainConfig& config) {
  LossKind l = parse_loss(config.loss);
  l.label_smoothing = config.label_smoothing;
  return l;
}

std::string loss_name(LossKind kind) {
  if (kind.kind == LossKind::Kind::kMse) return "mse";
  return kind.label_smoothing == 0 ? "ce" : fmt::format("ce (label smoothing {:.6g})", kind.label_smoothing);
}

at::Tensor batch_loss(const at::Tensor& logits, const at::Tensor& labels, LossKind kind) {
  if (kind.kind == LossKind::Kind::kCrossEntropy) {
    return at::cross_entropy_loss(logits, labels, {}, at::Reduction::Mean, -100, kind.label_smoothing);
  }
  // Float targets (a recorded MSE run's) are used as they are; class labels as one-hot rows.
  const at::Tensor target = at::isFloatingType(labels.scalar_type())
                                ? labels.to(logits.scalar_type())
                                : at::one_hot(labels, logits.size(1)).to(logits.scalar_type());
  return (logits - target).pow(2).sum(1).mean() * 0.5;
}

NamedTensors state_dict_of(models::Model& model) {
  NamedTensors out;
  for (const auto& m : model.named_modules("", /*include_self=*/true)) {
    const std::string prefix = m.key().empty() ? "" : m.key() + ".";
    for (const auto& p : m.value()->named_parameters(/*recurse=*/false)) out.emplace_back(prefix + p.key(), p.value().detach());
    for (const auto& b : m.value()->named_buffers(/*recurse=*/false)) out.emplace_back(prefix + b.key(), b.value().detach());
  }
  return out;
}

NamedTensors named_parameters_of(models::Model& model) {
  NamedTensors out;
  for (const auto& item : model.named_parameters()) out.emplace_back(item.key(), item.value().detach());
  return out;
}

NamedTensors named_buffers_of(models::Model& model) {
  NamedTensors out;
  for (const auto& item : model.named_buffers()) out.emplace_back(item.key(), item.value().detach());
  return out;
}

void load_weights(models::Model& model, const NamedTensors& weights, const std::string& source) {
  auto params = model.named_parameters();
  auto buffers = model.named_buffers();
  if (weights.size() != params.size() + buffers.size()) {
    throw InputError(source + ": has " + std::to_string(weights.size()) + " tensors, model '" + model.spec().str() +
                     "' has " + std::to_string(params.size()) + " parameters" +
                     (buffers.is_empty() ? "" : " and " + std::to_string(buffers.size()) + " buffers"));
  }
  at::NoGradGuard no_grad;
  for (const auto& [name, t] : weights) {
    at::Tensor* p = params.find(name);
    if (!p) p = buffers.find(name);
    if (!p) throw InputError(source + ": unexpected tensor '" + name + "' for model '" + model.spec().str() + "'");
    if (t.scalar_type() != p->scalar_type()) {
      throw InputError(source + ": tensor '" + name + "' is " + std::string(c10::toString(t.scalar_type())) +
                       ", the run's weights are " + std::string(c10::toString(p->scalar_type())));
    }
    if (p->sizes() != t.sizes()) {
      throw InputError(source + ": tensor '" + name + "' has shape " + c10::str(t.sizes()) + ", model expects " +
                       c10::str(p->sizes()));
    }
    p->copy_(t);
  }
}

Stepper::Stepper(models::Model& model, const OptimizerOptions& options, LossKind loss) : model_(model), loss_(loss) {
  for (const auto& item : model.named_parameters()) {
    names_.push_back(item.key());
    params_.push_back(item.value());
  }
  grads_.resize(params_.size());
  grad_sq_.resize(params_.size());
  optimizer_ = make_optimizer(options, names_, params_);
}

int64_t Stepper::num_parameters() const {
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

StepRecord Stepper::step(const at::Tensor& x, const at::Tensor& y, double lr, bool per_example) {
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

  if (per_example && (model_.taps().empty() || model_.batch_coupled() || !model_.norm_sites().empty())) {
    // No taps, or parameters outside them (BatchNorm's), whose examples are coupled: logged as null.
    rec.pe_grad_min = rec.pe_grad_median = rec.pe_grad_max = NAN;
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
  const UpdateOutcome u = optimizer_->step(grads_, grad_sq_, lr);
  if (!u.finite) {
    rec.finite = false;
    rec.nonfinite = u.nonfinite;
    return rec;
  }
  rec.update_norm = u.update_norm;
  return rec;
}

at::Tensor Stepper::flat_gradient() const {
  std::vector<at::Tensor> flat;
  for (const auto& g : grads_) flat.push_back(g.reshape({-1}).to(at::kFloat));
  return at::cat(flat);
}

}  // namespace pathkernel
