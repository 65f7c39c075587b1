#pragma once
/// \file zip_archive.h
/// A bounded reader of the zip archives that `torch.save` and `torch::pickle_save` write: stored
/// (uncompressed) records under one top-level folder (`archive/data.pkl`, `archive/data/0`, ...).
/// Every offset and length is checked against the bytes before use, and each record's CRC-32 is
/// checked when it is read. Nothing here allocates more than the archive's own size.

#include <cstdint>
#include <map>
#include <string>
#include <string_view>

namespace pathkernel {

/// A zip archive held in memory (the caller keeps `bytes` alive while the archive is used).
class ZipArchive {
 public:
  /// Parses the central directory of `bytes`. `name` is used in messages (the file's path).
  /// Throws InputError naming the file for anything that is not such an archive: no end record,
  /// a directory or local header outside the file, compressed or encrypted records, records
  /// overlapping the directory, names outside one common top-level folder, duplicate names.
  /// With `allow_deflate` (TorchScript archives deflate their code records), deflated records are
  /// accepted: verify_all() inflates and checks them, read() refuses them.
  ZipArchive(std::string_view bytes, std::string name, bool allow_deflate = false);

  /// True when the archive holds `record` (a name below the top-level folder, e.g. "data.pkl").
  bool has(const std::string& record) const;

  /// The bytes of `record`, after its CRC-32 was checked. Throws InputError naming the file and
  /// the record when it is missing or damaged.
  std::string_view read(const std::string& record) const;

  /// Reads every record (inflating deflated ones in 64 KiB pieces, never past its declared size),
  /// checking each CRC-32 and size. Throws InputError naming the first damaged one.
  void verify_all() const;

  /// The size in bytes of `record`, or -1 when it is missing (no CRC check).
  int64_t size_of(const std::string& record) const;

  /// The archive's top-level folder (without the trailing slash).
  const std::string& prefix() const { return prefix_; }

 private:
  struct Entry {
    uint64_t offset = 0;  ///< of the record's data in bytes_
    uint64_t size = 0;
    uint32_t crc = 0;
    uint64_t stored = 0;    ///< bytes in the archive (size unless deflated)
    bool deflated = false;
  };
  void verify_inflated(const std::string& record, const Entry& e) const;
  [[noreturn]] void fail(const std::string& what) const;
  void parse_directory(uint64_t dir_offset, uint64_t dir_size, uint64_t entries);
  uint64_t data_offset(uint64_t local_header, uint64_t size) const;

  std::string_view bytes_;
  std::string name_;
  std::string prefix_;
  bool allow_deflate_ = false;
  std::map<std::string, Entry> entries_;  ///< by name below the prefix
};

}  // namespace pathkernel
