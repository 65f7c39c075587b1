#include "pathkernel/train/train_config.h"

#include <nlohmann/json.hpp>
#include <sched.h>

#include <algorithm>
#include <cctype>
#include <cmath>

#include "pathkernel/io/errors.h"
#include "pathkernel/models/model_spec.h"

namespace pathkernel {

int usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

void check_thread_flag(int threads) {
  const int cores = std::min(usable_cores(), kMaxThreads);
  if (threads < 1 || threads > cores) {
    throw InputError("--threads must be between 1 and " + std::to_string(cores) + " (the cores this process may use), got " +
                     std::to_string(threads));
  }
}


void TrainConfig::validate() const {
  try {
    models::parse_model_spec(model);
  } catch (const std::invalid_argument& e) {
    throw InputError(std::string("--model: ") + e.what());
  }
  if (steps < 0 || epochs < 0) throw InputError("--steps and --epochs must not be negative");
  if (steps > kMaxSteps) throw InputError("--steps must be at most " + std::to_string(kMaxSteps));
  if (epochs > kMaxEpochs) throw InputError("--epochs must be at most " + std::to_string(kMaxEpochs));
  if ((steps > 0) == (epochs > 0)) throw InputError("give exactly one of --steps N or --epochs N");
  if (batch < 1) throw InputError("--batch must be at least 1");
  if (!(lr > 0) || !std::isfinite(lr)) throw InputError("--lr must be a positive number");
  if (dtype == "float32" && lr > 1e38) throw InputError("--lr must be below 1e38 with --dtype float32");
  // Settings the float32 update multiplies by must be float32 numbers themselves.
  if (dtype == "float32" && weight_decay > 1e38) throw InputError("--weight-decay must be below 1e38 with --dtype float32");
  if (dtype == "float32" && eps > 1e38) throw InputError("--eps must be below 1e38 with --dtype float32");
  optimizer_options().validate();
  if (!(label_smoothing >= 0 && label_smoothing < 1)) throw InputError("--label-smoothing must be in [0, 1)");
  if (label_smoothing != 0 && loss != "ce") throw InputError("--label-smoothing is for --loss ce");
  if (threads < 1 || threads > kMaxThreads) {
    throw InputError("--threads must be between 1 and " + std::to_string(kMaxThreads));
  }
  if (dtype != "float32" && dtype != "float64") throw InputError("--dtype must be float32 or float64");
  if (loss != "ce" && loss != "mse") throw InputError("--loss must be ce or mse");
  if (train_limit < 0) throw InputError("--train-limit must not be negative");
  if (normalize != "none" && normalize != "standard") throw InputError("--normalize must be none or standard");
  if (checkpoint_every < 1) throw InputError("--checkpoint-every must be at least 1");
  if (eval_every < 0) throw InputError("--eval-every must not be negative");
  if (out.empty()) throw InputError("--out RUN is required");
}

OptimizerOptions TrainConfig::optimizer_options() const {
  OptimizerOptions o;
  o.kind = parse_optimizer(optimizer);
  o.weight_decay = weight_decay;
  o.momentum = momentum;
  o.dampening = dampening;
  o.nesterov = nesterov;
  o.beta1 = beta1;
  o.beta2 = beta2;
  o.eps = eps;
  o.alpha = alpha;
  o.centered = centered;
  o.rho = rho;
  o.lr_decay = lr_decay;
  o.initial_accumulator = initial_accumulator;
  return o;
}

nlohmann::json to_json(const TrainConfig& c) {
  nlohmann::json j = {{"data_dir", c.data_dir},       {"model", c.model},
          {"steps", c.steps},             {"epochs", c.epochs},
          {"batch", c.batch},             {"lr", c.lr},
          {"lr_schedule", c.lr_schedule}, {"momentum", c.momentum},
          {"optimizer", c.optimizer},     {"dampening", c.dampening},
          {"nesterov", c.nesterov},       {"betas", {c.beta1, c.beta2}},
          {"eps", c.eps},
          {"weight_decay", c.weight_decay}, {"seed", c.seed},
          {"threads", c.threads},         {"dtype", c.dtype},
          {"loss", c.loss},               {"label_smoothing", c.label_smoothing},
          {"train_limit", c.train_limit},
          {"normalize", c.normalize},     {"checkpoint_every", c.checkpoint_every},
          {"eval_every", c.eval_every},   {"log_gradients", c.log_gradients},
          {"out", c.out}};
  // The settings of RMSprop, Adagrad and Adadelta, written for those runs only.
  if (c.optimizer == "rmsprop") {
    j["alpha"] = c.alpha;
    j["centered"] = c.centered;
  } else if (c.optimizer == "adagrad") {
    j["lr_decay"] = c.lr_decay;
    j["initial_accumulator"] = c.initial_accumulator;
  } else if (c.optimizer == "adadelta") {
    j["rho"] = c.rho;
  }
  return j;
}

namespace {

/// A whole number from a manifest: 30.5 or "30" is refused, not truncated or converted.
int64_t whole_number(const nlohmann::json& j, const char* key, const std::string& source) {
  const nlohmann::json& v = j.at(key);
  if (!v.is_number_integer()) {
    throw InputError(source + ": config." + key + " must be a whole number, not " + v.dump().substr(0, 40));
  }
  return v.get<int64_t>();
}

/// A check's message names the flag (--batch); about a manifest it names the key (config.batch).
std::string as_manifest_keys(const std::string& message) {
  std::string out;
  for (size_t i = 0; i < message.size(); ++i) {
    if (message.compare(i, 2, "--") == 0 && i + 2 < message.size() && std::islower(static_cast<unsigned char>(message[i + 2]))) {
      out += "config.";
      for (i += 2; i < message.size() && (std::islower(static_cast<unsigned char>(message[i])) || message[i] == '-'); ++i) {
        out += message[i] == '-' ? '_' : message[i];
      }
      --i;
    } else {
      out += message[i];
    }
  }
  return out;
}

}  // namespace

TrainConfig train_config_from_json(const nlohmann::json& j, const std::string& source) {
  TrainConfig c;
  try {
    c.data_dir = j.at("data_dir").get<std::string>();
    c.model = j.at("model").get<std::string>();
    c.steps = whole_number(j, "steps", source);
    c.epochs = whole_number(j, "epochs", source);
    c.batch = whole_number(j, "batch", source);
    c.lr = j.at("lr").get<double>();
    c.lr_schedule = j.at("lr_schedule").get<std::string>();
    c.momentum = j.at("momentum").get<double>();
    // Absent from runs made before the optimizer seam (format pathkernel-run/1 with plain SGD).
    c.optimizer = j.value("optimizer", std::string("sgd"));
    c.dampening = j.value("dampening", 0.0);
    c.nesterov = j.value("nesterov", false);
    if (j.contains("betas")) {
      const auto betas = j.at("betas").get<std::vector<double>>();
      if (betas.size() != 2) throw InputError(source + ": 'betas' must hold two numbers");
      c.beta1 = betas[0];
      c.beta2 = betas[1];
    }
    c.eps = j.value("eps", 1e-8);
    // Absent from runs made before RMSprop, Adagrad and Adadelta: their torch.optim defaults.
    c.alpha = j.value("alpha", 0.99);
    c.centered = j.value("centered", false);
    c.rho = j.value("rho", 0.9);
    c.lr_decay = j.value("lr_decay", 0.0);
    c.initial_accumulator = j.value("initial_accumulator", 0.0);
    c.weight_decay = j.at("weight_decay").get<double>();
    c.seed = j.at("seed").get<uint64_t>();
    c.threads = static_cast<int>(std::clamp<int64_t>(whole_number(j, "threads", source), -1, kMaxThreads + 1));
    c.dtype = j.at("dtype").get<std::string>();
    c.loss = j.at("loss").get<std::string>();
    c.label_smoothing = j.value("label_smoothing", 0.0);  // absent from runs made before it
    c.train_limit = whole_number(j, "train_limit", source);
    c.normalize = j.at("normalize").get<std::string>();
    c.checkpoint_every = whole_number(j, "checkpoint_every", source);
    c.eval_every = whole_number(j, "eval_every", source);
    c.log_gradients = j.at("log_gradients").get<bool>();
    c.out = j.at("out").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    throw InputError(source + ": bad training config (" + e.what() + ")");
  }
  try {
    c.validate();
  } catch (const InputError& e) {
    throw InputError(source + ": " + as_manifest_keys(e.what()));
  }
  return c;
}

}  // namespace pathkernel
