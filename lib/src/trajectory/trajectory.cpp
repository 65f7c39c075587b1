#include "pathkernel/trajectory/trajectory.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/models/model_spec.h"
#include "pathkernel/train/train_config.h"
#include "pathkernel/trajectory/recorded_run.h"
#include "pathkernel/trajectory/replay.h"
#include "pathkernel/trajectory/scripted_model.h"

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

/// A `pathkernel train` run: any step's weights by replay from the nearest checkpoint.
class ReplayTrajectory : public Trajectory {
 public:
  explicit ReplayTrajectory(const fs::path& run) : replay_(run), ctx_(replay_.context()) {}
  int64_t logged_steps() const override { return replay_.logged_steps(); }
  void check_steps(int64_t, int64_t, int64_t, bool) const override {}  // replay reaches every step
  void verify_through(int64_t end) override {
    const std::vector<int64_t>& stored = replay_.checkpoints();
    const auto it = std::lower_bound(stored.begin(), stored.end(), std::max<int64_t>(end, 1));
    if (it == stored.end() || *it > replay_.logged_steps()) return;  // a run still training: none yet
    replay_.seek(*it - 1);
    replay_.seek(*it);  // walking into a stored checkpoint replays its last step and compares
  }
  std::string model_spec() const override { return ctx_.config.model; }
  std::shared_ptr<models::Model> make_model() const override {
    return models::build_model(models::parse_model_spec(ctx_.config.model), input_shape(), ctx_.num_classes);
  }
  models::InputShape input_shape() const override { return {1, ctx_.train.height(), ctx_.train.width()}; }
  int64_t num_classes() const override { return ctx_.num_classes; }
  LossKind loss() const override { return config_loss(ctx_.config); }
  int64_t split_size(const std::string& split) const override { return data(split).size(); }
  at::Tensor inputs(const std::string& split, const at::Tensor& idx, at::ScalarType dtype) const override {
    return to_inputs(data(split).images.index_select(0, idx), dtype, ctx_.normalization);
  }
  at::Tensor labels(const std::string& split, const at::Tensor& idx) const override {
    return data(split).labels.index_select(0, idx);
  }
  at::Tensor image(const std::string& split, int64_t i) const override { return data(split).images[i][0]; }
  const std::vector<int64_t>& checkpoints() const override { return replay_.checkpoints(); }
  NamedTensors weights_at(int64_t k) override { return replay_.weights_at(k); }
  NamedTensors buffers_at(int64_t k) override { return replay_.buffers_at(k); }
  LoggedStep logged_step(int64_t k, at::ScalarType dtype) const override { return replay_.logged_step(k, dtype); }
  double logged_grad_norm(int64_t k) const override {
    return replay_.step_log().at(static_cast<size_t>(k)).at("grad_norm").get<double>();
  }
  const Optimizer& optimizer_after(int64_t k) override {
    if (replay_.current_step() != k) replay_.seek(k);
    return ctx_.stepper->optimizer();
  }

 private:
  const Dataset& data(const std::string& split) const { return split == "test" ? ctx_.test : ctx_.train; }
  Replayer replay_;
  RunContext& ctx_;
};

/// A run recorded by python/pathkernel_record.py. Its model is the zoo model the recorder
/// recognized (the analysis then runs the zoo's factorized kernels on the stored weights), or
/// its own TorchScript model (per-row gradients by autograd).
class RecordedTrajectory : public Trajectory {
 public:
  RecordedTrajectory(const fs::path& dir, bool own_model) : run_(dir) {
    script_ = own_model || run_.zoo_spec().empty();
    const at::Tensor& x = run_.train_inputs();
    shape_ = x.dim() == 4 ? models::InputShape{x.size(1), x.size(2), x.size(3)}
                          : models::InputShape{1, 1, x[0].numel()};
    if (script_) {
      const auto& frozen = run_.frozen();
      for (const auto& [name, shape] : run_.parameters()) {
        if (std::find(frozen.begin(), frozen.end(), name) == frozen.end()) trained_.push_back(name);
      }
    }
    take_model();
    if (script_) {
      check_scripted_model();
      if (drop_unused()) take_model();
      constants_ = scripted_constants(*model_);
      if (!constants_.empty()) {  // as the first checkpoint holds them (each step's are checked against it)
        for (auto& [name, t] : run_.weights(run_.checkpoints().front())) {
          if (std::find(constants_.begin(), constants_.end(), name) != constants_.end()) constant_values_[name] = t;
        }
        set_constants(*model_);
      }
      for (const auto& n : names_) to_recorded_[n] = n;
    } else {
      for (const auto& [recorded, zoo] : run_.zoo_names()) to_recorded_[zoo] = recorded;
      for (const auto& n : names_) {
        if (!to_recorded_.count(n)) {
          throw InputError((dir / "manifest.json").string() + ": zoo.names does not map the zoo parameter '" + n + "'");
        }
      }
      check_zoo_model();
    }
  }
  std::shared_ptr<models::Model> make_model() const override {
    if (script_) {
      auto model = load_scripted_model(run_.model_file(), run_.outputs(), trained_);
      set_constants(*model);
      return model;
    }
    return models::build_model(models::parse_model_spec(run_.zoo_spec()), shape_, run_.outputs());
  }
  int64_t logged_steps() const override { return run_.logged_steps(); }
  void check_steps(int64_t begin, int64_t end, int64_t every, bool from_zero) const override {
    const auto& ok = run_.analyzable_steps();
    for (int64_t k = from_zero ? 0 : begin; k < end; ++k) {
      if (!from_zero && (k - begin) % every != 0) continue;
      if (!std::binary_search(ok.begin(), ok.end(), k)) {
        throw InputError(run_.weights_file(std::binary_search(run_.checkpoints().begin(), run_.checkpoints().end(), k)
                                               ? k + 1
                                               : k)
                             .string() +
                         ": missing, so step " + std::to_string(k) +
                         " cannot be analyzed (a recorded run needs the weights before and after each analyzed "
                         "step" +
                         (from_zero ? ", and with momentum or Adam every step from 0" : "") + "; --range selects steps)");
      }
    }
  }
  std::string model_spec() const override { return script_ ? "torchscript" : run_.zoo_spec(); }
  models::InputShape input_shape() const override { return shape_; }
  int64_t num_classes() const override { return run_.outputs(); }
  LossKind loss() const override {
    LossKind l = parse_loss(run_.loss());
    l.label_smoothing = run_.label_smoothing();
    return l;
  }
  int64_t split_size(const std::string& split) const override {
    const at::Tensor& x = split == "test" ? run_.test_inputs() : run_.train_inputs();
    return x.defined() ? x.size(0) : 0;
  }
  at::Tensor inputs(const std::string& split, const at::Tensor& idx, at::ScalarType dtype) const override {
    const at::Tensor x = (split == "test" ? run_.test_inputs() : run_.train_inputs()).index_select(0, idx);
    return x.scalar_type() == at::kLong ? x : x.to(dtype);  // int64 tokens stay tokens
  }
  at::Tensor labels(const std::string& split, const at::Tensor& idx) const override {
    const at::Tensor y = (split == "test" ? run_.test_targets() : run_.train_targets()).index_select(0, idx);
    return y.dim() == 2 ? y.argmax(1) : y;
  }
  at::Tensor image(const std::string& split, int64_t i) const override {
    const at::Tensor& x = split == "test" ? run_.test_inputs() : run_.train_inputs();
    if (x.dim() != 3 && !(x.dim() == 4 && x.size(1) == 1)) return {};
    // Scaled to 0..255 over the whole split, so pictures compare across a grid.
    auto& range = split == "test" ? test_range_ : train_range_;
    if (range.first > range.second) range = {x.min().item<double>(), x.max().item<double>()};
    const double span = std::max(range.second - range.first, 1e-12);
    return ((x[i].reshape({x.size(-2), x.size(-1)}).to(at::kDouble) - range.first) * (255.0 / span)).round().to(at::kByte);
  }
  const std::vector<int64_t>& checkpoints() const override { return run_.checkpoints(); }
  NamedTensors weights_at(int64_t k) override {
    const NamedTensors recorded = run_.weights(k);
    check_constants(k, recorded);
    std::map<std::string, at::Tensor> by_name(recorded.begin(), recorded.end());
    NamedTensors out;
    for (const auto& n : names_) out.emplace_back(n, by_name.at(to_recorded_.at(n)));
    return out;
  }
  NamedTensors buffers_at(int64_t k) override {
    if (!script_ || run_.batchnorm_modules().empty()) return {};
    NamedTensors out;
    for (auto& [name, t] : run_.weights(k)) {
      if (!to_recorded_.count(name) && t.is_floating_point()) out.emplace_back(name, t);
    }
    return out;
  }
  LoggedStep logged_step(int64_t k, at::ScalarType dtype) const override {
    const RecordedRun::Step s = run_.step(k);
    LoggedStep out;
    out.lr = s.lr;
    out.indices = at::tensor(s.batch, at::kLong);
    // What the loop fed (augmented inputs the recorder stored), else the stored rows.
    out.x = s.inputs.defined() ? s.inputs : run_.train_inputs().index_select(0, out.indices);
    if (out.x.scalar_type() != at::kLong) out.x = out.x.to(dtype);  // int64 tokens stay tokens
    out.y = run_.train_targets().index_select(0, out.indices);
    out.grad_scale = s.grad_scale;
    out.accumulated = s.accumulated;
    out.autocast = s.autocast;
    out.context.dropout_masks = s.masks;  // by recorded names: a run with masks has no zoo spec, model.pt holds the sites
    out.context.batchnorm_train = s.batchnorm_train;
    // The step's settings by the analyzed model's parameter names.
    out.settings.options = s.settings.options;
    for (const auto& [model_name, recorded] : to_recorded_) {
      if (s.settings.rate_scale.count(recorded)) out.settings.rate_scale[model_name] = s.settings.rate_scale.at(recorded);
      if (s.settings.weight_decay.count(recorded)) out.settings.weight_decay[model_name] = s.settings.weight_decay.at(recorded);
    }
    return out;
  }
  bool settings_vary() const override { return run_.settings_vary(); }
  double logged_grad_norm(int64_t) const override { return NAN; }
  bool logged_fingerprint(int64_t k, double& loss, double& grad_norm, std::vector<double>& grad_proj) const override {
    const RecordedRun::Step s = run_.step(k);
    loss = s.loss;
    grad_norm = s.grad_norm;
    grad_proj = s.grad_proj;
    return true;
  }
  std::vector<double> fingerprint_of(const ParamMap& gradient) const override {
    const int64_t j_count = run_.fingerprint_projections();
    if (j_count == 0) return {};
    // The recorder flattens the optimizer's parameters in the manifest's order.
    std::vector<at::Tensor> flat;
    std::map<std::string, std::string> to_model;
    for (const auto& [model_name, recorded] : to_recorded_) to_model[recorded] = model_name;
    // A parameter the run does not train has no gradient in .grad: the recorder counts zeros.
    const auto options = gradient.begin()->second.options();
    for (const auto& [name, shape] : run_.parameters()) {
      const auto it = to_model.find(name);
      flat.push_back(it != to_model.end() ? gradient.at(it->second).reshape({-1})
                                          : at::zeros({c10::multiply_integers(shape)}, options));
    }
    const at::Tensor g = at::cat(flat).to(at::kDouble);
    const int64_t n = g.size(0);
    if (!signs_.defined() || signs_.size(1) != n) {
      signs_ = at::empty({j_count, n}, at::kChar);
      for (int64_t j = 0; j < j_count; ++j) signs_[j].copy_(fingerprint_signs(run_.fingerprint_seed(), j, n));
    }
    // The products a cache-sized chunk of the signs at a time, converted to float64 there.
    constexpr int64_t kChunk = int64_t{1} << 16;
    at::Tensor chunk = at::empty({j_count, std::min(kChunk, n)}, at::kDouble);
    at::Tensor p = at::zeros({j_count}, at::kDouble);
    for (int64_t a = 0; a < n; a += kChunk) {
      at::Tensor part = chunk.narrow(1, 0, std::min(kChunk, n - a));
      part.copy_(signs_.narrow(1, a, part.size(1)));
      p.add_(at::mv(part, g.narrow(0, a, part.size(1))));
    }
    return std::vector<double>(p.data_ptr<double>(), p.data_ptr<double>() + p.numel());
  }
  const Optimizer& optimizer_after(int64_t k) override {
    // The state read last is kept: an analysis asks for the same step's state more than once
    // (after step k, then before step k + 1).
    if (optimizer_ && optimizer_step_ == k) return *optimizer_;
    int64_t updates = 0;
    OptimizerState state = run_.optimizer_state(k, &updates);
    if (!script_) {
      std::map<std::string, std::string> to_zoo(run_.zoo_names().begin(), run_.zoo_names().end());
      for (auto& [slot, tensors] : state) {
        for (auto& [name, t] : tensors) name = to_zoo.at(name);
      }
    }
    // As the optimizer was at its last step (its P after step k - 1 uses that step's betas).
    optimizer_ = make_optimizer(k > 0 ? run_.settings_at(k - 1).options : run_.optimizer(), names_, params_);
    optimizer_->load_state(state, updates, run_.optimizer_file(k).string());
    optimizer_step_ = k;
    return *optimizer_;
  }

 private:
  void take_model() {
    model_ = make_model();
    names_.clear();
    params_.clear();
    for (const auto& p : model_->named_parameters()) {
      names_.push_back(p.key());
      params_.push_back(p.value());
    }
  }

  /// The TorchScript model against the manifest: the same trained parameters and shapes, every
  /// other parameter of it held constant from the checkpoints (so in their state_dict), and a
  /// forward that maps the recorded inputs to [N, outputs] (checked on two examples).
  void check_scripted_model() const {
    const std::string mf = run_.model_file().string();
    std::map<std::string, at::Tensor> mine;
    for (size_t i = 0; i < names_.size(); ++i) mine[names_[i]] = params_[i];
    for (const auto& b : model_->named_buffers()) mine[b.key()] = b.value();
    for (const auto& [name, shape] : run_.parameters()) {
      auto it = mine.find(name);
      if (it == mine.end()) {
        throw InputError(mf + ": has no parameter '" + name + "', which the run's state_dict trains");
      }
      if (it->second.sizes() != at::IntArrayRef(shape)) {
        throw InputError(mf + ": parameter '" + name + "' has shape " + c10::str(it->second.sizes()) +
                         ", the run's state_dict has " + c10::str(at::IntArrayRef(shape)));
      }
    }
    const auto& keys = run_.state_dict();
    for (const auto& n : scripted_constants(*model_)) {
      if (std::none_of(keys.begin(), keys.end(), [&](const auto& e) { return e.first == n; })) {
        throw InputError(mf + ": parameter '" + n + "' is not in the run's state_dict, so not in its checkpoints");
      }
    }
    const at::Tensor x = run_.train_inputs().slice(0, 0, std::min<int64_t>(2, run_.train_inputs().size(0)));
    at::Tensor out;
    try {
      at::NoGradGuard no_grad;
      out = model_->forward(x.scalar_type() == at::kLong ? x : x.to(at::kFloat));
    } catch (const InputError&) {
      throw;
    } catch (const std::exception& e) {
      const std::string what = e.what();
      throw InputError(mf + ": the model rejects the run's inputs of shape " + c10::str(x.sizes()) + " (" +
                       what.substr(0, what.find('\n')) + ")");
    }
    if (out.dim() != 2 || out.size(0) != x.size(0) || out.size(1) != run_.outputs()) {
      throw InputError(mf + ": maps inputs of shape " + c10::str(x.sizes()) + " to " + c10::str(out.sizes()) +
                       ", the run has " + std::to_string(run_.outputs()) + " outputs per example");
    }
  }

  /// The zoo model the manifest names must be the network that was trained: with the weights of
  /// the first stored checkpoint, its outputs on recorded inputs must be model.pt's (to float32
  /// rounding; a Tanh network recorded as a ReLU zoo model differs at once).
  void check_zoo_model() const {
    const std::string mf = run_.model_file().string();
    const std::shared_ptr<models::Model> script = load_scripted_model(run_.model_file(), run_.outputs());
    const NamedTensors recorded = run_.weights(run_.checkpoints().front());
    const std::map<std::string, at::Tensor> by_name(recorded.begin(), recorded.end());
    at::NoGradGuard no_grad;
    for (auto& p : script->named_parameters()) {
      const auto it = by_name.find(p.key());
      if (it == by_name.end() || it->second.sizes() != p.value().sizes()) {
        throw InputError(mf + ": parameter '" + p.key() + "' is not the run's (zoo " + run_.zoo_spec() + ")");
      }
      p.value().copy_(it->second);
    }
    for (size_t i = 0; i < names_.size(); ++i) {
      const at::Tensor& w = by_name.at(to_recorded_.at(names_[i]));
      if (w.sizes() != params_[i].sizes()) {
        throw InputError((run_.dir() / "manifest.json").string() + ": the zoo model " + run_.zoo_spec() + " with " +
                         std::to_string(run_.outputs()) + " outputs (model.outputs) has parameter '" + names_[i] +
                         "' of shape " + c10::str(params_[i].sizes()) + ", the run's is " + c10::str(w.sizes()));
      }
      params_[i].copy_(w);
    }
    const at::Tensor x = run_.train_inputs().slice(0, 0, std::min<int64_t>(8, run_.train_inputs().size(0))).to(at::kFloat);
    const at::Tensor want = script->forward(x).to(at::kDouble), got = model_->forward(x).to(at::kDouble);
    const double scale = std::max(want.abs().max().item<double>(), 1e-6);
    const double diff = got.sizes() == want.sizes() ? (got - want).abs().max().item<double>() : INFINITY;
    if (!(diff <= 1e-4 * scale)) {
      throw InputError(mf + ": the manifest analyzes this run as the zoo model " + run_.zoo_spec() +
                       ", but that model's outputs on the recorded inputs differ from model.pt's (by " +
                       fmt::format("{:.3g}", diff) + " of a scale of " + fmt::format("{:.3g}", scale) +
                       "): another architecture or activation; record the run again, or analyze it through "
                       "its own model (--kernel-route torchscript)");
    }
  }

  /// Drops from the trained parameters those the model's forward does not use (an unused head):
  /// they get no gradient, so torch.optim never changes them, and autograd has no product of
  /// theirs to form. Returns whether it dropped any.
  bool drop_unused() {
    const at::Tensor x = run_.train_inputs().slice(0, 0, std::min<int64_t>(2, run_.train_inputs().size(0)));
    const at::Tensor out = model_->forward(x.scalar_type() == at::kLong ? x : x.to(at::kFloat));
    if (!out.requires_grad()) {
      throw InputError(run_.model_file().string() + ": the model's outputs depend on none of the parameters the run "
                       "trains");
    }
    const auto grads = torch::autograd::grad({out.sum()}, params_, {}, false, false, /*allow_unused=*/true);
    std::vector<std::string> used;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (grads[i].defined()) used.push_back(names_[i]);
    }
    if (used.size() == names_.size()) return false;
    trained_ = used;
    return true;
  }

  /// The constants (the parameters the run does not train) of a model made for this run, as the
  /// first checkpoint holds them.
  void set_constants(models::Model& model) const {
    if (constant_values_.empty()) return;
    at::NoGradGuard no_grad;
    for (auto& b : model.named_buffers()) {
      const auto it = constant_values_.find(b.key());
      if (it != constant_values_.end()) b.value().copy_(it->second);
    }
  }

  /// Each constant in the tensors of step k's checkpoint must be as the first checkpoint holds
  /// it: the analysis holds it constant.
  void check_constants(int64_t k, const NamedTensors& tensors) const {
    for (const auto& [name, t] : tensors) {
      const auto it = constant_values_.find(name);
      if (it != constant_values_.end() && !at::equal(it->second, t)) {
        throw InputError(run_.weights_file(k).string() + ": parameter '" + name + "', which the run does not train " +
                         "(frozen, outside the optimizer, or unused by the forward), differs from its value in " +
                         run_.weights_file(run_.checkpoints().front()).string() + "; the analysis holds it constant");
      }
    }
  }

  RecordedRun run_;
  bool script_ = false;
  std::vector<std::string> trained_;    ///< with script_: the parameters the model exposes, by state_dict name
  std::vector<std::string> constants_;  ///< with script_: its other parameters, held constant
  std::map<std::string, at::Tensor> constant_values_;  ///< as the first checkpoint holds them
  models::InputShape shape_;
  std::shared_ptr<models::Model> model_;  ///< float32, holds the parameters the optimizer binds
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_;
  std::map<std::string, std::string> to_recorded_;
  std::unique_ptr<Optimizer> optimizer_;
  int64_t optimizer_step_ = -1;
  mutable std::pair<double, double> train_range_{1, 0}, test_range_{1, 0};  ///< min, max of the inputs
  mutable at::Tensor signs_;  ///< the fingerprint's +-1 vectors, int8 [J, parameters] (4 bytes a parameter), made once
};

}  // namespace

RunFacts run_facts(const fs::path& run) {
  RunFacts f;
  if (is_recorded_run(run)) {
    const RecordedRun r(run);
    f.train_examples = r.train_inputs().size(0);
    f.optimizer = r.optimizer();
    f.model = r.zoo_spec();
    f.settings_vary = r.settings_vary();
    f.logged_steps = r.logged_steps();
    return f;
  }
  const RunDir dir(run);
  const nlohmann::json manifest = dir.read_manifest();
  try {
    f.train_examples = manifest.at("data").at("train_examples").get<int64_t>();
    const TrainConfig config = train_config_from_json(manifest.at("config"), dir.manifest().string());
    f.optimizer = config.optimizer_options();
    f.model = config.model;
  } catch (const nlohmann::json::exception& e) {
    throw InputError(dir.manifest().string() + ": malformed (" + std::string(e.what()) + ")");
  }
  f.logged_steps = static_cast<int64_t>(read_step_log(dir.steps_log()).size());
  return f;
}

bool run_complete(const fs::path& run) { return fs::exists(RunDir(run).complete_marker()); }

namespace {

std::unique_ptr<Trajectory> open_either(const fs::path& run, bool own_model) {
  if (is_recorded_run(run)) return std::make_unique<RecordedTrajectory>(run, own_model);
  if (own_model) {
    throw InputError(run.string() + ": a pathkernel train run has no TorchScript model (--kernel-route torchscript is "
                     "for recorded runs)");
  }
  return std::make_unique<ReplayTrajectory>(run);
}

}  // namespace

std::unique_ptr<Trajectory> open_trajectory(const fs::path& run, bool own_model) {
  std::unique_ptr<Trajectory> t = open_either(run, own_model);
  if (!run_complete(run)) {
    spdlog::warn("{}: not complete (no COMPLETE marker): its training was interrupted or is still running; "
                 "{} logged steps are there to read",
                 run.string(), t->logged_steps());
  }
  return t;
}

}  // namespace pathkernel
