// Command lines -> settings, and every check that needs no LibTorch (prepare.h). Free of
// LibTorch: the launcher links it without LibTorch, so the linker keeps it that way.
#include "prepare.h"

#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <tuple>

#include "options.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/run_dir.h"

namespace pathkernel::app {
namespace fs = std::filesystem;

std::string joined_command_line(const Args& args) {
  std::string s;
  for (const auto& a : args) s += (s.empty() ? "" : " ") + a;
  return s;
}

namespace {

/// An input folder a command reads (a run, an analysis): it must exist as a folder. What is in
/// it is checked by the readers (they trust nothing they can verify).
void check_input_dir(const std::string& dir, const std::string& what) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw InputError(dir + ": no such " + what);
}

void check_input_file(const std::string& file, const std::string& what) {
  std::error_code ec;
  if (!file.empty() && !fs::is_regular_file(file, ec)) throw InputError(file + ": no such " + what);
}

/// --data: a synthetic set or an existing folder (its files are checked when they are read).
void check_data(const TrainConfig& c) {
  if (!is_synthetic(c.data_dir)) check_input_dir(c.data_dir, "data folder (--data)");
}

/// --out for one writer: `check` (the command's output checks) runs first, so that a refusal
/// creates nothing; then the output's lock is taken and `check` runs again under it, so that an
/// output another command finished meanwhile is seen. Throws InputError.
template <typename Check>
std::shared_ptr<OutputLock> claim_output(const std::string& out, Check check) {
  check();
  auto lock = std::make_shared<OutputLock>(out);
  check();
  return lock;
}

}  // namespace

bool prepare_train(const Args& args, TrainCommand& cmd) {
  TrainConfig& c = cmd.config;
  cxxopts::Options opts("pathkernel train", "Train a model with logged minibatch SGD into a run directory.");
  add_train_options(opts, c, /*with_lr=*/true);
  opts.add_options()("out", "run directory to create (must not exist or be empty)", cxxopts::value(c.out))(
      "resume", "continue the interrupted run RUN from its last checkpoint", cxxopts::value(cmd.resume));
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return false;
  read_betas(r, c);
  cmd.json = json_output(r);
  cmd.command_line = joined_command_line(args);
  if (r.count("resume")) {
    for (const auto& kv : r.arguments()) {
      if (kv.key() != "resume" && kv.key() != "log-level" && kv.key() != "json") {
        throw InputError("--resume continues a run with the settings in its manifest; drop --" + kv.key());
      }
    }
    check_input_dir(cmd.resume, "run directory (--resume)");
    return true;
  }
  check_thread_flag(c.threads);  // this machine's bound, named as such, before the manifest's (validate)
  c.validate();
  check_new_run_dir(c.out);  // before any work
  check_data(c);
  return true;
}

bool prepare_replay(const Args& args, ReplayCommand& cmd) {
  cxxopts::Options opts("pathkernel replay",
                        "Rebuild the weights of a run at any step from its checkpoints and step log.");
  // clang-format off
  opts.add_options()
    ("run", "run directory", cxxopts::value(cmd.run))
    ("verify", "replay between every pair of checkpoints and compare bit for bit")
    ("step", "write the weights at this step", cxxopts::value<int64_t>())
    ("out", "file for --step (a state_dict .pt for torch.load)", cxxopts::value(cmd.out))
    ("force", "overwrite --out if it exists");
  // clang-format on
  opts.parse_positional({"run"});
  opts.positional_help("RUN");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return false;
  cmd.verify = r.count("verify") > 0;
  cmd.force = r.count("force") > 0;
  if (r.count("step")) cmd.step = r["step"].as<int64_t>();
  if (cmd.run.empty()) throw InputError("pathkernel replay: give the run directory (see --help)");
  if (!cmd.verify && !cmd.step) throw InputError("pathkernel replay: give --verify or --step K --out FILE");
  if (cmd.step && cmd.out.empty()) throw InputError("pathkernel replay: --step needs --out FILE");
  if (!cmd.out.empty()) {  // before any work
    if (resolves_inside(cmd.run, cmd.out)) {
      throw InputError(cmd.out + ": is inside the run directory " + cmd.run +
                       ", which replay reads and never writes; give a path outside it");
    }
    check_output_file(cmd.out, cmd.force);
    if (cmd.force && fs::is_regular_file(cmd.out) && read_file_head(cmd.out, 4) != std::string("PK\x03\x04", 4)) {
      throw InputError(cmd.out + ": --force replaces only an earlier weights file (a PyTorch archive, as replay "
                       "writes), and this file is something else");
    }
  }
  check_input_dir(cmd.run, "run directory");
  return true;
}

bool prepare_analyze(const Args& args, AnalyzeCommand& cmd) {
  AnalyzeConfig& c = cmd.config;
  std::string steps, old_steps;
  cxxopts::Options opts("pathkernel analyze",
                        "Split every step of a run into kernel term K, update term U and Taylor residual R.");
  add_analysis_options(opts, c);
  opts.add_options()("run", "run directory", cxxopts::value(c.run))(
      "out", "analysis directory to create", cxxopts::value(c.out))(
      "range", "A:B, the steps k with A <= k < B (default: all)", cxxopts::value(steps))(
      "steps", "old name of --range (train's --steps is a count; this one was a range)", cxxopts::value(old_steps))(
      "force", "write into a non-empty --out")(
      "shard", "I/N: only the I-th of N contiguous parts of the range, split at stored checkpoints (join the parts "
      "with pathkernel merge)", cxxopts::value<std::string>())(
      "shard-even", "with --shard: split the range evenly, not at stored checkpoints (each shard replays from "
      "the checkpoint before its first step)")(
      "workers", "N: analyze the range as N shards in N processes at once and join them (bit for bit the "
      "analysis of one; each with --threads threads)", cxxopts::value(c.workers)->default_value("1"))(
      "segment-every", "keep finished work (to continue after a kill) at a stored checkpoint every S seconds",
      cxxopts::value(c.segment_seconds)->default_value("5"));
  opts.parse_positional({"run"});
  opts.positional_help("RUN");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return false;
  c.force = r.count("force") > 0;
  cmd.json = json_output(r);
  if (r.count("shard")) std::tie(c.shard_index, c.shard_count) = parse_shard(r["shard"].as<std::string>());
  c.shard_even = r.count("shard-even") > 0;
  if (!old_steps.empty()) {
    if (!steps.empty()) throw InputError("give --range only (--steps is its old name)");
    spdlog::warn("analyze --steps is now --range (the old name works for one more release)");
    steps = old_steps;
  }
  if (!steps.empty()) {
    const size_t colon = steps.find(':');
    try {
      if (colon == std::string::npos) throw std::invalid_argument("");
      c.step_begin = colon == 0 ? 0 : std::stoll(steps.substr(0, colon));
      c.step_end = colon + 1 == steps.size() ? -1 : std::stoll(steps.substr(colon + 1));
    } catch (const std::exception&) {
      throw InputError("--range must be A:B (either side may be empty), got '" + steps + "'");
    }
  }
  c.progress_dir = c.out;  // resumable: an interrupted analysis continues from what it finished
  c.validate();
  // before any work; an interrupted analysis's folder is continued (analyze checks its settings)
  auto check_out = [&] {
    if (!is_partial_analysis(c.out)) {
      check_output_dir(c.out, c.force, "summary.json", kAnalysisFormat);
    } else if (fs::is_symlink(c.out)) {
      throw InputError(c.out + ": is a symbolic link; give a real folder");
    }
  };
  check_out();
  check_input_dir(c.run, "run directory");
  check_input_file(c.probe_indices_file, "probe indices file (--probe-indices)");
  cmd.lock = claim_output(c.out, check_out);
  return true;
}

bool prepare_explain(const Args& args, ExplainCommand& cmd) {
  ExplainConfig& c = cmd.config;
  cxxopts::Options opts("pathkernel explain",
                        "The kernel-machine view: which training examples pushed a prediction (a_i = summed K).");
  // clang-format off
  opts.add_options()
    ("run", "run directory", cxxopts::value(c.run))
    ("out", "explanation directory to create", cxxopts::value(c.out))
    ("probe", "probe index in the split (repeatable, or I,J,...)", cxxopts::value(c.probe_indices))
    ("probes", "or N probes evenly spaced over the split (they share one pass over the run)",
     cxxopts::value(c.probes)->default_value("0"))
    ("split", "test | train", cxxopts::value(c.split)->default_value("test"))
    ("logit", "the logit to explain (default: each probe's final prediction)", cxxopts::value(c.output))
    ("output", "old name of --logit (next to analyze's --outputs it read as the same flag)", cxxopts::value<int64_t>())
    ("top", "proponents and opponents listed and shown per probe", cxxopts::value(c.top)->default_value("16"))
    ("exact", "Q: also attribute with the exact path kernel (Q-node quadrature): no residual left",
     cxxopts::value(c.exact_nodes))
    ("self-influence", "rank training examples by TracIn self-influence (finds mislabeled ones)")
    ("kernel-route", "auto | factorized | explicit | torchscript (a recorded run's own model, by autograd)",
     cxxopts::value(c.kernel_route)->default_value("auto"))
    ("class-names", "file with one class name per line for the grids (default: Fashion-MNIST's names for its data)",
     cxxopts::value(c.class_names_file))
    ("grids", "PNG grids for at most this many probes", cxxopts::value(c.grids)->default_value("16"))
    ("shard", "I/N: attribute only the I-th of N parts of the run (add the parts up with pathkernel merge; through "
     "an optimizer with memory, merge also walks each part again for the later parts' share)",
     cxxopts::value<std::string>())
    ("shard-even", "with --shard: split the steps evenly, not at stored checkpoints (each shard replays from the "
     "checkpoint before its first step)")
    ("workers", "N: N processes at once, joined (plain SGD: stretches of steps; through the optimizer: some of the "
     "probes each, and a stretch of the steps analyzed for all of them)", cxxopts::value(c.workers)->default_value("1"))
    ("probe-part", "I/N: (explain --workers sets it) the I-th part of the probes over the whole run, and the I-th "
     "stretch of steps analyzed for all of them", cxxopts::value<std::string>())
    ("csv", "attributions.csv holds: top (each probe's --top proponents and opponents) | all (every training "
     "example; attributions.npy always holds them all)", cxxopts::value(c.csv)->default_value("top"))
    ("project", "D: the per-example kernels through a seeded random projection of each layer's gradients to about "
     "D dims (for models too big for exact ones; the sum check then measures its error)",
     cxxopts::value(c.project)->default_value("0"))
    ("project-seed", "the projection's seed", cxxopts::value(c.project_seed)->default_value("0"))
    ("threads", "LibTorch and OpenBLAS threads (pinned, recorded in the summary)",
     cxxopts::value(c.threads)->default_value("1"))
    ("force", "write into a non-empty --out");
  // clang-format on
  opts.parse_positional({"run"});
  opts.positional_help("RUN");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return false;
  if (r.count("output")) {
    if (r.count("logit")) throw InputError("give --logit only (--output is its old name)");
    spdlog::warn("explain --output is now --logit (the old name works for one more release)");
    c.output = r["output"].as<int64_t>();
  }
  if ((r.count("logit") || r.count("output")) && c.output < 0) {
    throw InputError("--logit must be a logit index, 0 or more (leave it out to explain each probe's prediction), got " +
                     std::to_string(c.output));
  }
  c.self_influence = r.count("self-influence") > 0;
  c.force = r.count("force") > 0;
  if (r.count("shard")) std::tie(c.shard_index, c.shard_count) = parse_shard(r["shard"].as<std::string>());
  c.shard_even = r.count("shard-even") > 0;
  if (r.count("probe-part")) std::tie(c.part_index, c.part_count) = parse_shard(r["probe-part"].as<std::string>(), "--probe-part");
  cmd.json = json_output(r);
  check_output_dir(c.out, c.force, "summary.json", kExplainFormat);  // before any work
  c.validate();
  check_input_dir(c.run, "run directory");
  cmd.lock = claim_output(c.out, [&] { check_output_dir(c.out, c.force, "summary.json", kExplainFormat); });
  return true;
}

bool prepare_influence(const Args& args, InfluenceCommand& cmd) {
  InfluenceConfig& c = cmd.config;
  cxxopts::Options opts("pathkernel influence",
                        "TracInCP (as Captum computes it): sum over checkpoints of lr_t <grad l(test), grad l(train_i)>, "
                        "and each training example's self-influence.");
  // clang-format off
  opts.add_options()
    ("run", "run directory", cxxopts::value(c.run))
    ("out", "influence directory to create", cxxopts::value(c.out))
    ("checkpoints", "all (every stored checkpoint) | S1,S2,... (steps; others are replayed)",
     cxxopts::value(c.checkpoints)->default_value("all"))
    ("train-examples", "the first N training examples (0: all)", cxxopts::value(c.train_examples)->default_value("0"))
    ("probes", "N test examples evenly spaced over the split", cxxopts::value(c.probes)->default_value("64"))
    ("balanced", "with --probes N: N/C of each class", cxxopts::value(c.balanced)->default_value("false"))
    ("probe-indices", "file of probe indices, one per line (instead of --probes)", cxxopts::value(c.probe_indices_file))
    ("split", "test | train: where the probes come from", cxxopts::value(c.split)->default_value("test"))
    ("chunk", "training examples per product (bounds the memory)", cxxopts::value(c.chunk)->default_value("1000"))
    ("threads", "LibTorch and OpenBLAS threads", cxxopts::value(c.threads)->default_value("1"))
    ("force", "write into a non-empty --out");
  // clang-format on
  opts.parse_positional({"run"});
  opts.positional_help("RUN");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return false;
  c.force = r.count("force") > 0;
  cmd.json = json_output(r);
  c.validate();
  check_output_dir(c.out, c.force, "summary.json", kInfluenceFormat);  // before any work
  check_input_dir(c.run, "run directory");
  check_input_file(c.probe_indices_file, "probe indices file (--probe-indices)");
  cmd.lock = claim_output(c.out, [&] { check_output_dir(c.out, c.force, "summary.json", kInfluenceFormat); });
  return true;
}

bool prepare_merge(const Args& args, MergeCommand& cmd) {
  MergeConfig& c = cmd.config;
  cxxopts::Options opts("pathkernel merge",
                        "Join the shards of one analysis (analyze --shard I/N) or explanation (explain --shard I/N, or "
                        "the parts of explain --probe-part I/N) into what one process writes.");
  opts.add_options()("shards", "the shards' analysis directories", cxxopts::value(c.shards))(
      "out", "analysis directory to create", cxxopts::value(c.out))("force", "write into a non-empty --out")(
      "walk", "K: explanation shards through an optimizer with memory: only walk part K again for the later "
      "parts' share and store it in part K's folder (later_share.npy), for the merge after (no --out); one job "
      "per part 1 .. N-1 runs the walks at once", cxxopts::value(c.walk));
  opts.parse_positional({"shards"});
  opts.positional_help("SHARD...");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return false;
  c.force = r.count("force") > 0;
  cmd.json = json_output(r);
  c.validate();
  for (const auto& s : c.shards) check_input_dir(s, "shard (analysis or explanation directory)");
  if (c.walk > 0) return true;  // writes into a shard's folder (walk_later_share), no output of its own
  // before any work; the shards' kind (analysis or explanation) is the output's
  std::string format = kAnalysisFormat;
  try {
    format = read_json(fs::path(c.shards.front()) / "summary.json").value("format", format);
  } catch (const InputError&) {
    // merge itself names the shard that cannot be read
  }
  cmd.lock = claim_output(c.out, [&] { check_output_dir(c.out, c.force, "summary.json", format); });
  return true;
}

bool prepare_report(const Args& args, ReportCommand& cmd) {
  ReportConfig& c = cmd.config;
  cxxopts::Options opts("pathkernel report", "Plots (gnuplot PNGs) and report.html of an analysis directory.");
  // clang-format off
  opts.add_options()
    ("analysis", "analysis directory (from pathkernel analyze)", cxxopts::value(c.analysis))
    ("out", "report directory to create", cxxopts::value(c.out))
    ("curves", "probes whose cumulative sums are plotted", cxxopts::value(c.curves)->default_value("4"))
    ("class-names", "file with one class name per line (default: Fashion-MNIST's names for its data)",
     cxxopts::value(c.class_names_file))
    ("force", "write into a non-empty --out");
  // clang-format on
  opts.parse_positional({"analysis"});
  opts.positional_help("ANALYSIS");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return false;
  c.force = r.count("force") > 0;
  cmd.json = json_output(r);
  c.validate();
  check_output_dir(c.out, c.force, "report.html");  // before anything is read
  check_input_dir(c.analysis, "analysis directory");
  cmd.lock = claim_output(c.out, [&] { check_output_dir(c.out, c.force, "report.html"); });
  return true;
}

bool prepare_sweep(const Args& args, SweepCommand& cmd) {
  SweepConfig& c = cmd.config;
  cxxopts::Options opts("pathkernel sweep",
                        "Train and analyze the same model, data and batches at each learning rate.");
  add_train_options(opts, c.train, /*with_lr=*/false);
  add_analysis_options(opts, c.analysis, /*with_threads=*/false);  // train's --threads serves both
  opts.add_options()("lr", "learning rates, e.g. 1e-4,1e-3,1e-2,1e-1,0.5,1", cxxopts::value(c.lrs))(
      "out", "sweep directory (an interrupted sweep is continued there)", cxxopts::value(c.out));
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return false;
  read_betas(r, c.train);
  c.analysis.threads = c.train.threads;
  cmd.json = json_output(r);
  c.command_line = joined_command_line(args);
  c.validate();  // the --out folder included
  check_data(c.train);
  cmd.lock = claim_output(c.out, [&] { c.validate(); });
  return true;
}

namespace {

/// The run a prepared command reads.
std::string run_of(const TrainCommand& c) { return c.resume; }
std::string run_of(const ReplayCommand& c) { return c.run; }
std::string run_of(const AnalyzeCommand& c) { return c.config.run; }
std::string run_of(const ExplainCommand& c) { return c.config.run; }
std::string run_of(const InfluenceCommand& c) { return c.config.run; }
std::string run_of(const ReportCommand&) { return ""; }
std::string run_of(const MergeCommand&) { return ""; }
std::string run_of(const SweepCommand&) { return ""; }

template <typename Command>
bool prepare_one(bool (*f)(const Args&, Command&), const Args& args, std::string* run_dir) {
  Command cmd;
  const bool go = f(args, cmd);
  if (run_dir) *run_dir = go ? run_of(cmd) : "";
  return go;
}

}  // namespace

bool prepare(const std::string& command, const Args& args, std::string* run_dir) {
  if (command == "train") return prepare_one(prepare_train, args, run_dir);
  if (command == "replay") return prepare_one(prepare_replay, args, run_dir);
  if (command == "analyze") return prepare_one(prepare_analyze, args, run_dir);
  if (command == "explain") return prepare_one(prepare_explain, args, run_dir);
  if (command == "influence") return prepare_one(prepare_influence, args, run_dir);
  if (command == "report") return prepare_one(prepare_report, args, run_dir);
  if (command == "merge") return prepare_one(prepare_merge, args, run_dir);
  if (command == "sweep") return prepare_one(prepare_sweep, args, run_dir);
  throw InputError("unknown command '" + command + "'");
}

}  // namespace pathkernel::app
