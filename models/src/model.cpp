#include "pathkernel/models/model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <stdexcept>

namespace pathkernel::models {

void Model::clear_captures() {
  for (auto& t : taps_) {
    t.input = torch::Tensor();
    t.grad_output = torch::Tensor();
    t.output = torch::Tensor();
  }
}

torch::Tensor Model::forward_with_parameters(const std::vector<torch::Tensor>&, const torch::Tensor&) {
  throw std::logic_error("model " + spec_.str() + " runs on its own parameters only");
}

size_t Model::add_tap(const std::string& name, LayerKind kind, torch::Tensor weight,
                      torch::Tensor bias, ConvGeometry conv) {
  Tap t;
  t.name = name;
  t.kind = kind;
  t.conv = conv;
  t.weight = std::move(weight);
  t.bias = std::move(bias);
  taps_.push_back(std::move(t));
  return taps_.size() - 1;
}

void Model::record_input(size_t tap, const torch::Tensor& input) {
  if (tap == 0) {  // a forward begins
    next_site_ = 0;
    layers_done_ = 0;
  }
  if (segment_.t.defined()) segment_inputs_[tap] = input;
  if (!capture_) return;
  taps_[tap].input = input.detach();
  taps_[tap].grad_output = torch::Tensor();
}

torch::Tensor Model::record_output(size_t tap, torch::Tensor output) {
  layers_done_ = static_cast<int64_t>(tap) + 1;
  if (segment_.t.defined()) {
    const Tap& tp = taps_[tap];
    const torch::Tensor& x = segment_inputs_[tap];
    const torch::Tensor& w = segment_.weight[tap];
    const torch::Tensor& b = segment_.bias[tap];
    std::vector<int64_t> shape(static_cast<size_t>(output.dim()), 1);
    shape[0] = output.size(0);
    const torch::Tensor along = tp.kind == LayerKind::kLinear
                                    ? at::linear(x, w, b)
                                    : at::conv2d(x, w, b, {tp.conv.stride_h, tp.conv.stride_w}, {tp.conv.pad_h, tp.conv.pad_w});
    output = output + segment_.t.view(shape) * along;
    segment_inputs_[tap] = torch::Tensor();
  }
  if (!capture_ || !output.requires_grad()) return output;
  taps_[tap].output = output;
  // The hook only stores the signal; it never changes the gradient flowing on.
  output.register_hook([this, tap](torch::Tensor g) { taps_[tap].grad_output = g; });
  return output;
}

void Model::set_training_context(const TrainingContext& ctx) {
  apply_training_context(ctx);
  in_context_ = !ctx.empty();
  coupled_ = !ctx.batchnorm_train.empty();
}

void Model::apply_training_context(const TrainingContext& ctx) {
  apply_masks(ctx);
  apply_norms(ctx);
}

void Model::apply_masks(const TrainingContext& ctx) {
  std::vector<torch::Tensor> masks(dropout_sites_.size());
  for (const auto& [name, mask] : ctx.dropout_masks) {
    size_t i = 0;
    while (i < dropout_sites_.size() && dropout_sites_[i].name != name) ++i;
    if (i == dropout_sites_.size()) {
      throw std::invalid_argument("model " + spec_.str() + " has no Dropout site '" + name + "' for the step's mask");
    }
    const DropoutSite& site = dropout_sites_[i];
    std::vector<int64_t> want{mask.dim() > 0 ? mask.size(0) : -1};
    want.insert(want.end(), site.shape.begin(), site.shape.end());
    if (mask.dim() == 0 || !mask.sizes().equals(want) || mask.size(0) < 1) {
      std::string shape = "M";
      for (int64_t d : site.shape) shape += ", " + std::to_string(d);
      throw std::invalid_argument("model " + spec_.str() + ": the mask of Dropout site '" + name + "' is " +
                                  c10::str(mask.sizes()) + ", not [" + shape + "]");
    }
    const auto options = parameters().front().options();
    masks[i] = mask.to(options).div(1 - site.p);
  }
  dropout_masks_ = std::move(masks);
}

void Model::apply_norms(const TrainingContext& ctx) {
  std::vector<NormRun> runs(norm_sites_.size());
  for (const auto& name : ctx.batchnorm_train) {
    size_t i = 0;
    while (i < norm_sites_.size() && norm_sites_[i].name != name) ++i;
    if (i == norm_sites_.size()) throw std::invalid_argument("model " + spec_.str() + " has no BatchNorm module '" + name + "'");
    const NormSite& s = norm_sites_[i];
    runs[i] = {true, ctx.moves_statistics, ctx.moves_statistics ? s.running_mean : s.running_mean.clone(),
               ctx.moves_statistics ? s.running_var : s.running_var.clone()};
  }
  norm_runs_ = std::move(runs);
}

size_t Model::add_batchnorm(NormSite site) {
  norm_sites_.push_back(std::move(site));
  norm_runs_.resize(norm_sites_.size());
  return norm_sites_.size() - 1;
}

torch::Tensor Model::batchnorm(size_t site, const torch::Tensor& x) const {
  constexpr double kMomentum = 0.1, kEps = 1e-5;
  const NormSite& s = norm_sites_.at(site);
  const NormRun& r = norm_runs_.at(site);
  if (!r.train) return at::batch_norm(x, s.weight, s.bias, s.running_mean, s.running_var, false, kMomentum, kEps, false);
  if (r.moves) {
    const at::NoGradGuard ng;
    s.tracked.add_(1);
  }
  return at::batch_norm(x, s.weight, s.bias, r.mean, r.var, true, kMomentum, kEps, false);
}

void Model::to(torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(dtype, non_blocking);
  for (auto& s : norm_sites_) s.tracked.set_data(s.tracked.to(at::kLong));
}

size_t Model::add_dropout_site(std::string name, double p, std::vector<int64_t> shape) {
  dropout_sites_.push_back({std::move(name), p, std::move(shape)});
  dropout_masks_.resize(dropout_sites_.size());
  return dropout_sites_.size() - 1;
}

torch::Tensor Model::dropout(size_t site, const torch::Tensor& x) const {
  const torch::Tensor& m = dropout_masks_.at(site);
  if (!m.defined()) return x;
  if (m.size(0) != x.size(0)) {
    throw std::invalid_argument("Dropout site '" + dropout_sites_[site].name + "': a mask for " +
                                std::to_string(m.size(0)) + " rows in a forward of " + std::to_string(x.size(0)));
  }
  return x * m.view(x.sizes());
}

TrainingContext draw_dropout_masks(const Model& model, uint64_t seed, int64_t step, int64_t rows) {
  TrainingContext ctx;
  if (model.dropout_sites().empty()) return ctx;
  const at::Generator gen = at::detail::createCPUGenerator(seed * 1000003u + static_cast<uint64_t>(step));
  for (const DropoutSite& site : model.dropout_sites()) {
    std::vector<int64_t> shape{rows};
    shape.insert(shape.end(), site.shape.begin(), site.shape.end());
    ctx.dropout_masks[site.name] = at::empty(shape, at::kFloat).bernoulli_(1 - site.p, gen).to(at::kByte);
  }
  return ctx;
}

void Model::set_row_segment(RowSegment segment) {
  if (segment.t.defined()) {
    if (segment.weight.size() != taps_.size() || segment.bias.size() != taps_.size()) {
      throw std::invalid_argument("row segment: " + std::to_string(segment.weight.size()) + " directions for " +
                                  std::to_string(taps_.size()) + " tapped layers");
    }
    for (size_t i = 0; i < taps_.size(); ++i) {
      if (!segment.weight[i].defined() || !segment.weight[i].sizes().equals(taps_[i].weight.sizes()) ||
          segment.bias[i].defined() != taps_[i].bias.defined() ||
          (segment.bias[i].defined() && !segment.bias[i].sizes().equals(taps_[i].bias.sizes()))) {
        throw std::invalid_argument("row segment: the direction of '" + taps_[i].name + "' does not match its shape");
      }
    }
    if (segment.t.dim() != 1) throw std::invalid_argument("row segment: t must be one value per row");
  }
  segment_ = std::move(segment);
  segment_inputs_.assign(taps_.size(), torch::Tensor());
}

KinkSite& Model::site_for(bool pool) {
  const size_t s = next_site_++;
  if (kink_mode_ == KinkMode::kRecord) {
    if (kink_sites_.size() < s + 1) kink_sites_.resize(s + 1);
  } else if (s >= kink_sites_.size() || kink_sites_[s].pool != pool) {
    throw std::logic_error("frozen kink pattern recorded for another forward");
  }
  KinkSite& site = kink_sites_[s];
  site.pool = pool;
  site.degree = layers_done_;
  return site;
}

torch::Tensor Model::activate(const torch::Tensor& x) {
  const std::string& a = spec_.activation;
  if (kink_mode_ == KinkMode::kOff || (a != "relu" && a != "leaky_relu")) return apply_activation(a, x);
  KinkSite& site = site_for(false);
  site.values = x.detach();
  if (kink_mode_ == KinkMode::kRecord) {
    site.pattern = (x > 0).detach();
    return apply_activation(a, x);
  }
  // (x * 0.01 as leaky_relu computes it: a slope tensor made from the scalar would be float32)
  return a == "relu" ? x * site.pattern.to(x.scalar_type()) : at::where(site.pattern, x, x * 0.01);
}

torch::Tensor Model::max_pool2(const torch::Tensor& x) {
  if (kink_mode_ == KinkMode::kOff) return at::max_pool2d(x, {2, 2});
  KinkSite& site = site_for(true);
  at::Tensor out;
  if (kink_mode_ == KinkMode::kRecord) {
    auto [o, idx] = at::max_pool2d_with_indices(x, {2, 2});
    out = o;
    site.pattern = idx.detach();
  } else {
    const at::Tensor& idx = site.pattern;
    out = x.flatten(2).gather(2, idx.flatten(2)).view(idx.sizes());
  }
  // Each window's candidates [N, C, H/2, W/2, 4] against the value picked.
  const int64_t h = out.size(2) * 2, w = out.size(3) * 2;
  const at::Tensor cand = x.detach().narrow(2, 0, h).narrow(3, 0, w).unfold(2, 2, 2).unfold(3, 2, 2).flatten(4);
  site.values = cand - out.detach().unsqueeze(4);
  return out;
}

torch::Tensor apply_activation(const std::string& name, const torch::Tensor& x) {
  if (name == "tanh") return at::tanh(x);
  if (name == "relu") return at::relu(x);
  if (name == "leaky_relu") return at::leaky_relu(x, 0.01);
  if (name == "softplus") return at::softplus(x, /*beta=*/1, /*threshold=*/20);
  if (name == "gelu") return at::gelu(x);
  if (name == "none") return x;
  throw std::invalid_argument("unknown activation '" + name + "'");
}

}  // namespace pathkernel::models
