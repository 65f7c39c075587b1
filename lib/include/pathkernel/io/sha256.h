#pragma once
/// \file sha256.h
/// SHA-256 (FIPS 180-4), used to fingerprint data files in run manifests.

#include <cstdint>
#include <filesystem>
#include <string>

namespace pathkernel {

/// Incremental SHA-256.
class Sha256 {
 public:
  Sha256();
  /// Feeds `n` bytes.
  void update(const void* data, size_t n);
  /// Finishes and returns the digest as 64 lowercase hex characters. Call once.
  std::string hex_digest();

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

/// SHA-256 of a string, as hex.
std::string sha256_hex(const std::string& bytes);

/// SHA-256 of a file's bytes, as hex. Throws InputError naming the file if it cannot be read.
std::string sha256_file(const std::filesystem::path& path);

}  // namespace pathkernel
