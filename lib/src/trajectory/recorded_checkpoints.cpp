// A recorded run's checkpoints: which steps have them, the weights and the optimizer's state at
// a step, read strictly against the manifest (split from recorded_run.cpp; code moved).
#include "pathkernel/trajectory/recorded_run.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <regex>

#include "pathkernel/io/errors.h"
#include "pathkernel/train/checkpoint.h"

namespace pathkernel {
namespace fs = std::filesystem;

fs::path RecordedRun::weights_file(int64_t k) const { return dir_ / "checkpoints" / fmt::format("step_{:08d}.pt", k); }
fs::path RecordedRun::optimizer_file(int64_t k) const {
  return dir_ / "checkpoints" / fmt::format("step_{:08d}.optim.pt", k);
}

void RecordedRun::list_checkpoints() {
  const fs::path cdir = dir_ / "checkpoints";
  if (!fs::is_directory(cdir)) throw InputError(cdir.string() + ": missing");
  static const std::regex name(R"(step_(\d{8})\.pt)");
  for (const auto& e : fs::directory_iterator(cdir)) {
    std::smatch m;
    const std::string f = e.path().filename().string();
    if (std::regex_match(f, m, name)) {
      const int64_t k = std::stoll(m[1]);
      if (k <= logged_steps()) checkpoints_.push_back(k);
    }
  }
  std::sort(checkpoints_.begin(), checkpoints_.end());
  if (checkpoints_.empty() || checkpoints_[0] != 0) throw InputError(weights_file(0).string() + ": missing");
  for (size_t i = 0; i + 1 < checkpoints_.size(); ++i) {
    if (checkpoints_[i + 1] == checkpoints_[i] + 1) analyzable_.push_back(checkpoints_[i]);
  }
}

std::vector<std::pair<std::string, std::vector<int64_t>>> RecordedRun::parameters() const {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  for (const auto& name : param_order_) {
    for (const auto& e : state_dict_) {
      if (e.first == name) out.push_back(e);
    }
  }
  return out;
}

NamedTensors RecordedRun::weights(int64_t k) const {
  const fs::path f = weights_file(k);
  NamedTensors w = load_tensor_dict(f);
  if (w.size() != state_dict_.size()) {
    throw InputError(fmt::format("{}: holds {} tensors, the manifest's state_dict {}", f.string(), w.size(), state_dict_.size()));
  }
  for (size_t i = 0; i < w.size(); ++i) {
    const auto& [name, shape] = state_dict_[i];
    if (w[i].first != name) throw InputError(f.string() + ": tensor '" + w[i].first + "' where the manifest has '" + name + "'");
    if (shape != std::vector<int64_t>{-1} && w[i].second.sizes().vec() != shape) {
      throw InputError(fmt::format("{}: '{}' has shape {}, the manifest {}", f.string(), name, fmt::join(w[i].second.sizes(), "x"),
                                   fmt::join(shape, "x")));
    }
    const auto t = w[i].second.scalar_type();
    if (shape != std::vector<int64_t>{-1} && t != at::kFloat && t != at::kDouble) {
      throw InputError(f.string() + ": '" + name + "' is not float32 or float64");
    }
  }
  return w;
}

OptimizerState RecordedRun::optimizer_state(int64_t k, int64_t* updates) const {
  const fs::path f = optimizer_file(k);
  const CheckpointFile file(f);
  const PickleValue* state = file.root().find("state");
  if (!state || state->kind != PickleValue::Kind::Dict) file.fail("no 'state' dict (not an optimizer state_dict)");
  const std::vector<std::string> slots = state_slots(optimizer_.kind);
  OptimizerState out;
  for (const auto& s : slots) out.emplace_back(s, NamedTensors{});
  *updates = -1;
  for (const auto& [key, per] : state->entries) {
    if (key->kind != PickleValue::Kind::Int || key->i < 0 || key->i >= static_cast<int64_t>(param_order_.size()) ||
        per->kind != PickleValue::Kind::Dict) {
      file.fail("state keys must be parameter indices 0.." + std::to_string(param_order_.size() - 1));
    }
    const std::string& name = param_order_[static_cast<size_t>(key->i)];
    if (std::find(frozen_.begin(), frozen_.end(), name) != frozen_.end()) {
      file.fail("holds state for parameter '" + name + "', which the manifest lists as frozen (model.frozen)");
    }
    for (size_t s = 0; s < slots.size(); ++s) {
      const PickleValue* v = per->find(slots[s]);
      if (!v || v->kind == PickleValue::Kind::None) continue;  // SGD without momentum
      out[s].second.emplace_back(name, file.tensor(*v, name + "." + slots[s]));
    }
    if (const PickleValue* st = per->find("step")) {
      const int64_t n = st->kind == PickleValue::Kind::Int ? st->i
                                                            : static_cast<int64_t>(file.tensor(*st, name + ".step").item<double>());
      if (*updates >= 0 && n != *updates) file.fail("parameters with different step counts");
      *updates = n;
    }
  }
  if (*updates < 0) *updates = k;  // SGD keeps no count: one update per step
  out.erase(std::remove_if(out.begin(), out.end(), [](const auto& s) { return s.second.empty(); }), out.end());
  for (auto& [slot, tensors] : out) {  // the optimizer's order
    std::sort(tensors.begin(), tensors.end(), [&](const auto& a, const auto& b) {
      return std::find(param_order_.begin(), param_order_.end(), a.first) <
             std::find(param_order_.begin(), param_order_.end(), b.first);
    });
  }
  return out;
}

}  // namespace pathkernel
