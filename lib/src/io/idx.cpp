#include "pathkernel/io/idx.h"

#include <ATen/ATen.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "pathkernel/io/data_source.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

/// A file read through zlib, which passes raw (non-gzip) files through unchanged. Reads only as
/// much as asked for, so a small file that inflates without end costs nothing.
class GzReader {
 public:
  explicit GzReader(const fs::path& path) : name_(path.string()) {
    if (!fs::exists(path)) throw InputError(name_ + ": no such file");
    int64_t size = 0;
    const int fd = open_regular_file(path, size);  // never a FIFO or a device
    f_ = gzdopen(fd, "rb");
    if (!f_) {
      ::close(fd);
      throw InputError(name_ + ": cannot open: " + std::strerror(errno));
    }
    gzbuffer(f_, 1 << 16);
  }
  ~GzReader() {
    if (f_) gzclose(f_);
  }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;

  /// Reads up to n bytes into p; fewer only at the end of the data.
  size_t read(uint8_t* p, size_t n) {
    size_t got = 0;
    while (got < n) {
      const unsigned want = static_cast<unsigned>(std::min<size_t>(n - got, 1u << 20));
      const int r = gzread(f_, p + got, want);
      if (r < 0) fail();
      if (r == 0) break;
      got += static_cast<size_t>(r);
    }
    return got;
  }
  /// Closes the file; a truncated or corrupt gzip stream is reported here at the latest.
  void finish() {
    int code = 0;
    gzerror(f_, &code);
    if (code != Z_OK && code != Z_BUF_ERROR) fail();
    const int rc = gzclose(f_);
    f_ = nullptr;
    if (rc != Z_OK) throw InputError(name_ + ": truncated gzip data");
  }

 private:
  [[noreturn]] void fail() {
    int code = 0;
    const std::string msg = gzerror(f_, &code);
    throw InputError(name_ + ": corrupt or truncated gzip data (" + msg + ")");
  }
  std::string name_;
  gzFile f_ = nullptr;
};

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

}  // namespace

IdxArray read_idx(const fs::path& path, int expected_ndims, int64_t max_items) {
  const std::string name = path.string();
  GzReader in(path);
  uint8_t head[4 + 4 * 255];
  const size_t got = in.read(head, 4);
  if (got < 4) throw InputError(name + ": too short for an IDX header (" + std::to_string(got) + " bytes)");
  if (head[0] != 0 || head[1] != 0) {
    throw InputError(name + ": bad magic number (first two bytes must be zero; not an IDX file)");
  }
  if (head[2] != 0x08) {
    throw InputError(name + ": unsupported IDX type code 0x" + (std::to_string(head[2] >> 4) + std::to_string(head[2] & 15)) +
                     " (expected 0x08, unsigned bytes)");
  }
  const int ndims = head[3];
  if (ndims != expected_ndims) {
    throw InputError(name + ": wrong magic number: " + std::to_string(ndims) + " dimensions, expected " +
                     std::to_string(expected_ndims) + (expected_ndims == 1 ? " (an idx1 label file)" : " (an idx3 image file)"));
  }
  if (in.read(head + 4, 4 * size_t(ndims)) < 4 * size_t(ndims)) throw InputError(name + ": truncated header");
  IdxArray arr;
  uint64_t count = 1;
  for (int d = 0; d < ndims; ++d) {
    const uint32_t v = be32(&head[4 + 4 * d]);
    if (v == 0) throw InputError(name + ": dimension " + std::to_string(d) + " is zero");
    arr.dims.push_back(v);
    if (__builtin_mul_overflow(count, uint64_t{v}, &count) || count > kMaxIdxBytes) {
      throw InputError(name + ": dimensions describe more than " + std::to_string(kMaxIdxBytes) + " bytes of data");
    }
  }
  arr.header_items = arr.dims[0];
  const bool partial = max_items > 0 && max_items < arr.dims[0];
  if (partial) {
    count = count / static_cast<uint64_t>(arr.dims[0]) * static_cast<uint64_t>(max_items);
    arr.dims[0] = max_items;
  }
  // The buffer grows with the data that actually arrives: a header cannot make it allocate.
  while (arr.data.size() < count) {
    // Doubling from 64 KiB: at most twice what arrived, and few copies for large files.
    const size_t at = arr.data.size();
    const size_t step = static_cast<size_t>(std::min<uint64_t>(count - at, std::max<size_t>(at, 1u << 16)));
    arr.data.resize(at + step);
    const size_t n = in.read(arr.data.data() + at, step);
    if (n < step) {
      throw InputError(name + ": truncated: header says " + std::to_string(count) + " bytes of data, file has " +
                       std::to_string(at + n));
    }
  }
  if (partial) return arr;
  uint8_t extra[4096];
  if (const size_t more = in.read(extra, sizeof extra); more > 0) {
    throw InputError(name + ": " + (more == sizeof extra ? "more than " : "") + std::to_string(more) +
                     " bytes beyond what the header describes (wrong header?)");
  }
  in.finish();
  return arr;
}

fs::path find_idx_file(const fs::path& dir, const std::string& prefix, const std::string& kind) {
  const std::string idx = kind == "images" ? "idx3-ubyte" : "idx1-ubyte";
  const std::vector<std::string> names = {prefix + "-" + kind + "-" + idx + ".gz",
                                          prefix + "-" + kind + "-" + idx,
                                          prefix + "-" + kind + "." + idx + ".gz",
                                          prefix + "-" + kind + "." + idx};
  for (const auto& n : names) {
    if (fs::exists(dir / n)) return dir / n;
  }
  // EMNIST's official names: emnist-SUBSET-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz].
  const std::string tail = "-" + std::string(prefix == "t10k" ? "test" : "train") + "-" + kind + "-" + idx;
  std::vector<fs::path> emnist;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::string n = e.path().filename().string();
    if (n.size() > 3 && n.compare(n.size() - 3, 3, ".gz") == 0) n.resize(n.size() - 3);
    if (n.rfind("emnist-", 0) == 0 && n.size() > tail.size() && n.compare(n.size() - tail.size(), tail.size(), tail) == 0) {
      emnist.push_back(e.path());
    }
  }
  if (emnist.size() == 1) return emnist[0];
  if (emnist.size() > 1) {
    std::sort(emnist.begin(), emnist.end());
    std::string found;
    for (const auto& f : emnist) found += (found.empty() ? "" : ", ") + f.filename().string();
    throw InputError(dir.string() + ": several EMNIST subsets (" + found +
                     "); give --data a folder holding one subset");
  }
  std::string tried;
  for (const auto& n : names) tried += (tried.empty() ? "" : ", ") + n;
  throw InputError(dir.string() + ": no " + prefix + " " + kind + " file (looked for " + tried +
                   ", emnist-SUBSET" + tail + "[.gz])");
}

int64_t Dataset::num_classes() const { return file_classes > 0 ? file_classes : labels.max().item<int64_t>() + 1; }

int64_t Dataset::distinct_labels() const {
  return file_distinct > 0 ? file_distinct : std::get<0>(at::_unique(labels)).numel();
}

Dataset load_split(const fs::path& dir, const std::string& split, int64_t limit) {
  if (split != "train" && split != "test") throw InputError("unknown split '" + split + "'");
  if (!fs::is_directory(dir)) throw InputError(dir.string() + ": data folder does not exist");
  const std::string prefix = split == "train" ? "train" : "t10k";
  Dataset ds;
  ds.images_file = find_idx_file(dir, prefix, "images");
  ds.labels_file = find_idx_file(dir, prefix, "labels");
  IdxArray img = read_idx(ds.images_file, 3, limit);
  // The labels whole (a byte each): the classes are the data's, whatever the limit keeps.
  IdxArray lab = read_idx(ds.labels_file, 1);
  // The headers' counts, not what was decoded: with a limit, a labels file of other length than
  // the images file is as wrong beyond the limit as within it.
  if (img.header_items != lab.dims[0]) {
    throw InputError(ds.images_file.string() + " has " + std::to_string(img.header_items) + " images but " +
                     ds.labels_file.string() + " has " + std::to_string(lab.dims[0]) + " labels");
  }
  int64_t n = img.dims[0];
  if (limit > 0 && limit < n) n = limit;
  const int64_t h = img.dims[1], w = img.dims[2];
  ds.images = at::empty({n, 1, h, w}, at::kByte);
  std::memcpy(ds.images.data_ptr<uint8_t>(), img.data.data(), size_t(n * h * w));
  ds.labels = at::empty({n}, at::kLong);
  auto* l = ds.labels.data_ptr<int64_t>();
  std::array<bool, 256> seen{};
  for (size_t i = 0; i < lab.data.size(); ++i) {
    // EMNIST-letters has labels 1..26, so labels are kept as they are; anything over 254 is
    // no class label of an MNIST-style set.
    if (lab.data[i] == 255) {
      throw InputError(ds.labels_file.string() + ": label 255 at index " + std::to_string(i) + " is out of range");
    }
    seen[lab.data[i]] = true;
    if (static_cast<int64_t>(i) < n) l[i] = lab.data[i];
  }
  for (int v = 0; v < 256; ++v) {
    if (!seen[static_cast<size_t>(v)]) continue;
    ds.file_classes = v + 1;
    ++ds.file_distinct;
  }
  return ds;
}

Dataset load_dataset(const std::string& data, const std::string& split, int64_t limit) {
  if (!is_synthetic(data)) return load_split(data, split, limit);
  if (data != "synthetic:wave") throw InputError("--data " + data + ": unknown synthetic set (known: synthetic:wave)");
  if (split != "train" && split != "test") throw InputError("unknown split '" + split + "'");
  int64_t n = split == "train" ? 256 : 64;
  if (limit > 0 && limit < n) n = limit;
  Dataset ds;
  ds.images = at::empty({n, 1, 1, 1}, at::kByte);
  ds.labels = at::empty({n}, at::kLong);
  for (int64_t i = 0; i < n; ++i) {
    // 97 is odd, so i * 97 mod 256 visits every pixel value once; the test set is a regular grid.
    const int64_t x = split == "train" ? (i * 97 + 11) % 256 : (i * 4 + 2) % 256;
    ds.images.data_ptr<uint8_t>()[i] = static_cast<uint8_t>(x);
    ds.labels.data_ptr<int64_t>()[i] = x > 127 ? 0 : 1;
  }
  return ds;
}

Normalization standard_normalization(const Dataset& data) {
  at::Tensor x = data.images.to(at::kDouble).div_(255.0);
  Normalization n;
  n.mean = x.mean().item<double>();
  n.std = x.std().item<double>();
  if (!(n.std > 0)) throw InputError(data.images_file.string() + ": all pixels are equal; cannot standardize");
  return n;
}

at::Tensor to_inputs(const at::Tensor& images_u8, at::ScalarType dtype, const Normalization& norm) {
  at::Tensor x = images_u8.to(dtype).div_(255.0);
  if (!norm.identity()) x.sub_(norm.mean).div_(norm.std);
  return x;
}

}  // namespace pathkernel
