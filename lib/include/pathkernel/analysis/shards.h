#pragma once
/// \file shards.h
/// One analysis spread over several processes or machines: `analyze --shard I/N` analyzes the
/// I-th of N contiguous step ranges (their inner boundaries at stored checkpoints, so a shard
/// replays from its own first step), and `merge` joins the shards into the analysis one process
/// would have written: the per-step arrays and rows concatenated (bit for bit what one process
/// computes), T_c, the run identity, the Eq. 9 sums and the summary recomputed over the whole.

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "pathkernel/analysis/analyzer.h"

namespace pathkernel {

/// Boundaries b_0 = begin < b_1 < ... < b_n = end of n shards of the steps [begin, end); each
/// inner boundary is the stored checkpoint nearest to an even split. Throws InputError when the
/// checkpoints do not allow n non-empty shards.
std::vector<int64_t> shard_bounds(int64_t begin, int64_t end, const std::vector<int64_t>& checkpoints, int64_t n);

/// Parses --shard I/N (1 <= I <= N). Throws InputError.
std::pair<int64_t, int64_t> parse_shard(const std::string& text, const std::string& flag = "--shard");

/// An analysis directory read back: its arrays and tables as an AnalysisResult, its settings as
/// an AnalyzeConfig (out unset), and its summary. Throws InputError naming the file.
struct StoredAnalysis {
  std::filesystem::path dir;
  AnalysisResult result;
  AnalyzeConfig config;
  nlohmann::json summary;
};
StoredAnalysis read_analysis(const std::filesystem::path& dir);

/// The parts of one analysis joined, in the order given: steps and arrays concatenated,
/// f_initial from the first and f_final from the last part, the kernel split's largest error
/// and its count, the seconds summed. T_c and the identity are left to finish_analysis.
AnalysisResult join_parts(const std::vector<StoredAnalysis>& parts);

/// An analysis's partial state in `dir` (AnalyzeConfig::progress_dir): starts it (partial.json
/// holding `key`, the command's settings) or, when it is there for the same key, returns the
/// segments it finished, in step order (a segment cut off while being written is removed).
/// Another key: InputError, or with `force` the old segments are discarded.
std::vector<StoredAnalysis> open_progress(const std::filesystem::path& dir, const nlohmann::json& key, bool force);

/// Writes a finished segment (steps from its first to its last) into dir/segments.
void write_segment(const std::filesystem::path& dir, const AnalysisResult& segment, AnalyzeConfig config);

/// What merge checks of each shard, read from its summary.json.
struct ShardInfo {
  std::filesystem::path dir;
  nlohmann::json settings;
  std::string core;  ///< the OpenBLAS core it ran on ("" when not recorded)
  int64_t index = 0, count = 0, first = 0, last = 0, whole_begin = 0, whole_end = 0;
};

/// Sorts `shards` by index; throws InputError naming the file unless they are the N shards of
/// one command: same count, settings (but threads) and core, indices 1..N once each, each
/// beginning after the one before, from whole_begin to whole_end.
void check_shard_set(std::vector<ShardInfo>& shards);

struct MergeConfig {
  std::vector<std::string> shards;  ///< the shards' analysis directories, in any order
  std::string out;                  ///< required unless `walk`
  bool force = false;
  /// > 0 (explanations through the optimizer): walk_later_share of that part (1-based), no `out`.
  int64_t walk = 0;
  void validate() const;
};

/// Joins the shards. Refuses (InputError naming the file) shards of different runs, settings or
/// OpenBLAS cores, of different shard counts, a missing, repeated or overlapping shard.
/// Returns the merged analysis and its settings (with config.out = c.out).
std::pair<AnalysisResult, AnalyzeConfig> merge_shards(const MergeConfig& c);

struct ExplainResult;
struct ExplainConfig;
/// Adds up the shards of one explanation (explain --shard I/N): a_i, a_exact, times drawn and
/// self-influence summed, U and R summed per probe, f at the ends from the first and last shard,
/// the sum check recomputed, which steps drew each example from the run's step log. The same
/// refusals as merge_shards. Returns the explanation and its settings (out = c.out).
std::pair<ExplainResult, ExplainConfig> merge_explanations(const MergeConfig& c);

/// merge --walk K: what merge_explanations does for part K of shards through the optimizer (its
/// steps walked again from what the later parts hand it, Phi_end, for their share of a_i), done
/// ahead in a job of its own, so that the parts' walks run at once (on a cluster, one job each)
/// instead of one after another in the merge. Writes, in part K's folder, later_share.npy
/// ([rows, N_train], and later_share_exact.npy with --exact) and last later_share.json: the
/// SHA-256 of the Phi_end it was walked from and of its files. merge takes a stored share only
/// when the Phi_end it forms from the later parts has that digest and the files are the ones
/// named (else it walks the part itself); the merged sum check verifies the shares taken.
/// A share stored before from the same Phi_end is kept (a requeued job does nothing), and so is
/// nothing written for shards explained without the optimizer's memory (plain SGD: the parts
/// add up alone). Throws InputError for shards that do not join, or K outside 1 .. N-1.
struct LaterShare {
  std::filesystem::path file;  ///< later_share.npy
  int64_t first_step = 0, last_step = 0;
  bool walked = false;   ///< false: stored before from the same Phi_end (or `nothing`)
  bool nothing = false;  ///< the parts have no share of each other's steps: nothing written
  double seconds = 0;
};
LaterShare walk_later_share(const MergeConfig& c);

inline constexpr const char* kLaterShareFormat = "pathkernel-later-share/1";
inline constexpr const char* kLaterShareRecord = "later_share.json";

/// Joins the parts of explain --workers through the optimizer (`explain --probe-part I/N`, each
/// its rows of the probes attributed over the whole run and its stretch of the steps analyzed for
/// every probe): rows concatenated, the stretches' per-step terms concatenated and summed as one
/// process sums them, the per-example numbers (times drawn, self-influence) checked equal in
/// every part and taken from the first, the sum check recomputed. Refuses (InputError naming the
/// file) a part missing or twice, parts of different runs, settings or probes, rows or steps
/// that do not follow on, a stretch whose outputs at its first step are not the previous one's
/// at its end, or a file of the wrong type or shape.
std::pair<ExplainResult, ExplainConfig> join_probe_parts(const MergeConfig& c);

}  // namespace pathkernel
