#pragma once
// Option tables shared by the subcommands (train and sweep share the training flags, analyze
// and sweep the analysis flags), and the parse/help boilerplate.

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <string>

#include "commands.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/train/train_config.h"

namespace pathkernel::app {

/// The training flags except --out, --resume and (when !with_lr) --lr, bound to `c`.
void add_train_options(cxxopts::Options& opts, TrainConfig& c, bool with_lr);
/// Reads --betas B1,B2 into c.beta1, c.beta2. Throws InputError naming --betas.
void read_betas(const cxxopts::ParseResult& r, TrainConfig& c);
/// The analysis flags that do not name files or steps (probes, outputs, every, second order,
/// exact, route, T_c), bound to `c`.
void add_analysis_options(cxxopts::Options& opts, AnalyzeConfig& c, bool with_threads = true);
/// Adds --log-level and --help, parses, and sets the log level. Returns false after printing the
/// help (the caller returns 0). Throws InputError on a parse error.
bool parse_options(cxxopts::Options& opts, const Args& args, cxxopts::ParseResult& result);

/// True when the command was given --json: its summary goes to stdout as one JSON document
/// (for scripts) instead of the table for people. Progress and errors stay on stderr.
bool json_output(const cxxopts::ParseResult& result);

/// Prints `doc` as the --json summary (one line).
void print_json(const nlohmann::json& doc);

/// Prints the summary.json a command wrote into `out`, with "out" added, as the --json summary.
void print_summary_json(const std::string& out);

}  // namespace pathkernel::app
