#pragma once
// The subcommands of the pathkernel executable. Each parses its own options (with its own
// --help) into a config struct and calls one library function; main() maps exceptions to exit
// statuses.

#include <string>
#include <vector>

namespace pathkernel::app {

/// argv-style arguments of a subcommand, args[0] being "pathkernel <command>".
using Args = std::vector<std::string>;

int cmd_train(const Args& args);
int cmd_replay(const Args& args);
int cmd_analyze(const Args& args);
int cmd_explain(const Args& args);
int cmd_influence(const Args& args);
int cmd_report(const Args& args);
int cmd_merge(const Args& args);
int cmd_sweep(const Args& args);

/// The full command line, for manifests.
std::string joined_command_line(const Args& args);

}  // namespace pathkernel::app
