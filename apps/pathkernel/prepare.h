#pragma once
// The first half of every subcommand: its command line parsed into its settings and everything
// checked that needs no LibTorch (flags, settings, the output folder, that the inputs exist).
// The `pathkernel` launcher runs it before LibTorch is even loaded, so that a bad flag or an
// unusable --out is refused in milliseconds; the commands (pathkernel-core) run it again and
// then do the work. Each returns false after printing --help or --version; each throws
// InputError for anything it refuses.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "commands.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/shards.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/explain/influence.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/report/report.h"
#include "pathkernel/report/sweep.h"
#include "pathkernel/train/train_config.h"

namespace pathkernel::app {

struct TrainCommand {
  TrainConfig config;
  std::string resume;        ///< --resume RUN (then config is unused)
  std::string command_line;  ///< for the manifest
  bool json = false;
};

struct ReplayCommand {
  std::string run, out;
  std::optional<int64_t> step;  ///< --step K (with --out)
  bool verify = false, force = false;
};

struct AnalyzeCommand {
  AnalyzeConfig config;
  bool json = false;
  std::shared_ptr<OutputLock> lock;  ///< --out, held from the checks to the end of the command
};

struct ExplainCommand {
  ExplainConfig config;
  bool json = false;
  std::shared_ptr<OutputLock> lock;  ///< --out, held from the checks to the end of the command
};

struct InfluenceCommand {
  InfluenceConfig config;
  bool json = false;
  std::shared_ptr<OutputLock> lock;  ///< --out, held from the checks to the end of the command
};

struct MergeCommand {
  MergeConfig config;
  bool json = false;
  std::shared_ptr<OutputLock> lock;  ///< --out, held from the checks to the end of the command
};

struct ReportCommand {
  ReportConfig config;
  bool json = false;
  std::shared_ptr<OutputLock> lock;  ///< --out, held from the checks to the end of the command
};

struct SweepCommand {
  SweepConfig config;
  bool json = false;
  std::shared_ptr<OutputLock> lock;  ///< --out, held from the checks to the end of the command
};

bool prepare_train(const Args& args, TrainCommand& cmd);
bool prepare_replay(const Args& args, ReplayCommand& cmd);
bool prepare_analyze(const Args& args, AnalyzeCommand& cmd);
bool prepare_explain(const Args& args, ExplainCommand& cmd);
bool prepare_influence(const Args& args, InfluenceCommand& cmd);
bool prepare_report(const Args& args, ReportCommand& cmd);
bool prepare_merge(const Args& args, MergeCommand& cmd);
bool prepare_sweep(const Args& args, SweepCommand& cmd);

/// Runs the prepare_* function of `command` ("train", "analyze", ...). Returns false after
/// --help or --version. Throws InputError (an unknown command included). `run_dir`, when given,
/// receives the run directory the command reads (resume, replay, analyze, explain), else "".
bool prepare(const std::string& command, const Args& args, std::string* run_dir = nullptr);

}  // namespace pathkernel::app
