#include "pathkernel/trajectory/scripted_model.h"

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/csrc/jit/serialization/import.h>

#include <algorithm>
#include <map>
#include <sstream>
#include <vector>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/zip_archive.h"

namespace pathkernel {
namespace {

/// An empty module that only holds parameters and child holders, so that the tree of
/// torch::nn::Modules reproduces the TorchScript module's state_dict names.
class Holder : public torch::nn::Module {};

class ScriptedModel : public models::Model {
 public:
  ScriptedModel(torch::jit::Module module, int64_t outputs, const std::vector<std::string>& trained)
      : Model(models::ModelSpec{"torchscript", {}, "none"}, outputs), module_(std::move(module)) {
    std::vector<std::pair<std::string, at::Tensor>> all;
    for (const auto& p : module_.named_parameters(/*recurse=*/true)) all.emplace_back(p.name, p.value);
    auto trains = [&](const std::string& name) {
      return trained.empty() || std::find(trained.begin(), trained.end(), name) != trained.end();
    };
    std::vector<c10::TensorImpl*> impls;  // of the registered parameters, by slots_ index
    for (const auto& [name, value] : all) {
      if (!trains(name) || std::count(impls.begin(), impls.end(), value.unsafeGetTensorImpl())) continue;
      // The same tensor object: weights copied into it, and dtype changes, reach the scripted module.
      std::string leaf;
      const auto [holder, owner] = owners_of(name, leaf);
      holder->register_parameter(leaf, value, value.requires_grad());
      slots_.push_back({owner, leaf});
      impls.push_back(value.unsafeGetTensorImpl());
    }
    for (const auto& [name, value] : all) {
      std::string leaf;
      const auto [holder, owner] = owners_of(name, leaf);
      const auto same = std::find(impls.begin(), impls.end(), value.unsafeGetTensorImpl());
      if (same != impls.end()) {
        // A parameter under a second name (a layer used twice, tied weights): one parameter, both
        // slots set when parameters are swapped.
        if (owner._ivalue() != slots_[same - impls.begin()].first._ivalue() || leaf != slots_[same - impls.begin()].second) {
          aliases_.push_back({{owner, leaf}, static_cast<size_t>(same - impls.begin())});
        }
        continue;
      }
      // A parameter the run does not train: a constant of the model, set from the checkpoints as a
      // buffer is, and outside every gradient.
      value.set_requires_grad(false);
      holder->register_buffer(leaf, value);
      constants_.push_back(name);
    }
    // Floating buffers (BatchNorm's running statistics) by name too, the same tensor objects:
    // set per step from the checkpoints (set_buffers).
    for (const auto& b : module_.named_buffers(/*recurse=*/true)) {
      std::string leaf;
      if (b.value.is_floating_point()) owners_of(b.name, leaf).first->register_buffer(leaf, b.value);
    }
    // The recorder's Dropout sites (python/pathkernel_record.py, _StepMaskDropout): off until a
    // step's masks are set.
    for (const auto& sub : module_.named_modules()) {
      if (!sub.value.hasattr("pathkernel_dropout_p")) continue;
      sites_.push_back({sub.name, sub.value, sub.value.attr("pathkernel_dropout_p").toDouble()});
      if (!(sites_.back().p > 0 && sites_.back().p < 1)) {
        throw InputError("the TorchScript model's Dropout site '" + sub.name + "' has p outside (0, 1)");
      }
      sites_.back().module.train(false);
    }
  }

  torch::Tensor forward(const torch::Tensor& x) override {
    const c10::IValue out = module_.forward({x});
    if (!out.isTensor()) throw InputError("the TorchScript model's forward does not return a tensor");
    return out.toTensor();
  }

  bool swaps_parameters() const override { return true; }
  /// Its parameters held constant (by state_dict name).
  const std::vector<std::string>& constants() const { return constants_; }

  /// Each parameter's slot on its scripted submodule holds the given tensor for the call; the
  /// model's own tensors are put back however the forward ends.
  torch::Tensor forward_with_parameters(const std::vector<torch::Tensor>& params, const torch::Tensor& x) override {
    if (params.size() != slots_.size()) {
      throw std::invalid_argument("forward_with_parameters: " + std::to_string(params.size()) + " tensors for " +
                                  std::to_string(slots_.size()) + " parameters");
    }
    // Every slot, a tied parameter's second names too, with the tensor it takes.
    std::vector<std::pair<torch::jit::Module, std::string>> slots = slots_;
    std::vector<at::Tensor> given = params;
    for (const auto& [slot, i] : aliases_) {
      slots.push_back(slot);
      given.push_back(params[i]);
    }
    std::vector<at::Tensor> own;
    for (const auto& [module, leaf] : slots) own.push_back(module.attr(leaf).toTensor());
    struct Restore {
      std::vector<std::pair<torch::jit::Module, std::string>>& slots;
      const std::vector<at::Tensor>& own;
      ~Restore() {
        for (size_t i = 0; i < slots.size(); ++i) slots[i].first.setattr(slots[i].second, own[i]);
      }
    } restore{slots, own};
    for (size_t i = 0; i < slots.size(); ++i) slots[i].first.setattr(slots[i].second, given[i]);
    return forward(x);
  }

  /// The scripted module converts its parameters in place (set_data), and its buffers with them.
  void to(torch::Dtype dtype, bool non_blocking) override { module_.to(dtype, non_blocking); }

 protected:
  /// Each site with a mask multiplies by it over 1 - p (F.dropout's scaling), in the weights'
  /// dtype; the others are off.
  void apply_training_context(const models::TrainingContext& ctx) override {
    for (const auto& entry : ctx.dropout_masks) {
      const std::string& name = entry.first;  // (clang: no structured binding inside the lambda)
      if (std::none_of(sites_.begin(), sites_.end(), [&](const Site& s) { return s.name == name; })) {
        throw InputError("the TorchScript model has no recorded Dropout site '" + name + "' for the step's mask");
      }
    }
    const auto options = parameters().front().options();
    for (auto& site : sites_) {
      const auto it = ctx.dropout_masks.find(site.name);
      const bool on = it != ctx.dropout_masks.end();
      site.module.setattr("mask", on ? it->second.to(options).div(1 - site.p) : at::empty({0}, options));
      site.module.train(on);
    }
    // BatchNorm: a training forward updates its running statistics in place, so it runs on copies
    // of them; the module's own tensors (the ones set_buffers fills) come back untouched, and a
    // graph that saved the copies can still be differentiated after the context ends.
    for (auto& [module, own] : norms_on_) {
      for (size_t i = 0; i < own.size(); ++i) module.setattr(kNormBuffers[i], own[i]);
      module.train(false);
    }
    norms_on_.clear();
    for (const auto& name : ctx.batchnorm_train) {
      torch::jit::Module module = norm_module(name);
      std::vector<at::Tensor> own;
      for (const char* b : kNormBuffers) {
        own.push_back(module.attr(b).toTensor());
        module.setattr(b, own.back().clone());
      }
      module.train(true);
      norms_on_.emplace_back(module, std::move(own));
    }
  }

 private:
  struct Site {
    std::string name;
    torch::jit::Module module;
    double p = 0;
  };
  static constexpr const char* kNormBuffers[] = {"running_mean", "running_var", "num_batches_tracked"};
  /// The submodule `name` when it is a BatchNorm with running statistics (else InputError).
  torch::jit::Module norm_module(const std::string& name) const {
    for (const auto& sub : module_.named_modules()) {
      if (sub.name != name) continue;
      if (std::all_of(std::begin(kNormBuffers), std::end(kNormBuffers),
                      [&](const char* b) { return sub.value.hasattr(b) && sub.value.attr(b).isTensor(); })) {
        return sub.value;
      }
      break;
    }
    throw InputError("the TorchScript model has no BatchNorm module with running statistics named '" + name + "'");
  }
  /// The owners of the dotted `name`, by one walk of its parts: the holder (made on first use) and
  /// the scripted submodule (found by its attributes); the name's last part in `leaf`.
  std::pair<torch::nn::Module*, torch::jit::Module> owners_of(const std::string& name, std::string& leaf) {
    torch::nn::Module* holder = this;
    torch::jit::Module owner = module_;
    std::string path;
    leaf = name;
    for (size_t dot = leaf.find('.'); dot != std::string::npos; dot = leaf.find('.')) {
      const std::string part = leaf.substr(0, dot);
      path += (path.empty() ? "" : ".") + part;
      auto& h = holders_[path];
      if (!h) h = holder->register_module(part, std::make_shared<Holder>());
      holder = h.get();
      owner = owner.attr(part).toModule();
      leaf = leaf.substr(dot + 1);
    }
    return {holder, owner};
  }
  std::map<std::string, std::shared_ptr<Holder>> holders_;
  torch::jit::Module module_;
  /// Every parameter's owning submodule and attribute name, in named_parameters() order.
  std::vector<std::pair<torch::jit::Module, std::string>> slots_;
  std::vector<Site> sites_;
  std::vector<std::string> constants_;
  /// A parameter's further slots (tied weights) and its index in slots_.
  std::vector<std::pair<std::pair<torch::jit::Module, std::string>, size_t>> aliases_;
  std::vector<std::pair<torch::jit::Module, std::vector<at::Tensor>>> norms_on_;  ///< in training mode, and their own statistics
};

}  // namespace

std::shared_ptr<models::Model> load_scripted_model(const std::filesystem::path& file, int64_t outputs,
                                                   const std::vector<std::string>& trained) {
  const std::string f = file.string();
  // The structure and every checksum first, by the bounded reader (LibTorch's reader trusts
  // offsets); LibTorch then reads these same bytes, not the file a second time.
  const std::string bytes = read_file(file);
  ZipArchive(bytes, f, /*allow_deflate=*/true).verify_all();
  // The plain interpreter: autograd (double backward included) then sees ATen's own operators,
  // in any dtype, without the profiling executor's specializations.
  torch::jit::setGraphExecutorOptimize(false);
  torch::jit::Module m;
  try {
    std::istringstream in(bytes);
    m = torch::jit::load(in);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    throw InputError(f + ": not a TorchScript model LibTorch can load (" + what.substr(0, what.find('\n')) + ")");
  }
  if (!m.find_method("forward")) throw InputError(f + ": the TorchScript model has no forward method");
  int64_t params = 0;
  for (const auto& p : m.named_parameters(true)) {
    (void)p;
    ++params;
  }
  if (params == 0) throw InputError(f + ": the TorchScript model has no parameters");
  try {
    return std::make_shared<ScriptedModel>(std::move(m), outputs, trained);
  } catch (const InputError& e) {
    throw InputError(f + ": " + e.what());
  }
}

std::vector<std::string> scripted_constants(const models::Model& model) {
  const auto* scripted = dynamic_cast<const ScriptedModel*>(&model);
  return scripted ? scripted->constants() : std::vector<std::string>{};
}

}  // namespace pathkernel
