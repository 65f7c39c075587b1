#include "pathkernel/io/zip_archive.h"

#include <zlib.h>

#include <algorithm>

#include "pathkernel/io/errors.h"

namespace pathkernel {
namespace {

constexpr uint32_t kEndSig = 0x06054b50, kEnd64Sig = 0x06064b50, kLocator64Sig = 0x07064b50;
constexpr uint32_t kCentralSig = 0x02014b50, kLocalSig = 0x04034b50;
constexpr uint64_t kEndSize = 22, kCentralSize = 46, kLocalSize = 30;

uint64_t le(std::string_view b, uint64_t at, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[at + i]);
  return v;
}

bool fits(uint64_t offset, uint64_t length, uint64_t size) { return offset <= size && length <= size - offset; }

}  // namespace

void ZipArchive::fail(const std::string& what) const {
  throw InputError(name_ + (allow_deflate_ ? ": not a readable TorchScript archive (" : ": not a readable checkpoint archive (") +
                   what + ")");
}

ZipArchive::ZipArchive(std::string_view bytes, std::string name, bool allow_deflate)
    : bytes_(bytes), name_(std::move(name)), allow_deflate_(allow_deflate) {
  const uint64_t n = bytes_.size();
  if (n < kEndSize) fail("too short for a zip archive");
  // The end record is within the last 22 + 65535 bytes (its comment is at most 65535 long).
  uint64_t end = n - kEndSize;
  const uint64_t lowest = end > 65535 ? end - 65535 : 0;
  while (le(bytes_, end, 4) != kEndSig) {
    if (end == lowest) fail("no end-of-directory record");
    --end;
  }
  uint64_t entries = le(bytes_, end + 10, 2), dir_size = le(bytes_, end + 12, 4), dir_offset = le(bytes_, end + 16, 4);
  if (le(bytes_, end + 4, 2) != 0 || le(bytes_, end + 6, 2) != 0) fail("archives split over several disks");
  if (end >= 20 && le(bytes_, end - 20, 4) == kLocator64Sig) {
    const uint64_t at = le(bytes_, end - 12, 8);
    if (!fits(at, 56, end - 20) || le(bytes_, at, 4) != kEnd64Sig) fail("zip64 end record outside the file");
    entries = le(bytes_, at + 32, 8);
    dir_size = le(bytes_, at + 40, 8);
    dir_offset = le(bytes_, at + 48, 8);
  }
  if (!fits(dir_offset, dir_size, end)) fail("central directory outside the file");
  if (entries > dir_size / kCentralSize) fail("more entries than the central directory can hold");
  parse_directory(dir_offset, dir_size, entries);
}

void ZipArchive::parse_directory(uint64_t dir_offset, uint64_t dir_size, uint64_t entries) {
  uint64_t at = dir_offset;
  const uint64_t stop = dir_offset + dir_size;
  for (uint64_t e = 0; e < entries; ++e) {
    if (!fits(at, kCentralSize, stop) || le(bytes_, at, 4) != kCentralSig) fail("damaged central directory");
    const uint64_t flags = le(bytes_, at + 8, 2), method = le(bytes_, at + 10, 2);
    const uint64_t name_len = le(bytes_, at + 28, 2), extra_len = le(bytes_, at + 30, 2);
    const uint64_t comment_len = le(bytes_, at + 32, 2);
    uint64_t csize = le(bytes_, at + 20, 4), usize = le(bytes_, at + 24, 4), local = le(bytes_, at + 42, 4);
    if (!fits(at + kCentralSize, name_len + extra_len + comment_len, stop)) fail("damaged central directory");
    std::string name(bytes_.substr(at + kCentralSize, name_len));
    // Zip64 sizes and offsets live in the extra field (id 1), in this order, when the 32-bit
    // fields are saturated.
    for (uint64_t x = at + kCentralSize + name_len, xend = x + extra_len; x + 4 <= xend;) {
      const uint64_t id = le(bytes_, x, 2), len = le(bytes_, x + 2, 2);
      if (!fits(x + 4, len, xend)) fail("damaged extra field of " + name);
      if (id == 1) {
        uint64_t f = x + 4;
        for (uint64_t* v : {&usize, &csize, &local}) {
          if (*v != 0xFFFFFFFFu) continue;
          if (!fits(f, 8, x + 4 + len)) fail("damaged zip64 field of " + name);
          *v = le(bytes_, f, 8);
          f += 8;
        }
      }
      x += 4 + len;
    }
    if (flags & 1) fail(name + " is encrypted");
    const bool deflated = allow_deflate_ && method == 8;
    if (!deflated && (method != 0 || csize != usize)) {
      fail(name + " is compressed; checkpoints store records uncompressed");
    }
    const auto slash = name.find('/');
    if (slash == std::string::npos || slash == 0) fail("record " + name + " outside a top-level folder");
    if (prefix_.empty()) prefix_ = name.substr(0, slash);
    if (name.compare(0, slash, prefix_) != 0 || slash != prefix_.size()) fail("records in two top-level folders");
    Entry entry{data_offset(local, csize), usize, static_cast<uint32_t>(le(bytes_, at + 16, 4)), csize, deflated};
    if (entry.offset + entry.stored > dir_offset) fail(name + " overlaps the central directory");
    if (!entries_.emplace(name.substr(slash + 1), entry).second) fail("two records named " + name);
    at += kCentralSize + name_len + extra_len + comment_len;
  }
  if (entries_.empty()) fail("no records");
}

uint64_t ZipArchive::data_offset(uint64_t local, uint64_t size) const {
  if (!fits(local, kLocalSize, bytes_.size()) || le(bytes_, local, 4) != kLocalSig) fail("local header outside the file");
  const uint64_t start = local + kLocalSize + le(bytes_, local + 26, 2) + le(bytes_, local + 28, 2);
  if (!fits(start, size, bytes_.size())) fail("record data outside the file");
  return start;
}

bool ZipArchive::has(const std::string& record) const { return entries_.count(record) != 0; }

int64_t ZipArchive::size_of(const std::string& record) const {
  auto it = entries_.find(record);
  return it == entries_.end() ? -1 : static_cast<int64_t>(it->second.size);
}

void ZipArchive::verify_all() const {
  for (const auto& [record, e] : entries_) {
    if (e.deflated) {
      verify_inflated(record, e);
    } else {
      (void)read(record);
    }
  }
}

void ZipArchive::verify_inflated(const std::string& record, const Entry& e) const {
  const std::string what = "record " + prefix_ + "/" + record;
  z_stream z{};
  if (inflateInit2(&z, -MAX_WBITS) != Z_OK) fail("zlib cannot inflate");
  std::string chunk(64 * 1024, '\0');
  const std::string_view in = bytes_.substr(e.offset, e.stored);
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  z.avail_in = static_cast<uInt>(std::min<uint64_t>(in.size(), 1u << 30));
  uLong crc = crc32(0L, Z_NULL, 0);
  uint64_t produced = 0;
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    z.next_out = reinterpret_cast<Bytef*>(chunk.data());
    z.avail_out = static_cast<uInt>(chunk.size());
    rc = inflate(&z, Z_NO_FLUSH);
    const uint64_t got = chunk.size() - z.avail_out;
    produced += got;
    crc = crc32(crc, reinterpret_cast<const Bytef*>(chunk.data()), static_cast<uInt>(got));
    if (produced > e.size || (rc != Z_OK && rc != Z_STREAM_END) || (rc == Z_OK && got == 0 && z.avail_in == 0)) {
      inflateEnd(&z);
      fail(what + " is damaged: its deflated data does not inflate to its declared size");
    }
  }
  inflateEnd(&z);
  if (produced != e.size || crc != e.crc) fail(what + " is damaged: CRC-32 or size does not match");
}

std::string_view ZipArchive::read(const std::string& record) const {
  auto it = entries_.find(record);
  if (it == entries_.end()) fail("no record " + prefix_ + "/" + record);
  if (it->second.deflated) fail("record " + prefix_ + "/" + record + " is compressed");
  const std::string_view data = bytes_.substr(it->second.offset, it->second.size);
  uLong crc = crc32(0L, Z_NULL, 0);
  for (std::string_view rest = data; !rest.empty();) {
    const auto chunk = static_cast<uInt>(std::min<size_t>(rest.size(), 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(rest.data()), chunk);
    rest.remove_prefix(chunk);
  }
  if (crc != it->second.crc) fail("record " + prefix_ + "/" + record + " is damaged: CRC-32 does not match");
  return data;
}

}  // namespace pathkernel
