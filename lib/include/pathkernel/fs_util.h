#pragma once
/// \file fs_util.h
/// Small file helpers: crash-safe writes (temporary name, fsync, rename) and whole-file reads.

#include <nlohmann/json_fwd.hpp>

#include <filesystem>
#include <string>

namespace pathkernel {

/// Writes `bytes` to `path` atomically: to `path.tmp-PID`, then renamed over `path`, so that a
/// killed process leaves either the old file or the new one, never a part. With `durable`, the
/// file and its directory are also fsynced, which guards against power loss too (at a few ms a
/// call). Throws InputError naming the path when it cannot be written.
void atomic_write(const std::filesystem::path& path, const std::string& bytes, bool durable = true);

/// Reads a whole file. Throws InputError naming the path when it cannot be opened.
std::string read_file(const std::filesystem::path& path);

/// Parses a JSON file. Throws InputError naming the file when it is missing or not valid JSON,
/// or (with `object`) not a JSON object.
nlohmann::json read_json(const std::filesystem::path& path, bool object = true);

/// fsyncs a directory so that renames inside it are durable.
void sync_directory(const std::filesystem::path& dir);

/// Checks, before any work, that `out` can take a command's output: it must not exist, or be an
/// empty folder, or (with `force`) hold an earlier output of the same kind, recognized by the
/// file `marker` inside it (and, when `format` is given, a JSON object in it whose "format" is
/// `format`). Never a run directory or another command's output. Throws InputError.
void check_output_dir(const std::filesystem::path& out, bool force, const std::string& marker,
                      const std::string& format = "");

/// Checks before any work that `out` can be written as a file: not a folder, not an existing
/// file unless `force`, and its folder (or the nearest existing ancestor) takes new entries.
/// Throws InputError saying what is wrong.
void check_output_file(const std::filesystem::path& out, bool force);

/// A command's output folder written through a staging folder beside it: write into path(),
/// then commit() puts it in place of `out` (an earlier output there is removed only then).
/// Without commit() (an error, a kill) the staging folder is removed and `out` is untouched.
class StagedOutput {
 public:
  explicit StagedOutput(const std::filesystem::path& out);
  ~StagedOutput();
  StagedOutput(const StagedOutput&) = delete;
  StagedOutput& operator=(const StagedOutput&) = delete;
  const std::filesystem::path& path() const { return staging_; }
  void commit();

 private:
  std::filesystem::path out_, staging_;
  bool committed_ = false;
};

/// An advisory lock (flock) on a folder, through the file DIR/.lock, released when the object
/// is destroyed or the process dies (kill -9 included).
class DirLock {
 public:
  /// Tries to take the lock, exclusive or shared, without waiting; held() says whether it did.
  DirLock(const std::filesystem::path& dir, bool exclusive);
  ~DirLock();
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;
  bool held() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

}  // namespace pathkernel
