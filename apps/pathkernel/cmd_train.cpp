// pathkernel train: options -> TrainConfig -> pathkernel::train / resume.
#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "pathkernel/errors.h"
#include "pathkernel/trainer.h"

namespace pathkernel::app {

std::string joined_command_line(const Args& args) {
  std::string s;
  for (const auto& a : args) s += (s.empty() ? "" : " ") + a;
  return s;
}

namespace {

void print_summary(const TrainSummary& s) {
  std::cout << "run:            " << s.run.string() << "\n"
            << "status:         " << s.status << "\n"
            << "steps:          " << s.steps_completed << " / " << s.total_steps << "\n"
            << "final loss:     " << s.final_loss << "\n"
            << "test accuracy:  " << s.test_accuracy << "\n";
}

}  // namespace

int cmd_train(const Args& args) {
  TrainConfig c;
  cxxopts::Options opts("pathkernel train", "Train a model with logged minibatch SGD into a run directory.");
  // clang-format off
  opts.add_options()
    ("data", "MNIST-style IDX folder", cxxopts::value(c.data_dir)->default_value(c.data_dir))
    ("model", "linear | quadratic[:W] | mlp:W1[,W2..][:tanh|relu|softplus|gelu] | cnn:C1,C2[:ACT]",
     cxxopts::value(c.model)->default_value(c.model))
    ("steps", "number of SGD steps", cxxopts::value(c.steps))
    ("epochs", "number of epochs (instead of --steps)", cxxopts::value(c.epochs))
    ("batch", "minibatch size", cxxopts::value(c.batch)->default_value("64"))
    ("lr", "learning rate", cxxopts::value(c.lr)->default_value("0.1"))
    ("lr-schedule", "[warmup:W+]constant | step:EVERY:GAMMA | cosine[:LR_MIN] | file:PATH",
     cxxopts::value(c.lr_schedule)->default_value("constant"))
    ("momentum", "SGD momentum mu (PyTorch's definition)", cxxopts::value(c.momentum)->default_value("0"))
    ("weight-decay", "L2 weight decay lambda", cxxopts::value(c.weight_decay)->default_value("0"))
    ("seed", "seed of the initial weights and the batch order", cxxopts::value(c.seed)->default_value("0"))
    ("threads", "torch and OpenBLAS threads (pinned, recorded)", cxxopts::value(c.threads)->default_value("1"))
    ("dtype", "float32 | float64", cxxopts::value(c.dtype)->default_value("float32"))
    ("loss", "ce | mse", cxxopts::value(c.loss)->default_value("ce"))
    ("train-limit", "use only the first N training examples", cxxopts::value(c.train_limit)->default_value("0"))
    ("normalize", "none (pixels/255) | standard (zero mean, unit std)",
     cxxopts::value(c.normalize)->default_value("none"))
    ("checkpoint-every", "checkpoint every K steps (plus step 0 and the last)",
     cxxopts::value(c.checkpoint_every)->default_value("100"))
    ("eval-every", "test accuracy every K steps (0: at the end only)",
     cxxopts::value(c.eval_every)->default_value("0"))
    ("log-gradients", "append each step's batch gradient (float32) to gradients.bin",
     cxxopts::value(c.log_gradients)->default_value("false"))
    ("out", "run directory to create (must not exist or be empty)", cxxopts::value(c.out))
    ("resume", "continue the interrupted run RUN from its last checkpoint", cxxopts::value<std::string>())
    ("log-level", "trace | debug | info | warn | error", cxxopts::value<std::string>()->default_value("info"))
    ("h,help", "show this help");
  // clang-format on
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  cxxopts::ParseResult r;
  try {
    r = opts.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const cxxopts::exceptions::exception& e) {
    throw InputError(std::string("pathkernel train: ") + e.what() + " (see --help)");
  }
  if (r.count("help")) {
    std::cout << opts.help() << "\n";
    return 0;
  }
  spdlog::set_level(spdlog::level::from_str(r["log-level"].as<std::string>()));
  if (!r.unmatched().empty()) throw InputError("pathkernel train: unexpected argument '" + r.unmatched()[0] + "'");
  const std::string command_line = joined_command_line(args);
  TrainSummary s;
  if (r.count("resume")) {
    for (const char* flag : {"model", "steps", "epochs", "lr", "out", "data"}) {
      if (r.count(flag)) {
        throw InputError(std::string("--resume continues a run with the settings in its manifest; drop --") + flag);
      }
    }
    s = resume(r["resume"].as<std::string>(), command_line);
  } else {
    s = train(c, command_line);
  }
  print_summary(s);
  return 0;
}

}  // namespace pathkernel::app
