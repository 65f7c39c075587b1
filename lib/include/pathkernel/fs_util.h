#pragma once
/// \file fs_util.h
/// Small file helpers: crash-safe writes (temporary name, fsync, rename) and whole-file reads.

#include <filesystem>
#include <string>

namespace pathkernel {

/// Writes `bytes` to `path` atomically: to `path.tmp-PID`, flushed with fsync, then renamed over
/// `path`, and the directory is synced. A crash leaves either the old file or the new one.
/// Throws InputError naming the path when the directory is not writable.
void atomic_write(const std::filesystem::path& path, const std::string& bytes);

/// Reads a whole file. Throws InputError naming the path when it cannot be opened.
std::string read_file(const std::filesystem::path& path);

/// fsyncs a directory so that renames inside it are durable.
void sync_directory(const std::filesystem::path& dir);

}  // namespace pathkernel
