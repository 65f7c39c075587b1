#include "invocation.h"

#include <algorithm>
#include <iostream>
#include <vector>

#include "pathkernel/io/version.h"

namespace pathkernel::app {
namespace {

constexpr const char* kUsage =
    "usage: pathkernel <command> [options]\n"
    "\n"
    "commands:\n"
    "  train      train a model with logged SGD into a run directory (or --resume one)\n"
    "  replay     rebuild the weights at any step of a run; --verify checks every checkpoint\n"
    "  analyze    split every step into kernel term, update term and Taylor residual (docs/spec.md)\n"
    "  explain    which training examples pushed a prediction (the kernel-machine view)\n"
    "  influence  TracInCP from the checkpoints (Captum's matrix and self-influence), fast\n"
    "  report     plots and report.html of an analysis\n"
    "  merge      join the shards of an analysis (analyze --shard I/N) into one\n"
    "  sweep      train and analyze at several learning rates (how the residual grows with the step)\n"
    "  help       `pathkernel help <command>`: a command's options\n"
    "\n"
    "`pathkernel <command> --help` (or `pathkernel help <command>`) lists a command's options;\n"
    "`--version` works everywhere.\n"
    "exit status: 0 ok, 1 internal error, 2 bad input, 3 training diverged, 4 identity/sum check fails,\n"
    "             5 replay mismatch\n";

const std::vector<std::string> kCommands = {"train", "replay", "analyze", "explain", "influence", "report", "sweep", "merge"};

}  // namespace

Invocation read_invocation(int argc, char** argv) {
  Invocation inv;
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cout << kUsage;
    inv.status = argc < 2 ? 2 : 0;
    return inv;
  }
  if (std::string(argv[1]) == "--version") {
    std::cout << "pathkernel " << kVersion << " (" << kGitRevision << ")\n";
    inv.status = 0;
    return inv;
  }
  inv.name = argv[1];
  std::vector<std::string> rest(argv + 2, argv + argc);
  if (inv.name == "help") {  // pathkernel help CMD == pathkernel CMD --help
    if (argc < 3) {
      std::cout << kUsage;
      inv.status = 0;
      return inv;
    }
    inv.name = argv[2];
    rest = {"--help"};
  }
  if (std::find(kCommands.begin(), kCommands.end(), inv.name) == kCommands.end()) {
    std::cerr << "pathkernel: unknown command '" << inv.name << "'\n\n" << kUsage;
    inv.status = 2;
    return inv;
  }
  inv.args = {"pathkernel " + inv.name};
  inv.args.insert(inv.args.end(), rest.begin(), rest.end());
  return inv;
}

}  // namespace pathkernel::app
