#pragma once
// The top level of a command line, shared by the launcher and the commands: usage, --version,
// `help CMD`, and which command runs with which arguments.

#include <string>

#include "commands.h"

namespace pathkernel::app {

/// The command a command line names and its arguments (args[0] is "pathkernel NAME"; `help
/// CMD` becomes CMD --help), or, when the line is answered here (usage, --version, an unknown
/// command: printed already), the exit status to return (status >= 0).
struct Invocation {
  std::string name;
  Args args;
  int status = -1;
};

Invocation read_invocation(int argc, char** argv);

}  // namespace pathkernel::app
