#include "options.h"

#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <set>
#include <sstream>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/version.h"
#include "pathkernel/train/optimizer.h"

namespace pathkernel::app {

void add_train_options(cxxopts::Options& opts, TrainConfig& c, bool with_lr) {
  // clang-format off
  opts.add_options("training")
    ("data", "MNIST-style IDX folder", cxxopts::value(c.data_dir)->default_value(c.data_dir))
    ("model", "linear | quadratic[:W] | mlp:W1[,W2..][:ACT][:bn][:dropout=P] | cnn:C1,C2[:ACT][:bn][:dropout=P] | toy:wave; ACT: tanh|relu|leaky_relu|softplus|gelu",
     cxxopts::value(c.model)->default_value(c.model))
    ("steps", "number of SGD steps", cxxopts::value(c.steps))
    ("epochs", "number of epochs (instead of --steps)", cxxopts::value(c.epochs))
    ("batch", "minibatch size", cxxopts::value(c.batch)->default_value("64"))
    ("lr-schedule", "[warmup:W+]constant | step:EVERY:GAMMA | cosine[:LR_MIN] | file:PATH",
     cxxopts::value(c.lr_schedule)->default_value("constant"))
    ("optimizer", "sgd | adam | adamw | rmsprop | adagrad | adadelta (as torch.optim defines them)",
     cxxopts::value(c.optimizer)->default_value("sgd"))
    ("momentum", "sgd, rmsprop: momentum mu", cxxopts::value(c.momentum)->default_value("0"))
    ("nesterov", "sgd: Nesterov momentum", cxxopts::value(c.nesterov)->default_value("false"))
    ("dampening", "sgd: dampening tau of the momentum buffer", cxxopts::value(c.dampening)->default_value("0"))
    ("betas", "adam, adamw: B1,B2", cxxopts::value<std::string>()->default_value("0.9,0.999"))
    ("eps", "adam, adamw, rmsprop: epsilon (default 1e-8); adagrad (1e-10); adadelta (1e-6)",
     cxxopts::value(c.eps))
    ("alpha", "rmsprop: smoothing of the squared gradient", cxxopts::value(c.alpha)->default_value("0.99"))
    ("centered", "rmsprop: centered (divide by the gradient's variance estimate)",
     cxxopts::value(c.centered)->default_value("false"))
    ("rho", "adadelta: decay of the running averages", cxxopts::value(c.rho)->default_value("0.9"))
    ("lr-decay", "adagrad: rate decay, lr / (1 + k lr_decay)", cxxopts::value(c.lr_decay)->default_value("0"))
    ("initial-accumulator", "adagrad: the sum of squares' initial value",
     cxxopts::value(c.initial_accumulator)->default_value("0"))
    ("weight-decay", "sgd, adam: L2 weight decay lambda; adamw: decoupled weight decay",
     cxxopts::value(c.weight_decay)->default_value("0"))
    ("seed", "seed of the initial weights and the batch order", cxxopts::value(c.seed)->default_value("0"))
    ("threads", "torch and OpenBLAS threads (pinned, recorded)", cxxopts::value(c.threads)->default_value("1"))
    ("dtype", "float32 | float64", cxxopts::value(c.dtype)->default_value("float32"))
    ("loss", "ce | mse", cxxopts::value(c.loss)->default_value("ce"))
    ("label-smoothing", "ce: label smoothing e in [0, 1), as torch.nn.CrossEntropyLoss's",
     cxxopts::value(c.label_smoothing)->default_value("0"))
    ("train-limit", "use only the first N training examples", cxxopts::value(c.train_limit)->default_value("0"))
    ("normalize", "none (pixels/255) | standard (zero mean, unit std)",
     cxxopts::value(c.normalize)->default_value("none"))
    ("checkpoint-every", "checkpoint every K steps (plus step 0 and the last)",
     cxxopts::value(c.checkpoint_every)->default_value("100"))
    ("eval-every", "test accuracy every K steps (0: at the end only)",
     cxxopts::value(c.eval_every)->default_value("0"))
    ("log-gradients", "append each step's batch gradient (float32) to gradients.bin",
     cxxopts::value(c.log_gradients)->default_value("false"));
  // clang-format on
  if (with_lr) opts.add_options("training")("lr", "learning rate", cxxopts::value(c.lr)->default_value("0.1"));
}

void add_analysis_options(cxxopts::Options& opts, AnalyzeConfig& c, bool with_threads) {
  // clang-format off
  opts.add_options("analysis")
    ("probes", "number of probe images, evenly spaced over the split", cxxopts::value(c.probes)->default_value("64"))
    ("balanced", "with --probes N: N/C probes of each class, evenly spaced within it",
     cxxopts::value(c.balanced)->default_value("false"))
    ("probe-indices", "file of probe indices, one per line (instead of --probes)", cxxopts::value(c.probe_indices_file))
    ("split", "test | train: where the probes come from", cxxopts::value(c.split)->default_value("test"))
    ("outputs", "all (every logit) | true (the label's) | pred (the final prediction's)",
     cxxopts::value(c.outputs)->default_value("all"))
    ("every", "analyze every S-th step", cxxopts::value(c.every)->default_value("1"))
    ("second-order", "also S = 1/2 dw^T H dw (exact, by double backward)",
     cxxopts::value(c.second_order)->default_value("false"))
    ("kernel-route", "auto | factorized | explicit (per-row Jacobians: the slow reference route) | torchscript "
     "(a recorded run's own model, by autograd)",
     cxxopts::value(c.kernel_route)->default_value("auto"))
    ("products", "auto | forward | double-backward | rows: how the probes' products J v with each step's "
     "directions are formed (Jacobian-vector products by forward-mode AD or by double backward, or gradient rows)",
     cxxopts::value(c.products)->default_value("auto"))
    ("exact", "Q: also the exact path kernel by Q-node Gauss-Legendre quadrature", cxxopts::value(c.exact_nodes))
    ("tc-rule", "tau | outlier", cxxopts::value(c.tc_rule)->default_value("tau"))
    ("tau", "tau rule: step in T_c when |R|/|F| > tau", cxxopts::value(c.tau)->default_value("0.1"))
    ("tc-window", "outlier rule: steps of history", cxxopts::value(c.tc_window)->default_value("50"))
    ("tc-kappa", "outlier rule: MADs above the median", cxxopts::value(c.tc_kappa)->default_value("5"))
    ("kinks", "walk each step's kinks (ReLU / leaky ReLU / max-pool pattern changes) of every probe and batch "
     "example: kinks crossed per step in steps.csv; with --exact, the exact path kernel split at them (exact again)",
     cxxopts::value(c.kink_split)->default_value("false"))
    ("allow-unverified", "a recorded run: analyze the steps that fail the check against their logged loss and "
     "gradient fingerprint, marked (steps.csv verified 0), instead of exit 4",
     cxxopts::value(c.allow_unverified)->default_value("false"))
    ("kinks-examples", "with --kinks: walk only the first N examples of each batch (0: all)",
     cxxopts::value(c.kinks_examples)->default_value("0"))
    ("kinks-max", "with --kinks: a step where one example would need more than N pieces is not walked (its kink "
     "columns empty, its exact kernel by the plain rule; 0: no limit)", cxxopts::value(c.kinks_max)->default_value("0"))
    ("sharpness", "EVERY: lambda_max of the loss Hessian (training subset and batch) at every EVERY-th step, into "
     "sharpness.csv", cxxopts::value(c.sharpness_every)->default_value("0"))
    ("sharpness-examples", "the training subset of --sharpness: the first N examples",
     cxxopts::value(c.sharpness_examples)->default_value("1000"))
    ("sharpness-iterations", "Lanczos iterations at most per lambda_max",
     cxxopts::value(c.sharpness_iterations)->default_value("100"))
    ("check-every", "models with convolutions: the per-example kernel split checked against forward-mode "
     "K on every N-th analyzed step (others: every step)", cxxopts::value(c.check_every)->default_value("10"));
  // clang-format on
  if (with_threads) {
    opts.add_options("analysis")("threads", "LibTorch and OpenBLAS threads (pinned, recorded in the summary)",
                                 cxxopts::value(c.threads)->default_value("1"));
  }
}

void read_betas(const cxxopts::ParseResult& r, TrainConfig& c) {
  // --eps defaults to the optimizer's own torch.optim default.
  if (!r.count("eps")) {
    try {
      c.eps = default_eps(parse_optimizer(c.optimizer));
    } catch (const InputError&) {
      c.eps = 1e-8;  // an unknown --optimizer is named by validate()
    }
  }
  const std::string text = r["betas"].as<std::string>();
  const size_t comma = text.find(',');
  try {
    if (comma == std::string::npos) throw std::invalid_argument("");
    size_t used1 = 0, used2 = 0;
    const std::string a = text.substr(0, comma), b = text.substr(comma + 1);
    c.beta1 = std::stod(a, &used1);
    c.beta2 = std::stod(b, &used2);
    if (used1 != a.size() || used2 != b.size()) throw std::invalid_argument("");
  } catch (const std::exception&) {
    throw InputError("--betas must be two numbers B1,B2, got '" + text + "'");
  }
}

namespace {

void check_number(const std::string& command, const std::string& key, const std::string& v, bool integer) {
  char* end = nullptr;
  errno = 0;
  if (integer) {
    std::strtoll(v.c_str(), &end, 10);
  } else {
    std::strtod(v.c_str(), &end);
  }
  if (v.empty() || end != v.c_str() + v.size() || errno == ERANGE) {
    throw InputError(command + ": --" + key + " must be " + (integer ? "an integer" : "a number") + ", got '" + v + "'");
  }
}

/// cxxopts reads "0.1abc" as 0.1, and refuses "64x" without naming the flag: every number on
/// the command line is checked here first, whole, with the flag named.
void check_numbers(const Args& args) {
  static const std::set<std::string> integers = {
      "steps", "epochs", "batch", "seed", "threads", "train-limit", "checkpoint-every", "eval-every", "probes",
      "every", "exact", "tc-window", "output", "top", "grids", "curves", "step", "check-every", "train-examples", "chunk",
      "project", "project-seed", "kinks-examples", "kinks-max", "sharpness", "sharpness-examples", "sharpness-iterations"};
  static const std::set<std::string> reals = {"lr", "momentum", "dampening", "eps", "weight-decay", "tau", "tc-kappa",
                                              "segment-every"};
  const std::string& command = args[0];
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0) continue;
    const size_t eq = a.find('=');
    const std::string key = a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    if (key == "steps" && command == "pathkernel analyze") continue;  // a range A:B there
    const bool integer = integers.count(key) > 0;
    if (!integer && !reals.count(key)) continue;
    if (eq == std::string::npos && i + 1 >= args.size()) continue;  // cxxopts reports the missing value
    const std::string v = eq == std::string::npos ? args[++i] : a.substr(eq + 1);
    // sweep's --lr is a list of rates
    if (key == "lr" && command == "pathkernel sweep") {
      std::string item;
      for (std::stringstream ss(v); std::getline(ss, item, ',');) check_number(command, key, item, false);
      continue;
    }
    check_number(command, key, v, integer);
  }
}

}  // namespace

bool json_output(const cxxopts::ParseResult& result) { return result.count("json") > 0; }

void print_json(const nlohmann::json& doc) { std::cout << doc.dump() << "\n"; }

void print_summary_json(const std::string& out) {
  nlohmann::json doc = read_json(std::filesystem::path(out) / "summary.json");
  doc["out"] = out;
  print_json(doc);
}

bool parse_options(cxxopts::Options& opts, const Args& args, cxxopts::ParseResult& result) {
  opts.add_options()("log-level", "trace | debug | info | warn | error",
                     cxxopts::value<std::string>()->default_value("info"))("h,help", "show this help")(
      "version", "print pathkernel's version and exit")("json", "print the summary as JSON on stdout (for scripts)");
  check_numbers(args);
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  try {
    result = opts.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const cxxopts::exceptions::exception& e) {
    throw InputError(args[0] + ": " + e.what() + " (see --help)");
  }
  if (result.count("help")) {
    std::cout << opts.help() << "\n";
    return false;
  }
  if (result.count("version")) {
    std::cout << "pathkernel " << kVersion << " (" << kGitRevision << ")\n";
    return false;
  }
  const std::string level = result["log-level"].as<std::string>();
  if (level != "trace" && level != "debug" && level != "info" && level != "warn" && level != "error") {
    throw InputError("--log-level must be trace, debug, info, warn or error, got '" + level + "'");
  }
  spdlog::set_level(spdlog::level::from_str(level));
  if (!result.unmatched().empty()) throw InputError(args[0] + ": unexpected argument '" + result.unmatched()[0] + "'");
  return true;
}

}  // namespace pathkernel::app
