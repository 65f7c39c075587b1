// pathkernel train: options -> TrainConfig -> pathkernel::train / resume.
#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "options.h"
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
  add_train_options(opts, c, /*with_lr=*/true);
  opts.add_options()("out", "run directory to create (must not exist or be empty)", cxxopts::value(c.out))(
      "resume", "continue the interrupted run RUN from its last checkpoint", cxxopts::value<std::string>());
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return 0;
  read_betas(r, c);
  const std::string command_line = joined_command_line(args);
  TrainSummary s;
  if (r.count("resume")) {
    for (const auto& kv : r.arguments()) {
      if (kv.key() != "resume" && kv.key() != "log-level" && kv.key() != "json") {
        throw InputError("--resume continues a run with the settings in its manifest; drop --" + kv.key());
      }
    }
    s = resume(r["resume"].as<std::string>(), command_line);
  } else {
    s = train(c, command_line);
  }
  if (json_output(r)) {
    print_json({{"run", s.run.string()}, {"status", s.status}, {"steps_completed", s.steps_completed},
                {"total_steps", s.total_steps}, {"final_loss", s.final_loss}, {"test_accuracy", s.test_accuracy},
                {"seconds", s.seconds}});
  } else {
    print_summary(s);
  }
  return 0;
}

}  // namespace pathkernel::app
