#pragma once
/// \file run_dir.h
/// The layout of a run directory (docs/run-format.md) and the readers the analyzer uses.
///
///   RUN/manifest.json                     settings, versions, data hashes (written first)
///   RUN/steps.jsonl                       one JSON object per step, appended as training goes
///   RUN/gradients.bin                     with --log-gradients: float32 [steps, P], appended
///   RUN/checkpoints/step_XXXXXXXX.pt      weights w_k (a state_dict for torch.load)
///   RUN/checkpoints/step_XXXXXXXX.state.pt  momentum buffers and sampler state before step k
///   RUN/summary.json                      written at the end (or on divergence)
///   RUN/COMPLETE                          marker: the run finished all its steps

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace pathkernel {

/// Format tag of manifest.json.
inline constexpr const char* kRunFormat = "pathkernel-run/1";

class RunDir {
 public:
  explicit RunDir(std::filesystem::path root) : root_(std::move(root)) {}
  const std::filesystem::path& root() const { return root_; }
  std::filesystem::path manifest() const { return root_ / "manifest.json"; }
  std::filesystem::path steps_log() const { return root_ / "steps.jsonl"; }
  std::filesystem::path gradients() const { return root_ / "gradients.bin"; }
  std::filesystem::path checkpoints_dir() const { return root_ / "checkpoints"; }
  std::filesystem::path checkpoint(int64_t step) const;
  /// The run's copy of a `file:` learning-rate schedule.
  std::filesystem::path schedule_copy() const { return root_ / "lr_schedule.txt"; }
  std::filesystem::path state(int64_t step) const;
  /// CRC-32 digests of the step's two checkpoint files, written after both (step_X.crc32).
  std::filesystem::path digest(int64_t step) const;
  /// Writes the digest file of step `step` from the files as they are on disk; `extra` (whole
  /// lines, such as the gradient log's "gradients BYTES CRC") is appended.
  void write_digest(int64_t step, const std::string& extra = "") const;
  /// Checks the step's checkpoint files against their digest file; without one (runs made
  /// before digests, or a kill just before it was written) nothing is checked. Throws
  /// InputError naming the file that does not match.
  void check_digest(int64_t step) const;
  std::filesystem::path summary() const { return root_ / "summary.json"; }
  std::filesystem::path complete_marker() const { return root_ / "COMPLETE"; }

  /// Reads manifest.json. Throws InputError when it is missing, not JSON, or another format.
  nlohmann::json read_manifest() const;
  /// Steps that have both a weights file and a state file, ascending.
  std::vector<int64_t> checkpoint_steps() const;
  bool complete() const;

 private:
  std::filesystem::path root_;
};

/// True for a folder a new run may be created in: absent, empty, or left by a run killed during
/// set-up before its manifest (only the lock file and an empty checkpoints/ folder).
bool fresh_run_dir(const std::filesystem::path& root);
/// Throws InputError unless `root` is such a folder and can be created (train's --out).
void check_new_run_dir(const std::filesystem::path& root);

/// Reads steps.jsonl. A partial last line (a crash mid-write) is dropped; any other line that is
/// not JSON, or steps that are not 0, 1, 2, ... in order, throw InputError naming the line.
std::vector<nlohmann::json> read_step_log(const std::filesystem::path& path);

/// Checks each record of a step log against the run: a finite positive `lr`, a `batch` of 1 to
/// `batch` integer indices in 0..n-1, a numeric `loss`. Throws InputError naming `file` and the
/// line.
void check_step_records(const std::vector<nlohmann::json>& log, int64_t n, int64_t batch, const std::string& file);

/// Keeps only the records of steps < `step` in steps.jsonl (atomic rewrite).
void truncate_step_log(const std::filesystem::path& path, int64_t step);

}  // namespace pathkernel
