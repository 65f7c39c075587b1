#pragma once
/// \file fs_util.h
/// Small file helpers: crash-safe writes (temporary name, fsync, rename) and whole-file reads.

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <filesystem>
#include <string>

namespace pathkernel {

/// Writes `bytes` to `path` atomically: to `path.tmp-PID`, then renamed over `path`, so that a
/// killed process leaves either the old file or the new one, never a part. With `durable`, the
/// file and its directory are also fsynced, which guards against power loss too (at a few ms a
/// call). Throws InputError naming the path when it cannot be written.
void atomic_write(const std::filesystem::path& path, const std::string& bytes, bool durable = true);

/// The most a reader takes from one file unless it names a bound of its own (64 GiB: no real
/// input is near it; the point of the bound is that nothing is allocated before it is checked).
inline constexpr int64_t kMaxFileBytes = int64_t{1} << 36;

/// Opens `path` for reading if it is a regular file (a link is followed to one), without ever
/// blocking: a FIFO, a socket, a device such as /dev/zero, or a folder is refused, and a file
/// larger than `max_bytes` too. Returns the descriptor (close-on-exec) and its size in `size`.
/// Throws InputError naming the path and the problem (`what` names the kind of file, if given).
int open_regular_file(const std::filesystem::path& path, int64_t& size, int64_t max_bytes = kMaxFileBytes,
                      const std::string& what = "");

/// Reads a whole regular file (open_regular_file's checks: no FIFO, device or folder, at most
/// `max_bytes`), exactly the bytes it held when opened. Throws InputError naming the path.
std::string read_file(const std::filesystem::path& path, int64_t max_bytes = kMaxFileBytes);

/// The first `n` bytes of a regular file (fewer when it is shorter); open_regular_file's checks
/// (at most `max_bytes`). `file_size`, when given, receives the whole file's size.
std::string read_file_head(const std::filesystem::path& path, size_t n, int64_t* file_size = nullptr,
                           int64_t max_bytes = kMaxFileBytes);

/// `file` resolved (links followed) lies inside `dir` resolved.
bool resolves_inside(const std::filesystem::path& dir, const std::filesystem::path& file);

/// Parses a JSON file. Throws InputError naming the file when it is missing or not valid JSON,
/// or (with `object`) not a JSON object.
nlohmann::json read_json(const std::filesystem::path& path, bool object = true);

/// fsyncs a directory so that renames inside it are durable.
void sync_directory(const std::filesystem::path& dir);

/// The list of what a StagedOutput wrote, kept inside the output (written by commit()).
inline constexpr const char* kWrittenRecord = ".pathkernel-written.json";
inline constexpr const char* kWrittenFormat = "pathkernel-written/1";

/// The first entry of output folder `out` (relative to it, depth first, sorted) that pathkernel
/// did not write there: not in the folder's record (kWrittenRecord), and not the working state a
/// command keeps in its own output (workers/, segments/, partial.json, merge --walk's later_share
/// files). Empty when there is none. A folder with no record has only working state of its own.
std::filesystem::path foreign_entry(const std::filesystem::path& out);

/// Checks, before any work, that `out` can take a command's output: it must not exist, or be an
/// empty folder, or (with `force`) hold an earlier output of the same kind, recognized by the
/// file `marker` inside it (and, when `format` is given, a JSON object in it whose "format" is
/// `format`) and holding nothing but what pathkernel wrote there (foreign_entry): a file the user
/// added (notes, a report made inside it) is never removed by --force. Never a run directory or
/// another command's output. Throws InputError.
void check_output_dir(const std::filesystem::path& out, bool force, const std::string& marker,
                      const std::string& format = "");

/// Checks before any work that `out` can be written as a file: not a folder, not an existing
/// file unless `force`, and its folder (or the nearest existing ancestor) takes new entries.
/// Throws InputError saying what is wrong.
void check_output_file(const std::filesystem::path& out, bool force);

/// A command's output folder written through a staging folder beside it: write into path(),
/// then commit() puts it in place of `out`. Without commit() (an error, a kill) the staging folder
/// is removed and `out` is untouched. commit() replaces only what was at `out` when the object was
/// made (the same folder, by device and inode, checked with lstat): an `out` that appeared, or was
/// replaced, while the command ran is refused (InputError), never overwritten. The earlier output
/// is first moved into a folder of a unique name that this object creates (`.NAME.replaced-XXXXXX`),
/// so no file the user owns beside `out` is touched, and removed from there once the new one is in
/// place. Nothing is followed through a symbolic link. commit() lists every entry it puts in place
/// in kWrittenRecord, so that a later --force can tell them from what the user added.
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
  bool existed_ = false;          ///< `out` was there when the object was made
  unsigned long dev_ = 0, ino_ = 0;  ///< and was this folder
  bool committed_ = false;
};

/// One writer per output: an exclusive advisory lock (flock) on `.NAME.lock` beside the output
/// path `out` (in the folder that will hold it, created if missing), so that two commands given
/// one --out cannot both write it, whether or not `out` exists yet. The lock file is opened
/// without following links and removed again when the lock is released; a process killed with
/// -9 leaves it, unlocked, and the next command takes it. Throws InputError naming `out` when
/// another process holds the lock.
class OutputLock {
 public:
  explicit OutputLock(const std::filesystem::path& out);
  ~OutputLock();
  OutputLock(const OutputLock&) = delete;
  OutputLock& operator=(const OutputLock&) = delete;
  /// The lock file's path.
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
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
