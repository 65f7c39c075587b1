// pathkernel train: prepare_train -> pathkernel::train / resume.
#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/train/trainer.h"
#include "prepare.h"

namespace pathkernel::app {
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
  TrainCommand cmd;
  if (!prepare_train(args, cmd)) return 0;
  const TrainSummary s = cmd.resume.empty() ? train(cmd.config, cmd.command_line) : resume(cmd.resume, cmd.command_line);
  if (cmd.json) {
    print_json({{"run", s.run.string()}, {"status", s.status}, {"steps_completed", s.steps_completed},
                {"total_steps", s.total_steps}, {"final_loss", s.final_loss}, {"test_accuracy", s.test_accuracy},
                {"seconds", s.seconds}});
  } else {
    print_summary(s);
  }
  return 0;
}

}  // namespace pathkernel::app
