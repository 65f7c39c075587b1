#include "pathkernel/trajectory/scripted_model.h"

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/csrc/jit/serialization/import.h>

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
  ScriptedModel(torch::jit::Module module, int64_t outputs)
      : Model(models::ModelSpec{"torchscript", {}, "none"}, outputs), module_(std::move(module)) {
    std::map<std::string, std::shared_ptr<Holder>> holders;
    for (const auto& p : module_.named_parameters(/*recurse=*/true)) {
      torch::nn::Module* owner = this;
      std::string path, rest = p.name;
      for (size_t dot = rest.find('.'); dot != std::string::npos; dot = rest.find('.')) {
        const std::string part = rest.substr(0, dot);
        path += (path.empty() ? "" : ".") + part;
        auto& h = holders[path];
        if (!h) h = owner->register_module(part, std::make_shared<Holder>());
        owner = h.get();
        rest = rest.substr(dot + 1);
      }
      // The same tensor object: weights copied into it, and dtype changes, reach the scripted module.
      owner->register_parameter(rest, p.value, p.value.requires_grad());
    }
  }

  torch::Tensor forward(const torch::Tensor& x) override {
    const c10::IValue out = module_.forward({x});
    if (!out.isTensor()) throw InputError("the TorchScript model's forward does not return a tensor");
    return out.toTensor();
  }

  /// The scripted module converts its parameters in place (set_data), and its buffers with them.
  void to(torch::Dtype dtype, bool non_blocking) override { module_.to(dtype, non_blocking); }

 private:
  torch::jit::Module module_;
};

}  // namespace

std::shared_ptr<models::Model> load_scripted_model(const std::filesystem::path& file, int64_t outputs) {
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
  return std::make_shared<ScriptedModel>(std::move(m), outputs);
}

}  // namespace pathkernel
