// The model zoo: dense nets (linear, quadratic, mlp) and a small CNN, all built on Model's taps.
#include <ATen/ATen.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <stdexcept>

#include "pathkernel/models/model.h"

namespace pathkernel::models {
namespace {

/// linear: one Linear layer; quadratic: two with nothing between; mlp: Linear layers with an
/// activation between each (with `:bn` a BatchNorm1d norms.I after hidden layer I, before its
/// activation; with `:dropout=P` a Dropout site dropout.I after it). Parameters:
/// layers.I.weight [out, in], layers.I.bias [out], then norms.I.{weight, bias}.
class DenseNet : public Model {
 public:
  DenseNet(const ModelSpec& spec, const InputShape& shape, int64_t classes)
      : Model(spec, classes) {
    layers_ = register_module("layers", torch::nn::ModuleList());
    if (spec.batchnorm) norms_ = register_module("norms", torch::nn::ModuleList());
    int64_t in = shape.numel();
    std::vector<int64_t> outs = spec.widths;
    outs.push_back(classes);
    for (size_t i = 0; i < outs.size(); ++i) {
      torch::nn::Linear layer(torch::nn::LinearOptions(in, outs[i]));
      layers_->push_back(layer);
      add_tap("layers." + std::to_string(i), LayerKind::kLinear, layer->weight, layer->bias);
      linears_.push_back(layer);
      if (spec.batchnorm && i + 1 < outs.size()) {
        torch::nn::BatchNorm1d bn{torch::nn::BatchNorm1dOptions(outs[i])};
        norms_->push_back(bn);
        add_batchnorm({"norms." + std::to_string(i), bn->weight, bn->bias, bn->running_mean, bn->running_var,
                       bn->num_batches_tracked});
      }
      if (spec.dropout > 0 && i + 1 < outs.size()) add_dropout_site("dropout." + std::to_string(i), spec.dropout, {outs[i]});
      in = outs[i];
    }
  }

  torch::Tensor forward(const torch::Tensor& x) override {
    torch::Tensor h = x.reshape({x.size(0), -1});
    for (size_t i = 0; i < linears_.size(); ++i) {
      if (i > 0 && spec().batchnorm) h = batchnorm(i - 1, h);
      if (i > 0) h = activate(h);
      if (i > 0 && spec().dropout > 0) h = dropout(i - 1, h);
      record_input(i, h);
      h = linears_[i]->forward(h);
      h = record_output(i, h);
    }
    return h;
  }

 private:
  torch::nn::ModuleList layers_{nullptr}, norms_{nullptr};
  std::vector<torch::nn::Linear> linears_;
};

/// cnn:C1,C2:ACT: conv3x3(pad 1) -> act -> maxpool2 -> conv3x3(pad 1) -> act -> maxpool2 -> fc
/// (with `:bn` a BatchNorm2d norms.I after conv I, before its activation; with `:dropout=P` a
/// Dropout site "dropout" on the flattened features before fc).
/// Parameters: convs.0.*, convs.1.*, then norms.0.*, norms.1.*, then fc.*.
class SmallCnn : public Model {
 public:
  SmallCnn(const ModelSpec& spec, const InputShape& shape, int64_t classes)
      : Model(spec, classes) {
    const int64_t h = shape.height / 4, w = shape.width / 4;
    if (h < 1 || w < 1) {
      throw std::invalid_argument("model '" + spec.str() + "' needs images of at least 4x4, got " +
                                  std::to_string(shape.height) + "x" + std::to_string(shape.width));
    }
    convs_ = register_module("convs", torch::nn::ModuleList());
    int64_t in = shape.channels;
    ConvGeometry geo{3, 3, 1, 1, 1, 1};
    for (size_t i = 0; i < 2; ++i) {
      torch::nn::Conv2d conv(torch::nn::Conv2dOptions(in, spec.widths[i], 3).padding(1));
      convs_->push_back(conv);
      add_tap("convs." + std::to_string(i), LayerKind::kConv2d, conv->weight, conv->bias, geo);
      conv_list_.push_back(conv);
      in = spec.widths[i];
    }
    if (spec.batchnorm) {
      norms_ = register_module("norms", torch::nn::ModuleList());
      for (size_t i = 0; i < 2; ++i) {
        torch::nn::BatchNorm2d bn{torch::nn::BatchNorm2dOptions(spec.widths[i])};
        norms_->push_back(bn);
        add_batchnorm({"norms." + std::to_string(i), bn->weight, bn->bias, bn->running_mean, bn->running_var,
                       bn->num_batches_tracked});
      }
    }
    fc_ = register_module("fc", torch::nn::Linear(in * h * w, classes));
    if (spec.dropout > 0) add_dropout_site("dropout", spec.dropout, {in * h * w});
    add_tap("fc", LayerKind::kLinear, fc_->weight, fc_->bias);
  }

  torch::Tensor forward(const torch::Tensor& x) override {
    torch::Tensor h = x;
    for (size_t i = 0; i < conv_list_.size(); ++i) {
      record_input(i, h);
      h = conv_list_[i]->forward(h);
      h = record_output(i, h);
      if (spec().batchnorm) h = batchnorm(i, h);
      h = max_pool2(activate(h));
    }
    h = h.reshape({h.size(0), -1});
    if (spec().dropout > 0) h = dropout(0, h);
    record_input(2, h);
    h = fc_->forward(h);
    h = record_output(2, h);
    return h;
  }

 private:
  torch::nn::ModuleList convs_{nullptr}, norms_{nullptr};
  std::vector<torch::nn::Conv2d> conv_list_;
  torch::nn::Linear fc_{nullptr};
};

/// toy:wave, the note's Figure 2: one parameter w, two logits +-s with
/// s = a(w) (x - 1/2) * 4 and a(w) = w + 2 sin(3w), on inputs x in [0, 1] (1x1 images) labelled
/// 0 when x > 1/2. The loss falls as a(w) grows, so it has a shallow minimum at w = 0.579
/// (a = 2.55), a barrier at w = 1.515 (a = -0.46) and a deeper minimum at w = 2.674 (a = 4.65).
/// Not tapped: the analyzer takes its explicit-Jacobian route. w starts at 0.3 (no randomness).
class ToyWave : public Model {
 public:
  ToyWave(const ModelSpec& spec, const InputShape& shape, int64_t classes) : Model(spec, classes) {
    if (shape.numel() != 1 || classes != 2) {
      throw std::invalid_argument("toy:wave needs 1x1 inputs and two classes (--data synthetic:wave)");
    }
    w_ = register_parameter("w", at::full({1}, 0.3));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    const at::Tensor a = w_ + 2.0 * at::sin(3.0 * w_);
    const at::Tensor s = a * (x.reshape({x.size(0), 1}) - 0.5) * 4.0;
    return at::cat({s, -s}, 1);
  }

 private:
  at::Tensor w_;
};

}  // namespace

std::shared_ptr<Model> build_model(const ModelSpec& spec, const InputShape& shape,
                                   int64_t num_classes) {
  if (num_classes < 1) throw std::invalid_argument("a model needs at least one output class");
  if (spec.kind == "linear" || spec.kind == "quadratic" || spec.kind == "mlp") {
    return std::make_shared<DenseNet>(spec, shape, num_classes);
  }
  if (spec.kind == "cnn") return std::make_shared<SmallCnn>(spec, shape, num_classes);
  if (spec.kind == "toy") return std::make_shared<ToyWave>(spec, shape, num_classes);
  throw std::invalid_argument("unknown model kind '" + spec.kind + "'");
}

}  // namespace pathkernel::models
