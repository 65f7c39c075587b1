#pragma once
/// \file fs_util.h
/// Small file helpers: crash-safe writes (temporary name, fsync, rename) and whole-file reads.

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

/// fsyncs a directory so that renames inside it are durable.
void sync_directory(const std::filesystem::path& dir);

}  // namespace pathkernel
