#pragma once
// The top-level usage text, shared by the launcher and the commands.

namespace pathkernel::app {

inline constexpr const char* kUsage =
    "usage: pathkernel <command> [options]\n"
    "\n"
    "commands:\n"
    "  train      train a model with logged SGD into a run directory (or --resume one)\n"
    "  replay     rebuild the weights at any step of a run; --verify checks every checkpoint\n"
    "  analyze    split every step into kernel term, update term and Taylor residual (docs/spec.md)\n"
    "  explain    which training examples pushed a prediction (the kernel-machine view)\n"
    "  influence  TracInCP from the checkpoints (Captum's matrix and self-influence), fast\n"
    "  report     plots and report.html of an analysis\n"
    "  sweep      train and analyze at several learning rates (how the residual grows with the step)\n"
    "  help       `pathkernel help <command>`: a command's options\n"
    "\n"
    "`pathkernel <command> --help` (or `pathkernel help <command>`) lists a command's options;\n"
    "`--version` works everywhere.\n"
    "exit status: 0 ok, 1 internal error, 2 bad input, 3 training diverged, 4 identity/sum check fails,\n"
    "             5 replay mismatch\n";

}  // namespace pathkernel::app
