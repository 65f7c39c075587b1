// The checks of every command's settings, in a unit free of LibTorch: the `pathkernel`
// launcher runs them (and the output checks of fs_util.cpp) before LibTorch is loaded, so a bad
// flag or an unusable --out is refused in milliseconds.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <filesystem>
#include <string>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/shards.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/explain/influence.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/report/report.h"
#include "pathkernel/report/sweep.h"
#include "pathkernel/train/optimizer.h"
#include "pathkernel/train/train_config.h"

namespace pathkernel {
namespace fs = std::filesystem;

OptimizerKind parse_optimizer(const std::string& name) {
  if (name == "sgd") return OptimizerKind::kSgd;
  if (name == "adam") return OptimizerKind::kAdam;
  if (name == "adamw") return OptimizerKind::kAdamW;
  if (name == "rmsprop") return OptimizerKind::kRmsprop;
  if (name == "adagrad") return OptimizerKind::kAdagrad;
  if (name == "adadelta") return OptimizerKind::kAdadelta;
  throw InputError("--optimizer must be sgd, adam, adamw, rmsprop, adagrad or adadelta, got '" + name + "'");
}

std::string optimizer_name(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kSgd: return "sgd";
    case OptimizerKind::kAdam: return "adam";
    case OptimizerKind::kAdamW: return "adamw";
    case OptimizerKind::kRmsprop: return "rmsprop";
    case OptimizerKind::kAdagrad: return "adagrad";
    case OptimizerKind::kAdadelta: return "adadelta";
  }
  return "sgd";
}

double default_eps(OptimizerKind kind) {
  if (kind == OptimizerKind::kAdagrad) return 1e-10;
  if (kind == OptimizerKind::kAdadelta) return 1e-6;
  return 1e-8;
}

void OptimizerOptions::validate() const {
  if (!(weight_decay >= 0) || !std::isfinite(weight_decay)) throw InputError("--weight-decay must be >= 0");
  if (kind == OptimizerKind::kSgd) {
    if (!(momentum >= 0 && momentum < 1)) throw InputError("--momentum must be in [0, 1)");
    if (!(dampening >= 0 && dampening <= 1)) throw InputError("--dampening must be in [0, 1]");
    if (nesterov && (momentum <= 0 || dampening != 0)) {
      throw InputError("--nesterov needs --momentum > 0 and --dampening 0 (as torch.optim.SGD)");
    }
    return;
  }
  if (!(eps > 0) || !std::isfinite(eps)) throw InputError("--eps must be a positive number");
  if (nesterov || dampening != 0) throw InputError("--nesterov and --dampening apply to --optimizer sgd only");
  if (kind == OptimizerKind::kRmsprop) {
    if (!(alpha >= 0 && alpha < 1)) throw InputError("--alpha must be in [0, 1)");
    if (!(momentum >= 0 && momentum < 1)) throw InputError("--momentum must be in [0, 1)");
    return;
  }
  if (momentum != 0) throw InputError("--momentum applies to --optimizer sgd and rmsprop only");
  if (kind == OptimizerKind::kAdagrad) {
    if (!(lr_decay >= 0) || !std::isfinite(lr_decay)) throw InputError("--lr-decay must be >= 0");
    if (!(initial_accumulator >= 0) || !std::isfinite(initial_accumulator)) {
      throw InputError("--initial-accumulator must be >= 0");
    }
    return;
  }
  if (kind == OptimizerKind::kAdadelta) {
    if (!(rho >= 0 && rho <= 1)) throw InputError("--rho must be in [0, 1]");
    return;
  }
  if (!(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1)) throw InputError("--betas must both be in [0, 1)");
}

nlohmann::json OptimizerOptions::to_json() const {
  nlohmann::json j = {{"name", optimizer_name(kind)}, {"weight_decay", weight_decay}};
  if (kind == OptimizerKind::kSgd) {
    j["momentum"] = momentum;
    j["dampening"] = dampening;
    j["nesterov"] = nesterov;
  } else if (kind == OptimizerKind::kAdam || kind == OptimizerKind::kAdamW) {
    j["betas"] = {beta1, beta2};
    j["eps"] = eps;
    j["amsgrad"] = false;
    j["weight_decay_kind"] = kind == OptimizerKind::kAdamW ? "decoupled" : "l2";
  } else {
    j["eps"] = eps;
    if (kind == OptimizerKind::kRmsprop) {
      j["alpha"] = alpha;
      j["centered"] = centered;
      j["momentum"] = momentum;
    } else if (kind == OptimizerKind::kAdagrad) {
      j["lr_decay"] = lr_decay;
      j["initial_accumulator_value"] = initial_accumulator;
    } else {
      j["rho"] = rho;
    }
    j["weight_decay_kind"] = "l2";
  }
  return j;
}

void check_kernel_route(const std::string& route) {
  if (route != "auto" && route != "factorized" && route != "explicit" && route != "torchscript") {
    throw InputError("--kernel-route must be auto, factorized, explicit or torchscript, not '" + route + "'");
  }
}

void check_products(const std::string& products) {
  if (products != "auto" && products != "forward" && products != "double-backward" && products != "rows") {
    throw InputError("--products must be auto, forward, double-backward or rows, not '" + products + "'");
  }
}

void AnalyzeConfig::validate() const {
  if (run.empty()) throw InputError("give the run directory");
  if (out.empty()) throw InputError("--out DIR is required");
  if (probes < 1 && probe_indices_file.empty() && probe_indices.empty()) throw InputError("--probes must be at least 1");
  if (split != "test" && split != "train") throw InputError("--split must be test or train");
  if (outputs != "all" && outputs != "true" && outputs != "pred" && outputs != "class") {
    throw InputError("--outputs must be all, true or pred");
  }
  if (every < 1) throw InputError("--every must be at least 1");
  check_kernel_route(kernel_route);
  check_products(products);
  if (tc_rule != "tau" && tc_rule != "outlier") throw InputError("--tc-rule must be tau or outlier");
  if (!(tau >= 0)) throw InputError("--tau must be >= 0");
  if (exact_nodes < 0 || exact_nodes > 64) throw InputError("--exact takes 1..64 quadrature nodes");
  if (tc_window < 2) throw InputError("--tc-window must be at least 2");
  if (!(tc_kappa >= 0)) throw InputError("--tc-kappa must be >= 0");
  if (check_every < 1) throw InputError("--check-every must be at least 1");
  if (kinks_max < 0) throw InputError("--kinks-max must be >= 0 (0: no limit)");
  if (kinks_examples < 0) throw InputError("--kinks-examples must be >= 0 (0: the whole batch)");
  if (sharpness_every < 0) throw InputError("--sharpness must be a positive step count");
  if (sharpness_examples < 1) throw InputError("--sharpness-examples must be at least 1");
  if (sharpness_iterations < 1) throw InputError("--sharpness-iterations must be at least 1");
  if (!(segment_seconds >= 0)) throw InputError("--segment-every must be >= 0 seconds");
  if (shard_count < 0 || (shard_count > 0 && (shard_index < 1 || shard_index > shard_count))) {
    throw InputError("--shard must be I/N with 1 <= I <= N");
  }
  if (shard_count > 0 && every != 1) throw InputError("--shard needs --every 1 (the shards must join into every step)");
  if (shard_even && shard_count == 0) throw InputError("--shard-even goes with --shard I/N");
  if (workers < 1 || workers > 64) throw InputError("--workers takes 1..64 processes");
  if (workers > 1 && shard_count > 0) throw InputError("--workers splits the range into shards itself: give --shard or --workers");
  if (workers > 1 && every != 1) throw InputError("--workers needs --every 1 (the workers' shards must join into every step)");
  check_thread_flag(threads);
}

void ExplainConfig::validate() const {
  if (run.empty()) throw InputError("give the run directory");
  if (out.empty()) throw InputError("--out DIR is required");
  if (probe_indices.empty() && probes < 1) throw InputError("give --probe I (repeatable) or --probes N");
  if (!probe_indices.empty() && probes > 0) throw InputError("give --probe I or --probes N, not both");
  if (top < 1) throw InputError("--top must be at least 1");
  if (csv != "top" && csv != "all") throw InputError("--csv must be top or all, got '" + csv + "'");
  if (shard_count < 0 || (shard_count > 0 && (shard_index < 1 || shard_index > shard_count))) {
    throw InputError("--shard must be I/N with 1 <= I <= N");
  }
  if (workers < 1 || workers > 64) throw InputError("--workers takes 1..64 processes");
  if (workers > 1 && shard_count > 0) throw InputError("--workers splits the run into shards itself: give --shard or --workers");
  if (shard_even && shard_count == 0) throw InputError("--shard-even goes with --shard I/N");
  if (part_count < 0 || (part_count > 0 && (part_index < 1 || part_index > part_count))) {
    throw InputError("--probe-part must be I/N with 1 <= I <= N");
  }
  if (part_count > 0 && (shard_count > 0 || workers > 1)) {
    throw InputError("--probe-part is one worker of explain --workers: not with --shard or --workers");
  }
  check_thread_flag(threads);
  if (exact_nodes < 0) throw InputError("--exact must be positive");
  if (route != "auto" && route != "backward") throw InputError("route must be auto or backward");
  if (project < 0) throw InputError("--project must be positive (the projection's dims per layer)");
  if (project > 0 && (kernel_route == "explicit" || kernel_route == "torchscript")) {
    throw InputError("--project needs the factorized route (--kernel-route auto or factorized)");
  }
  if (!class_names_file.empty() && !std::filesystem::is_regular_file(class_names_file)) {
    throw InputError(class_names_file + ": no such class names file");
  }
  check_kernel_route(kernel_route);
}

void ReportConfig::validate() const {
  if (analysis.empty()) throw InputError("give the analysis directory");
  if (out.empty()) throw InputError("--out DIR is required");
  if (curves < 1) throw InputError("--curves must be at least 1");
  if (!class_names_file.empty() && !fs::is_regular_file(class_names_file)) {
    throw InputError(class_names_file + ": no such class names file");
  }
}

void SweepConfig::validate() const {
  if (lrs.empty()) throw InputError("--lr needs at least one learning rate (e.g. 1e-4,1e-3,1e-2,1e-1)");
  for (double lr : lrs) {
    if (!(lr > 0) || !std::isfinite(lr)) throw InputError("--lr: every rate must be positive");
  }
  std::vector<double> sorted = lrs;  // each rate's run has a folder of its own (lr_<rate>)
  std::sort(sorted.begin(), sorted.end());
  if (const auto twice = std::adjacent_find(sorted.begin(), sorted.end()); twice != sorted.end()) {
    throw InputError(fmt::format("--lr lists {} twice", *twice));
  }
  if (out.empty()) throw InputError("--out DIR is required");
  // A sweep continues in its own folder: an existing --out may hold only what a sweep writes
  // (lr_* folders, sweep.*), never a user's files.
  std::error_code ec;
  if (fs::is_directory(out, ec)) {
    for (const auto& e : fs::directory_iterator(out, ec)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("lr_", 0) != 0 && name.rfind("sweep.", 0) != 0 && name.rfind(".lr_", 0) != 0) {
        throw InputError(out + ": holds " + name + ", which a sweep does not write; --out takes a new folder or an "
                         "earlier sweep's, to continue it");
      }
    }
  } else {
    check_output_dir(out, /*force=*/false, "sweep.csv");  // a new folder: it must be creatable
  }
  for (double lr : lrs) {
    TrainConfig t = train;
    t.out = out;
    t.lr = lr;
    t.validate();
  }
}

std::vector<int64_t> parse_checkpoint_list(const std::string& text) {
  std::vector<int64_t> steps;
  if (text == "all") return steps;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || v < 0) {
      throw InputError("--checkpoints must be all or steps S1,S2,... (whole numbers >= 0), got '" + text + "'");
    }
    steps.push_back(v);
  }
  if (steps.empty()) throw InputError("--checkpoints names no step");
  std::sort(steps.begin(), steps.end());
  steps.erase(std::unique(steps.begin(), steps.end()), steps.end());
  return steps;
}

void InfluenceConfig::validate() const {
  if (run.empty()) throw InputError("give the run directory");
  if (out.empty()) throw InputError("--out DIR is required");
  if (probes < 1 && probe_indices_file.empty() && probe_indices.empty()) throw InputError("--probes must be at least 1");
  if (split != "test" && split != "train") throw InputError("--split must be test or train");
  if (train_examples < 0) throw InputError("--train-examples must not be negative");
  if (chunk < 1) throw InputError("--chunk must be at least 1");
  check_thread_flag(threads);
  parse_checkpoint_list(checkpoints);
}

std::pair<int64_t, int64_t> parse_shard(const std::string& text, const std::string& flag) {
  const size_t slash = text.find('/');
  try {
    size_t u1 = 0, u2 = 0;
    if (slash == std::string::npos) throw std::invalid_argument("");
    const std::string a = text.substr(0, slash), b = text.substr(slash + 1);
    const long long i = std::stoll(a, &u1), n = std::stoll(b, &u2);
    if (u1 != a.size() || u2 != b.size() || n < 1 || n > 10000 || i < 1 || i > n) throw std::invalid_argument("");
    return {i, n};
  } catch (const std::exception&) {
    throw InputError(flag + " must be I/N with 1 <= I <= N (e.g. 2/3), got '" + text + "'");
  }
}

void MergeConfig::validate() const {
  if (shards.empty()) throw InputError("give the shards' analysis directories");
  if (walk < 0) throw InputError("--walk must be a part's number (1 or more)");
  if (walk > 0 && !out.empty()) throw InputError("--walk stores the part's share in its own folder: give no --out");
  if (walk == 0 && out.empty()) throw InputError("--out DIR is required");
}

bool is_partial_analysis(const std::string& dir) {
  std::error_code ec;
  if (dir.empty() || !fs::is_regular_file(fs::path(dir) / "partial.json", ec)) return false;
  try {
    return read_json(fs::path(dir) / "partial.json").value("format", "") == kPartialAnalysisFormat;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace pathkernel
