#include "pathkernel/trajectory/recorded_run.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/models/model_spec.h"

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

std::vector<int64_t> shape_of(const nlohmann::json& j) {
  std::vector<int64_t> s;
  for (const auto& d : j) {
    const int64_t v = d.get<int64_t>();
    if (v < 0) throw nlohmann::json::other_error::create(501, "negative dimension", &j);
    s.push_back(v);
  }
  return s;
}

/// One parameter group's settings (torch.optim's names) as pathkernel's options of `kind`.
OptimizerOptions options_of_group(OptimizerKind kind, const nlohmann::json& g, const std::string& where) {
  OptimizerOptions opt;
  opt.kind = kind;
  opt.weight_decay = g.value("weight_decay", 0.0);
  if (g.value("maximize", false)) throw InputError(where + ": maximize=True is not supported");
  if (opt.kind == OptimizerKind::kSgd) {
    opt.momentum = g.value("momentum", 0.0);
    opt.dampening = g.value("dampening", 0.0);
    opt.nesterov = g.value("nesterov", false);
  } else if (opt.kind == OptimizerKind::kRmsprop) {
    opt.alpha = g.at("alpha").get<double>();
    opt.eps = g.at("eps").get<double>();
    opt.momentum = g.value("momentum", 0.0);
    opt.centered = g.value("centered", false);
  } else if (opt.kind == OptimizerKind::kAdagrad) {
    opt.lr_decay = g.value("lr_decay", 0.0);
    opt.initial_accumulator = g.value("initial_accumulator_value", 0.0);
    opt.eps = g.at("eps").get<double>();
  } else if (opt.kind == OptimizerKind::kAdadelta) {
    opt.rho = g.at("rho").get<double>();
    opt.eps = g.at("eps").get<double>();
  } else {
    if (g.value("amsgrad", false)) throw InputError(where + ": amsgrad=True is not supported");
    opt.beta1 = g.at("betas").at(0).get<double>();
    opt.beta2 = g.at("betas").at(1).get<double>();
    opt.eps = g.at("eps").get<double>();
  }
  try {
    opt.validate();
  } catch (const InputError& e) {
    throw InputError(where + ": " + e.what());
  }
  return opt;
}

/// The settings two groups may not differ in (only the rate and weight decay may).
std::string differing_setting(const OptimizerOptions& a, const OptimizerOptions& b) {
  if (a.momentum != b.momentum) return "momentum";
  if (a.dampening != b.dampening) return "dampening";
  if (a.nesterov != b.nesterov) return "nesterov";
  if (a.beta1 != b.beta1 || a.beta2 != b.beta2) return "betas";
  if (a.eps != b.eps) return "eps";
  if (a.alpha != b.alpha) return "alpha";
  if (a.centered != b.centered) return "centered";
  if (a.rho != b.rho) return "rho";
  if (a.lr_decay != b.lr_decay) return "lr_decay";
  if (a.initial_accumulator != b.initial_accumulator) return "initial_accumulator_value";
  return "";
}

}  // namespace

at::Tensor fingerprint_signs(uint64_t seed, int64_t j, int64_t n) {
  at::Tensor out = at::empty({n}, at::kDouble);
  double* p = out.data_ptr<double>();
  const uint64_t base = seed + static_cast<uint64_t>(j) * (uint64_t{1} << 40);
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = base + static_cast<uint64_t>(i) + 0x9E3779B97F4A7C15ULL;  // splitmix64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    p[i] = (z >> 63) ? 1.0 : -1.0;
  }
  return out;
}

bool is_recorded_run(const fs::path& dir) {
  if (!fs::is_regular_file(dir / "manifest.json")) return false;
  try {
    const nlohmann::json m = read_json(dir / "manifest.json");
    return m.value("format", "") == kRecordedRunFormat;
  } catch (const std::exception&) {
    return false;
  }
}

void RecordedRun::read_loss(const std::string& mf) {
  loss_ = manifest_.at("loss").get<std::string>();
  if (loss_ != "ce" && loss_ != "mse") throw InputError(mf + ": loss must be ce or mse, not '" + loss_ + "'");
  if (!manifest_.contains("label_smoothing")) return;
  const auto& e = manifest_["label_smoothing"];
  if (!e.is_number() || !(e.get<double>() >= 0 && e.get<double>() < 1)) {
    throw InputError(mf + ": label_smoothing must be a number in [0, 1), not " + e.dump());
  }
  label_smoothing_ = e.get<double>();
  if (label_smoothing_ != 0 && loss_ != "ce") {
    throw InputError(mf + ": label_smoothing is for loss ce, and the loss is " + loss_);
  }
}

RecordedRun::RecordedRun(const fs::path& dir) : dir_(dir) {
  const std::string mf = (dir / "manifest.json").string();
  if (!fs::is_regular_file(dir / "manifest.json")) throw InputError(mf + ": missing (not a run directory)");
  manifest_ = read_json(dir / "manifest.json");
  if (manifest_.value("format", "") != kRecordedRunFormat) {
    throw InputError(mf + ": not a " + std::string(kRecordedRunFormat) + " manifest");
  }
  try {
    read_loss(mf);
    const auto& model = manifest_.at("model");
    outputs_ = model.at("outputs").get<int64_t>();
    if (outputs_ < 1 || outputs_ > 100000) throw InputError(mf + ": model.outputs must be 1..100000");
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const auto& p : model.at("parameters")) {
      param_order_.push_back(p.at(0).get<std::string>());
      if (shapes.count(param_order_.back())) {
        throw InputError(mf + ": model.parameters names '" + param_order_.back() + "' twice");
      }
      shapes[param_order_.back()] = shape_of(p.at(1));
    }
    if (param_order_.empty()) throw InputError(mf + ": model.parameters is empty (the optimizer trains nothing)");
    for (const auto& k : model.at("state_dict_keys")) {
      const std::string name = k.get<std::string>();
      state_dict_.emplace_back(name, shapes.count(name) ? shapes[name] : std::vector<int64_t>{-1});
    }
    for (const auto& name : param_order_) {
      if (std::none_of(state_dict_.begin(), state_dict_.end(), [&](const auto& e) { return e.first == name; })) {
        throw InputError(mf + ": parameter '" + name + "' is not in state_dict_keys");
      }
    }
    read_groups(manifest_.at("optimizer"), mf);
    read_frozen(model, mf);
    if (manifest_.contains("classes") && !manifest_["classes"].is_null()) {
      const auto& names = manifest_["classes"];
      if (!names.is_array() || static_cast<int64_t>(names.size()) != outputs_ ||
          std::any_of(names.begin(), names.end(), [](const auto& n) {
            return !n.is_string() || n.template get<std::string>().empty() || n.template get<std::string>().size() > 200;
          })) {
        throw InputError(mf + ": classes must name each of the model's " + std::to_string(outputs_) +
                         " outputs (non-empty strings of at most 200 characters)");
      }
    }
    if (manifest_.contains("fingerprint") && manifest_["fingerprint"].is_object()) {
      const auto& fp = manifest_["fingerprint"];
      if (!fp.at("seed").is_number_unsigned() || !fp.at("projections").is_number_integer() ||
          fp.at("projections").get<int64_t>() < 1 || fp.at("projections").get<int64_t>() > 64) {
        throw InputError(mf + ": fingerprint must give a seed and 1..64 projections");
      }
      fingerprint_seed_ = fp["seed"].get<uint64_t>();
      fingerprint_projections_ = fp["projections"].get<int64_t>();
    }
    read_sites(mf);
    if (manifest_.contains("zoo") && !manifest_["zoo"].is_null()) {
      zoo_spec_ = manifest_["zoo"].at("spec").get<std::string>();
      try {
        (void)models::parse_model_spec(zoo_spec_);
      } catch (const std::invalid_argument& e) {
        throw InputError(mf + ": zoo.spec: " + e.what());
      }
      if (!dropout_sites_.empty() || !batchnorm_modules_.empty() || !frozen_.empty()) {
        throw InputError(mf + ": a model with Dropout or BatchNorm sites or frozen parameters is not one of "
                         "pathkernel's own (zoo)");
      }
      zoo_names_ = manifest_["zoo"].at("names").get<std::map<std::string, std::string>>();
      if (zoo_names_.size() != param_order_.size() ||
          std::any_of(param_order_.begin(), param_order_.end(), [&](const auto& n) { return !zoo_names_.count(n); })) {
        throw InputError(mf + ": zoo.names must name every parameter once");
      }
    }
  } catch (const nlohmann::json::exception& e) {
    throw InputError(mf + ": malformed (" + std::string(e.what()) + ")");
  }
  if (!fs::is_regular_file(model_file())) throw InputError(model_file().string() + ": missing");
  read_split("train", train_x_, train_y_);
  if (manifest_.at("data").contains("test")) read_split("test", test_x_, test_y_);
  read_log();
  list_checkpoints();
}

void RecordedRun::read_frozen(const nlohmann::json& model, const std::string& mf) {
  if (!model.contains("frozen")) return;
  frozen_ = model.at("frozen").get<std::vector<std::string>>();
  for (size_t i = 0; i < frozen_.size(); ++i) {
    if (std::find(param_order_.begin(), param_order_.end(), frozen_[i]) == param_order_.end() ||
        std::find(frozen_.begin(), frozen_.begin() + static_cast<std::ptrdiff_t>(i), frozen_[i]) !=
            frozen_.begin() + static_cast<std::ptrdiff_t>(i)) {
      throw InputError(mf + ": model.frozen must name each of the optimizer's parameters at most once ('" +
                       frozen_[i] + "')");
    }
  }
  if (frozen_.size() == param_order_.size()) throw InputError(mf + ": model.frozen lists every trained parameter");
}

void RecordedRun::read_sites(const std::string& mf) {
  if (manifest_.contains("dropout")) {
    for (const auto& site : manifest_["dropout"].at("sites")) {
      const std::string name = site.at("module").get<std::string>();
      const double p = site.at("p").get<double>();
      if (name.empty() || !(p > 0 && p < 1) ||
          std::any_of(dropout_sites_.begin(), dropout_sites_.end(), [&](const auto& s) { return s.first == name; })) {
        throw InputError(mf + ": dropout.sites must name each site once, with p in (0, 1)");
      }
      dropout_sites_.emplace_back(name, p);
    }
  }
  if (manifest_.contains("batchnorm")) {
    batchnorm_modules_ = manifest_["batchnorm"].at("modules").get<std::vector<std::string>>();
    std::vector<std::string> sorted = batchnorm_modules_;
    std::sort(sorted.begin(), sorted.end());
    if (sorted.empty() || std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end() || sorted.front().empty()) {
      throw InputError(mf + ": batchnorm.modules must name each module once");
    }
  }
}

void RecordedRun::read_split(const std::string& split, at::Tensor& x, at::Tensor& y) {
  const std::string mf = (dir_ / "manifest.json").string();
  fs::path xf, yf;
  int64_t n = 0;
  std::vector<int64_t> input_shape;
  try {
    const auto& d = manifest_.at("data").at(split);
    xf = dir_ / d.at("x").get<std::string>();
    yf = dir_ / d.at("y").get<std::string>();
    n = d.at("examples").get<int64_t>();
    input_shape = shape_of(d.at("input_shape"));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(mf + ": data." + split + " malformed (" + std::string(e.what()) + ")");
  }
  // Data files must stay inside the run directory, as they are named and where their links lead.
  for (const fs::path& f : {xf, yf}) {
    const std::string rel = f.lexically_relative(dir_).lexically_normal().string();
    if (rel.empty() || rel.rfind("..", 0) == 0 || f.lexically_relative(dir_).is_absolute()) {
      throw InputError(mf + ": data file " + f.string() + " is outside the run directory");
    }
    if (!resolves_inside(dir_, f)) {
      throw InputError(f.string() + ": a symbolic link that leads outside the run directory; a run's data files "
                       "are its own");
    }
  }
  x = load_npy(xf);
  y = load_npy(yf);
  std::vector<int64_t> want = {n};
  want.insert(want.end(), input_shape.begin(), input_shape.end());
  const bool tokens = x.scalar_type() == at::kLong;  // int64 tokens, for a model that embeds them
  if ((x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble && !tokens) || x.sizes().vec() != want) {
    throw InputError(fmt::format("{}: inputs must be float32 (or float64, or int64 tokens) {}, the file holds {} {}",
                                 xf.string(), fmt::join(want, "x"), c10::toString(x.scalar_type()), fmt::join(x.sizes(), "x")));
  }
  if (split == "test" && train_x_.defined() && x.scalar_type() != train_x_.scalar_type() &&
      (tokens || train_x_.scalar_type() == at::kLong)) {
    throw InputError(xf.string() + ": test inputs are " + std::string(c10::toString(x.scalar_type())) +
                     ", the training inputs " + std::string(c10::toString(train_x_.scalar_type())));
  }
  if (tokens && x.numel() > 0 && x.min().item<int64_t>() < 0) {
    throw InputError(xf.string() + ": int64 tokens must not be negative");
  }
  if (!tokens && !at::isfinite(x).all().item<bool>()) throw InputError(xf.string() + ": inputs hold NaN or inf");
  if (loss_ == "ce") {
    if (y.scalar_type() != at::kLong || y.dim() != 1 || y.size(0) != n) {
      throw InputError(fmt::format("{}: labels must be int64 [{}]", yf.string(), n));
    }
    if (n > 0 && (y.min().item<int64_t>() < 0 || y.max().item<int64_t>() >= outputs_)) {
      throw InputError(fmt::format("{}: labels must be in 0..{} (the model has {} outputs); found {}..{}", yf.string(),
                                   outputs_ - 1, outputs_, y.min().item<int64_t>(), y.max().item<int64_t>()));
    }
  } else if (y.scalar_type() != at::kFloat || y.sizes().vec() != std::vector<int64_t>{n, outputs_} ||
             !at::isfinite(y).all().item<bool>()) {
    throw InputError(fmt::format("{}: targets must be finite float32 [{}, {}]", yf.string(), n, outputs_));
  }
}

void RecordedRun::read_log() {
  const fs::path path = dir_ / "steps.jsonl";
  if (!fs::exists(path)) throw InputError(path.string() + ": missing");
  log_ = read_step_log(path);
  check_step_records(log_, train_x_.size(0), train_x_.size(0), path.string());
  for (size_t k = 0; k < log_.size(); ++k) {
    if (fingerprint_projections_ > 0 && log_[k].contains("grad_proj")) {
      const auto& n = log_[k]["grad_norm"];
      const auto& p = log_[k]["grad_proj"];
      const bool ok = n.is_number() && std::isfinite(n.get<double>()) && n.get<double>() >= 0 && p.is_array() &&
                      static_cast<int64_t>(p.size()) == fingerprint_projections_ &&
                      std::all_of(p.begin(), p.end(), [](const auto& v) { return v.is_number() && std::isfinite(v.template get<double>()); });
      if (!ok) {
        throw InputError(path.string() + ":" + std::to_string(k + 1) + ": the gradient fingerprint must be a finite "
                         "grad_norm and " + std::to_string(fingerprint_projections_) + " finite grad_proj values");
      }
    }
    if (log_[k].contains("grad_scale")) {
      const auto& g = log_[k]["grad_scale"];
      if (!g.is_number() || !std::isfinite(g.get<double>()) || !(g.get<double>() > 0)) {
        throw InputError(path.string() + ":" + std::to_string(k + 1) + ": grad_scale must be a positive number");
      }
    }
    if (log_[k].contains("accumulated")) {
      const auto& a = log_[k]["accumulated"];
      if (!a.is_number_integer() || a.get<int64_t>() < 1 ||
          a.get<int64_t>() > static_cast<int64_t>(log_[k]["batch"].size())) {
        throw InputError(path.string() + ":" + std::to_string(k + 1) +
                         ": accumulated must be a whole number of micro-batches, 1 to the batch's size");
      }
    }
    if (log_[k].contains("autocast") && !(log_[k]["autocast"].is_string() && log_[k]["autocast"].size() <= 32)) {
      throw InputError(path.string() + ":" + std::to_string(k + 1) + ": autocast must name a dtype (a short string)");
    }
    const StepSettings st = settings_at(k);  // the step's settings, checked now
    if (!st.rate_scale.empty() || !st.weight_decay.empty() || !differing_setting(st.options, optimizer_).empty() ||
        st.options.weight_decay != optimizer_.weight_decay) {
      settings_vary_ = true;
    }
  }
}

void RecordedRun::read_groups(const nlohmann::json& o, const std::string& mf) {
  const OptimizerKind kind = parse_optimizer(o.at("name").get<std::string>());
  const auto& groups = o.at("param_groups");
  if (!groups.is_array() || groups.empty()) throw InputError(mf + ": optimizer has no parameter groups");
  for (size_t i = 0; i < groups.size(); ++i) {
    group_json_.push_back(groups[i]);
    groups_.push_back(options_of_group(kind, groups[i], mf + ": optimizer.param_groups[" + std::to_string(i) + "]"));
    const std::string d = differing_setting(groups_[0], groups_.back());
    if (!d.empty()) {
      throw InputError(mf + ": parameter groups with different " + d + " are not supported (groups may differ in "
                       "their learning rate and weight decay)");
    }
  }
  optimizer_ = groups_[0];
  // Which group each parameter is in: by name (param_names), or all in one group.
  group_of_.assign(param_order_.size(), 0);
  const bool named = std::all_of(groups.begin(), groups.end(), [](const auto& g) { return g.contains("param_names"); });
  if (groups.size() > 1 && !named) {
    throw InputError(mf + ": " + std::to_string(groups.size()) + " parameter groups without param_names: which "
                     "parameters each group holds is not recorded");
  }
  if (named && groups.size() > 1) {
    std::vector<int> seen(param_order_.size(), 0);
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      for (const auto& n : groups[gi].at("param_names")) {
        const auto pos = std::find(param_order_.begin(), param_order_.end(), n.get<std::string>());
        if (pos == param_order_.end()) {
          throw InputError(mf + ": optimizer.param_groups[" + std::to_string(gi) + "] names '" + n.get<std::string>() +
                           "', which is not a trained parameter");
        }
        const size_t i = static_cast<size_t>(pos - param_order_.begin());
        ++seen[i];
        group_of_[i] = gi;
      }
    }
    for (size_t i = 0; i < seen.size(); ++i) {
      if (seen[i] != 1) {
        throw InputError(mf + ": parameter '" + param_order_[i] + "' is in " + std::to_string(seen[i]) +
                         " parameter groups (must be in exactly one)");
      }
    }
  }
  for (const auto& g : groups_) {
    if (g.weight_decay != groups_[0].weight_decay) settings_vary_ = true;
  }
}

StepSettings RecordedRun::settings_at(int64_t k) const {
  const auto& r = log_.at(static_cast<size_t>(k));
  const std::string where = (dir_ / "steps.jsonl").string() + ":" + std::to_string(k + 1);
  const size_t n = groups_.size();
  // Rates by group: "lrs" when the groups' rates differ, else "lr" for all.
  std::vector<double> lrs(n, r.at("lr").get<double>());
  if (r.contains("lrs")) {
    const auto& j = r["lrs"];
    if (!j.is_array() || j.size() != n ||
        std::any_of(j.begin(), j.end(), [](const auto& v) { return !v.is_number() || !std::isfinite(v.template get<double>()) || !(v.template get<double>() > 0); })) {
      throw InputError(where + ": lrs must hold a finite positive rate for each of the " + std::to_string(n) +
                       " parameter groups");
    }
    for (size_t i = 0; i < n; ++i) lrs[i] = j[i].get<double>();
    if (lrs[0] != r.at("lr").get<double>()) throw InputError(where + ": lrs[0] must equal lr");
  }
  // Settings by group: the manifest's, or as a scheduler set them at this step ("groups").
  std::vector<OptimizerOptions> opts = groups_;
  if (r.contains("groups")) {
    const auto& j = r["groups"];
    if (!j.is_array() || j.size() != n) {
      throw InputError(where + ": groups must hold the settings of each of the " + std::to_string(n) + " parameter groups");
    }
    for (size_t i = 0; i < n; ++i) {
      if (!j[i].is_object()) throw InputError(where + ": groups[" + std::to_string(i) + "] must be an object");
      nlohmann::json g = group_json_[i];
      for (const auto& item : j[i].items()) g[item.key()] = item.value();
      try {
        opts[i] = options_of_group(groups_[0].kind, g, where + ": groups[" + std::to_string(i) + "]");
      } catch (const nlohmann::json::exception& e) {
        throw InputError(where + ": groups[" + std::to_string(i) + "] malformed (" + e.what() + ")");
      }
      const std::string d = differing_setting(opts[0], opts[i]);
      if (!d.empty()) {
        throw InputError(where + ": parameter groups with different " + d + " are not supported (groups may differ "
                         "in their learning rate and weight decay)");
      }
    }
  }
  StepSettings st;
  st.options = opts[0];
  const bool rates_differ = std::any_of(lrs.begin(), lrs.end(), [&](double v) { return v != lrs[0]; });
  const bool decay_differs = std::any_of(opts.begin(), opts.end(), [&](const auto& o) { return o.weight_decay != opts[0].weight_decay; });
  for (size_t i = 0; i < param_order_.size(); ++i) {
    const size_t g = group_of_[i];
    if (rates_differ) st.rate_scale[param_order_[i]] = lrs[g] / lrs[0];
    if (decay_differs) st.weight_decay[param_order_[i]] = opts[g].weight_decay;
  }
  return st;
}

fs::path RecordedRun::file_in_run(int64_t k, const std::string& name, const std::string& what) const {
  const std::string where = (dir_ / "steps.jsonl").string() + ":" + std::to_string(k + 1);
  const fs::path f = dir_ / name;
  const std::string rel = f.lexically_relative(dir_).lexically_normal().string();
  if (rel.empty() || rel.rfind("..", 0) == 0 || fs::path(name).is_absolute() || !resolves_inside(dir_, f)) {
    throw InputError(where + ": the step's " + what + " " + name + " are outside the run directory");
  }
  return f;
}

std::map<std::string, at::Tensor> RecordedRun::step_masks(int64_t k, const nlohmann::json& r, size_t rows) const {
  const std::string where = (dir_ / "steps.jsonl").string() + ":" + std::to_string(k + 1);
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  int64_t total = 0;
  std::string file;
  try {
    const auto& given = r.at("mask_shapes");
    if (!given.is_object() || given.empty()) throw InputError(where + ": mask_shapes must name the sites");
    for (const auto& [name, p] : dropout_sites_) {  // the manifest's order, the file's
      if (!given.contains(name)) continue;
      std::vector<int64_t> shape = shape_of(given.at(name));
      int64_t numel = 1;
      for (int64_t d : shape) {
        if (d < 1 || __builtin_mul_overflow(numel, d, &numel) || numel > (int64_t{1} << 36)) {
          throw InputError(where + ": the mask shape of site '" + name + "' is empty or too large");
        }
      }
      if (shape.empty() || shape[0] != static_cast<int64_t>(rows)) {
        throw InputError(fmt::format("{}: the mask of site '{}' is {}, not [{}, ...] for the step's batch", where, name,
                                     fmt::join(shape, "x"), rows));
      }
      total += numel;
      shapes.emplace_back(name, std::move(shape));
    }
    if (shapes.size() != given.size()) throw InputError(where + ": mask_shapes names a site the manifest does not list");
    file = r.at("masks").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    throw InputError(where + ": masks malformed (" + std::string(e.what()) + ")");
  }
  const fs::path f = file_in_run(k, file, "masks");
  const at::Tensor bytes = load_npy(f);
  const int64_t want = (total + 7) / 8;
  if (bytes.scalar_type() != at::kByte || bytes.dim() != 1 || bytes.size(0) != want) {
    throw InputError(fmt::format("{}: step {}'s masks must be uint8 [{}] ({} bits packed), the file holds {} {}", f.string(),
                                 k, want, total, c10::toString(bytes.scalar_type()), fmt::join(bytes.sizes(), "x")));
  }
  // numpy.packbits' order: each byte's highest bit first; the last byte's padding bits are 0.
  const at::Tensor bits = bytes.unsqueeze(1).bitwise_right_shift(at::arange(7, -1, -1, at::kByte)).bitwise_and(1).reshape({-1});
  if (bits.slice(0, total).any().item<bool>()) throw InputError(f.string() + ": bits set after the masks' end");
  std::map<std::string, at::Tensor> out;
  int64_t pos = 0;
  for (const auto& [name, shape] : shapes) {
    const int64_t n = c10::multiply_integers(shape);
    out[name] = bits.slice(0, pos, pos + n).reshape(shape);
    pos += n;
  }
  return out;
}

at::Tensor RecordedRun::fed_inputs(int64_t k, const std::string& name, size_t rows) const {
  const fs::path f = file_in_run(k, name, "inputs");
  const at::Tensor x = load_npy(f);
  std::vector<int64_t> want = {static_cast<int64_t>(rows)};
  const auto shape = train_x_.sizes().vec();
  want.insert(want.end(), shape.begin() + 1, shape.end());
  const bool tokens = train_x_.scalar_type() == at::kLong;
  if ((tokens ? x.scalar_type() != at::kLong : x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) ||
      x.sizes().vec() != want) {
    throw InputError(fmt::format("{}: the inputs fed at step {} must be {} {}, the file holds {} {}", f.string(), k,
                                 tokens ? "int64" : "float32", fmt::join(want, "x"), c10::toString(x.scalar_type()),
                                 fmt::join(x.sizes(), "x")));
  }
  if (tokens) {
    if (x.numel() > 0 && x.min().item<int64_t>() < 0) throw InputError(f.string() + ": int64 tokens must not be negative");
    return x;
  }
  if (!at::isfinite(x).all().item<bool>()) throw InputError(f.string() + ": inputs hold NaN or inf");
  return x.to(at::kDouble);
}

RecordedRun::Step RecordedRun::step(int64_t k) const {
  const auto& r = log_.at(static_cast<size_t>(k));
  Step s;
  s.lr = r.at("lr").get<double>();
  s.batch = r.at("batch").get<std::vector<int64_t>>();
  s.loss = r.at("loss").get<double>();
  if (r.contains("inputs")) s.inputs = fed_inputs(k, r.at("inputs").get<std::string>(), s.batch.size());
  if (r.contains("grad_scale")) s.grad_scale = r.at("grad_scale").get<double>();
  if (r.contains("accumulated")) s.accumulated = r.at("accumulated").get<int64_t>();
  if (r.contains("autocast")) s.autocast = r.at("autocast").get<std::string>();
  if (r.contains("masks")) s.masks = step_masks(k, r, s.batch.size());
  if (r.contains("batchnorm_train")) {
    const std::string where = (dir_ / "steps.jsonl").string() + ":" + std::to_string(k + 1);
    const auto& names = r.at("batchnorm_train");
    if (!names.is_array()) throw InputError(where + ": batchnorm_train must list module names");
    for (const auto& n : names) {
      if (!n.is_string() || std::find(batchnorm_modules_.begin(), batchnorm_modules_.end(), n.get<std::string>()) ==
                                batchnorm_modules_.end()) {
        throw InputError(where + ": batchnorm_train names " + n.dump() + ", which the manifest's batchnorm.modules does not list");
      }
      s.batchnorm_train.push_back(n.get<std::string>());
    }
  }
  s.settings = settings_at(k);
  if (fingerprint_projections_ > 0 && r.contains("grad_proj")) {
    s.grad_norm = r.at("grad_norm").get<double>();
    s.grad_proj = r.at("grad_proj").get<std::vector<double>>();
  }
  return s;
}

}  // namespace pathkernel
