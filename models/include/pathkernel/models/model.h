#pragma once
/// \file model.h
/// The base of every model in the zoo: a LibTorch module whose parameterized layers (Linear,
/// Conv2d) are "tapped". While capture is on, each tapped layer keeps its input on forward and
/// registers a tensor hook on its output, so that after a backward pass the backpropagated
/// signal at the layer output is at hand. The analyzer's factorized kernels and the trainer's
/// per-example gradient norms are built from these (input, signal) pairs.

#include <torch/nn/module.h>
#include <torch/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pathkernel/models/model_spec.h"

namespace pathkernel::models {

/// The kind of a tapped layer.
enum class LayerKind { kLinear, kConv2d };

/// Geometry of a tapped Conv2d layer (square kernels are not assumed).
struct ConvGeometry {
  int64_t kernel_h = 0, kernel_w = 0;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
};

/// One tapped layer and what it captured in the last forward/backward.
struct Tap {
  /// state_dict prefix of the layer, e.g. "layers.0"; its parameters are NAME.weight, NAME.bias.
  std::string name;
  LayerKind kind = LayerKind::kLinear;
  ConvGeometry conv;
  /// The layer's weight and bias (bias undefined when the layer has none).
  torch::Tensor weight, bias;
  /// Layer input of the last forward, detached: [N, in] or [N, Cin, H, W].
  torch::Tensor input;
  /// Backpropagated signal d(loss)/d(output) of the last backward: [N, out] or [N, Cout, H', W'].
  torch::Tensor grad_output;
  /// The layer's output of the last captured forward, with its graph (so that signals can be
  /// asked of autograd directly); dropped by clear_captures().
  torch::Tensor output;
};

/// How the piecewise-linear operations (ReLU, leaky ReLU, 2x2 max-pool) of a forward behave,
/// for splitting a segment of weights at their kinks (issue 13, SPEC "exact path kernel").
enum class KinkMode {
  kOff,     ///< plain operations
  kRecord,  ///< plain operations; each site's switching pattern and values are recorded
  kFrozen,  ///< each site applies the recorded pattern (a polynomial network in the weights)
};

/// One piecewise-linear operation of the last forward, in forward order.
struct KinkSite {
  bool pool = false;
  /// Parameterized layers before the site: along w + t dw (frozen pattern) its values are
  /// polynomials in t of at most this degree.
  int64_t degree = 0;
  /// ReLU: bool mask (pre-activation > 0); max-pool: int64 argmax per window (flat in the plane).
  torch::Tensor pattern;
  /// ReLU: the pre-activation [N, ...]; max-pool: each window's 4 candidates minus the one the
  /// pattern picks [N, C, H/2, W/2, 4]. The pattern changes where one of these crosses zero.
  torch::Tensor values;
};

/// Weights that differ per row of a forward, along one segment: row n runs at w + t[n] dw, w the
/// model's parameters. Every tapped layer is linear in its weights, so its output becomes
/// layer(x; w) + t[n] layer(x; dw) (a backward or a forward-mode tangent through w is then the
/// derivative at w + t[n] dw). The kink walk moves each row along its own t this way.
struct RowSegment {
  /// [N] positions on the segment, one per input row, in the model's dtype.
  torch::Tensor t;
  /// Per tapped layer (taps() order): the direction of its weight, and of its bias (undefined
  /// when the layer has none).
  std::vector<torch::Tensor> weight, bias;
};

/// What a training forward of one step's batch used that a prediction does not: the masks of
/// the model's Dropout sites in training mode, by site name, each [M, ...] of 0 and 1 for the
/// batch's M rows (a site without one is off, as in a prediction), and the BatchNorm modules
/// that normalized the batch by its own statistics (the others use their running statistics, as
/// in a prediction; the running statistics a training forward updates are restored when the
/// context ends). Empty: predictions.
struct TrainingContext {
  std::map<std::string, torch::Tensor> dropout_masks;
  std::vector<std::string> batchnorm_train;
  /// The training step itself (a zoo model in `pathkernel train` and its replay): the BatchNorm
  /// modules in batchnorm_train move their own running statistics and count the batch, as
  /// torch.nn's do. False (every analysis): they run on copies, dropped when the context ends.
  bool moves_statistics = false;
  bool empty() const { return dropout_masks.empty() && batchnorm_train.empty(); }
};

/// A Dropout site of a zoo model (spec `:dropout=P`): in a step's training forward the
/// activations there are multiplied by the step's mask for the site ([M, *shape] of 0 and 1) over
/// 1 - p, as torch's F.dropout scales them; a prediction passes them unchanged.
struct DropoutSite {
  std::string name;
  double p = 0;
  std::vector<int64_t> shape;  ///< one example's activations at the site
};

/// A BatchNorm module of a zoo model (spec `:bn`; momentum 0.1, eps 1e-5, affine, as torch.nn's
/// BatchNorm1d/2d): its parameters and buffers under `name` as torch.nn names them. A prediction
/// normalizes by the running statistics; a step's training forward by the batch's own.
struct NormSite {
  std::string name;
  torch::Tensor weight, bias, running_mean, running_var, tracked;
};

/// Base class of the zoo's models. Parameters are registered in forward order with PyTorch
/// state_dict names, so `named_parameters()` is the state_dict order used everywhere.
class Model : public torch::nn::Module {
 public:
  /// Logits [N, C] for inputs [N, channels, height, width] (pixels already scaled).
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;

  /// Turns capture of layer inputs and output signals on or off (off by default).
  void set_capture(bool on) { capture_ = on; }
  bool capture() const { return capture_; }

  /// The tapped layers in forward order; inputs/signals are those of the last captured pass.
  std::vector<Tap>& taps() { return taps_; }
  const std::vector<Tap>& taps() const { return taps_; }

  /// Drops the captured tensors (frees their memory).
  void clear_captures();

  /// The kink sites' behaviour (off by default) and what the last forward recorded.
  void set_kink_mode(KinkMode mode) { kink_mode_ = mode; }
  KinkMode kink_mode() const { return kink_mode_; }
  std::vector<KinkSite>& kink_sites() { return kink_sites_; }

  /// Sets per-row weights for the forwards that follow (RowSegment), or clears them (an undefined t).
  /// Throws std::invalid_argument when the directions do not match the taps.
  void set_row_segment(RowSegment segment);

  /// Makes the forwards that follow step forwards of a batch in `ctx` (TrainingContext), or
  /// predictions again (an empty one). A model without such sites (the zoo's) refuses a
  /// non-empty context (std::invalid_argument). Use TrainingForward to scope it.
  void set_training_context(const TrainingContext& ctx);
  /// True while a non-empty context is set: the batch's rows are coupled through it (a row's
  /// output is the one computed with the whole batch), so rows come from one batch forward.
  bool in_training_context() const { return in_context_; }
  /// True while the context normalizes by the batch's statistics (BatchNorm in training mode):
  /// a row's output then depends on the other rows, not only on its own input and mask.
  bool batch_coupled() const { return coupled_; }

  /// The model's own Dropout sites in forward order (the zoo's `:dropout=P`; none elsewhere).
  const std::vector<DropoutSite>& dropout_sites() const { return dropout_sites_; }
  /// The model's own BatchNorm modules in forward order (the zoo's `:bn`; none elsewhere).
  const std::vector<NormSite>& norm_sites() const { return norm_sites_; }

  /// Converts parameters and floating buffers to `dtype`; a BatchNorm's batch count stays int64
  /// (LibTorch's Module::to would convert it too, torch.nn's does not).
  using torch::nn::Module::to;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  /// True when forward_with_parameters can run the forward on parameters it is given: what a
  /// functional transform needs (functorch's grad layer differentiates through wrapped copies of
  /// the parameters, not through the model's own tensors). The zoo's layers read their own
  /// tensors: false; a recorded TorchScript model: true.
  virtual bool swaps_parameters() const { return false; }
  /// forward(x) with `params` (named_parameters() order, the same shapes) in place of the model's
  /// parameters for this call only; every entry of named_parameters() that is the same tensor
  /// must be given the same replacement. Throws std::logic_error where swaps_parameters() is false.
  virtual torch::Tensor forward_with_parameters(const std::vector<torch::Tensor>& params, const torch::Tensor& x);

  /// The spec this model was built from.
  const ModelSpec& spec() const { return spec_; }
  /// Number of output classes.
  int64_t num_classes() const { return num_classes_; }

 protected:
  Model(ModelSpec spec, int64_t num_classes) : spec_(std::move(spec)), num_classes_(num_classes) {}

  /// Applies a training context (set_training_context): masks for the model's own Dropout sites
  /// (each [M, *shape] of 0 and 1, M the batch's rows) and training mode for its own BatchNorm
  /// modules. Throws std::invalid_argument for a site or module the model does not have or a mask
  /// of another shape.
  virtual void apply_training_context(const TrainingContext& ctx);

  /// Registers a BatchNorm module's tensors (NormSite) and returns its index for batchnorm().
  size_t add_batchnorm(NormSite site);
  /// The module's output: x normalized by the batch's statistics when the training context lists
  /// it, else by its running statistics.
  torch::Tensor batchnorm(size_t site, const torch::Tensor& x) const;
  /// Registers a Dropout site (DropoutSite) and returns its index for dropout().
  size_t add_dropout_site(std::string name, double p, std::vector<int64_t> shape);
  /// The site's output: x times its mask over 1 - p in a training context with a mask for it; x
  /// otherwise.
  torch::Tensor dropout(size_t site, const torch::Tensor& x) const;

  /// Registers a tap for a layer whose parameters are already registered under `name`.
  size_t add_tap(const std::string& name, LayerKind kind, torch::Tensor weight,
                 torch::Tensor bias, ConvGeometry conv = {});
  /// Called by subclasses on a tapped layer's input before the layer runs.
  void record_input(size_t tap, const torch::Tensor& input);
  /// Called by subclasses on a tapped layer's output; returns the output to use (the row segment's
  /// term added when one is set) and registers the signal hook on it.
  torch::Tensor record_output(size_t tap, torch::Tensor output);
  /// The spec's activation, through the kink machinery when it is ReLU or leaky ReLU.
  torch::Tensor activate(const torch::Tensor& x);
  /// 2x2 max-pool (stride 2), through the kink machinery.
  torch::Tensor max_pool2(const torch::Tensor& x);

 private:
  ModelSpec spec_;
  int64_t num_classes_;
  bool capture_ = false;
  bool in_context_ = false;
  bool coupled_ = false;
  std::vector<Tap> taps_;
  KinkMode kink_mode_ = KinkMode::kOff;
  std::vector<KinkSite> kink_sites_;
  RowSegment segment_;
  std::vector<DropoutSite> dropout_sites_;
  std::vector<torch::Tensor> dropout_masks_;  ///< per site: the context's mask over 1 - p, or undefined
  /// Per BatchNorm module in the current context: in training mode, and the statistics it moves
  /// (its own, or copies of them).
  struct NormRun {
    bool train = false, moves = false;
    torch::Tensor mean, var;
  };
  std::vector<NormSite> norm_sites_;
  std::vector<NormRun> norm_runs_;
  void apply_masks(const TrainingContext& ctx);
  void apply_norms(const TrainingContext& ctx);
  std::vector<torch::Tensor> segment_inputs_;  // each tap's input of the running forward
  size_t next_site_ = 0;
  int64_t layers_done_ = 0;
  KinkSite& site_for(bool pool);
};

/// The model's forwards are a step's training forwards while this is alive (nothing for an empty
/// context); predictions again afterwards, also when an exception leaves the scope.
class TrainingForward {
 public:
  TrainingForward(Model& model, const TrainingContext& ctx) : model_(model), on_(!ctx.empty()) {
    if (on_) model_.set_training_context(ctx);
  }
  ~TrainingForward() {
    if (on_) model_.set_training_context({});
  }
  TrainingForward(const TrainingForward&) = delete;
  TrainingForward& operator=(const TrainingForward&) = delete;

 private:
  Model& model_;
  bool on_;
};

/// Step `step`'s Dropout masks for a batch of `rows` examples in `model` trained with `seed`:
/// one CPU generator (mt19937) seeded with seed * 1000003 + step (mod 2^64) draws, for each site
/// in forward order, float32 Bernoulli(1 - p) values of [rows, *shape] (Tensor::bernoulli_),
/// kept as uint8. Python draws the same: torch.Generator().manual_seed(s) and
/// torch.empty(rows, *shape, dtype=torch.float32).bernoulli_(1 - p, generator=g). An empty
/// context for a model without sites.
TrainingContext draw_dropout_masks(const Model& model, uint64_t seed, int64_t step, int64_t rows);

/// Input geometry of the data a model is built for.
struct InputShape {
  int64_t channels = 1, height = 28, width = 28;
  int64_t numel() const { return channels * height * width; }
};

/// Builds a model from a spec for inputs of `shape` and `num_classes` outputs, with weights
/// initialized by LibTorch's defaults from the current global torch seed.
/// Throws std::invalid_argument for a spec the input shape cannot support.
std::shared_ptr<Model> build_model(const ModelSpec& spec, const InputShape& shape,
                                   int64_t num_classes);

/// Applies an activation by name (tanh, relu, leaky_relu (slope 0.01, PyTorch's default),
/// softplus, gelu).
torch::Tensor apply_activation(const std::string& name, const torch::Tensor& x);

}  // namespace pathkernel::models
