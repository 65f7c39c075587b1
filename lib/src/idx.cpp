#include "pathkernel/idx.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <cstring>

#include "pathkernel/errors.h"

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

/// Reads a whole file through zlib, which passes raw (non-gzip) files through unchanged.
std::vector<uint8_t> read_maybe_gz(const fs::path& path) {
  if (!fs::is_regular_file(path)) throw InputError(path.string() + ": no such file");
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw InputError(path.string() + ": cannot open: " + std::strerror(errno));
  gzbuffer(f, 1 << 20);
  std::vector<uint8_t> out;
  std::vector<uint8_t> chunk(1 << 20);
  for (;;) {
    int n = gzread(f, chunk.data(), static_cast<unsigned>(chunk.size()));
    if (n < 0) {
      int code = 0;
      std::string msg = gzerror(f, &code);
      gzclose(f);
      throw InputError(path.string() + ": corrupt or truncated gzip data (" + msg + ")");
    }
    if (n == 0) break;
    out.insert(out.end(), chunk.begin(), chunk.begin() + n);
  }
  int code = 0;
  const char* msg = gzerror(f, &code);
  if (code != Z_OK && code != Z_BUF_ERROR) {
    std::string m = msg;
    gzclose(f);
    throw InputError(path.string() + ": corrupt or truncated gzip data (" + m + ")");
  }
  // gzread stops quietly at a truncated gzip member; gzclose reports it.
  if (gzclose(f) != Z_OK) throw InputError(path.string() + ": truncated gzip data");
  return out;
}

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

}  // namespace

IdxArray read_idx(const fs::path& path, int expected_ndims) {
  std::vector<uint8_t> bytes = read_maybe_gz(path);
  const std::string name = path.string();
  if (bytes.size() < 4) {
    throw InputError(name + ": too short for an IDX header (" + std::to_string(bytes.size()) + " bytes)");
  }
  if (bytes[0] != 0 || bytes[1] != 0) {
    throw InputError(name + ": bad magic number (first two bytes must be zero; not an IDX file)");
  }
  if (bytes[2] != 0x08) {
    throw InputError(name + ": unsupported IDX type code 0x" +
                     (std::to_string(bytes[2] >> 4) + std::to_string(bytes[2] & 15)) +
                     " (expected 0x08, unsigned bytes)");
  }
  const int ndims = bytes[3];
  if (ndims != expected_ndims) {
    throw InputError(name + ": wrong magic number: " + std::to_string(ndims) +
                     " dimensions, expected " + std::to_string(expected_ndims) +
                     (expected_ndims == 1 ? " (an idx1 label file)" : " (an idx3 image file)"));
  }
  const size_t header = 4 + 4 * size_t(ndims);
  if (bytes.size() < header) throw InputError(name + ": truncated header");
  IdxArray arr;
  uint64_t count = 1;
  for (int d = 0; d < ndims; ++d) {
    const uint32_t v = be32(&bytes[4 + 4 * d]);
    if (v == 0) throw InputError(name + ": dimension " + std::to_string(d) + " is zero");
    arr.dims.push_back(v);
    count *= v;
  }
  const uint64_t have = bytes.size() - header;
  if (have < count) {
    throw InputError(name + ": truncated: header says " + std::to_string(count) +
                     " bytes of data, file has " + std::to_string(have));
  }
  if (have > count) {
    throw InputError(name + ": " + std::to_string(have - count) +
                     " bytes beyond what the header describes (wrong header?)");
  }
  arr.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(header), bytes.end());
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
  std::string tried;
  for (const auto& n : names) tried += (tried.empty() ? "" : ", ") + n;
  throw InputError(dir.string() + ": no " + prefix + " " + kind + " file (looked for " + tried + ")");
}

int64_t Dataset::num_classes() const { return labels.max().item<int64_t>() + 1; }

Dataset load_split(const fs::path& dir, const std::string& split, int64_t limit) {
  if (split != "train" && split != "test") throw InputError("unknown split '" + split + "'");
  if (!fs::is_directory(dir)) throw InputError(dir.string() + ": data folder does not exist");
  const std::string prefix = split == "train" ? "train" : "t10k";
  Dataset ds;
  ds.images_file = find_idx_file(dir, prefix, "images");
  ds.labels_file = find_idx_file(dir, prefix, "labels");
  IdxArray img = read_idx(ds.images_file, 3);
  IdxArray lab = read_idx(ds.labels_file, 1);
  if (img.dims[0] != lab.dims[0]) {
    throw InputError(ds.images_file.string() + " has " + std::to_string(img.dims[0]) + " images but " +
                     ds.labels_file.string() + " has " + std::to_string(lab.dims[0]) + " labels");
  }
  int64_t n = img.dims[0];
  if (limit > 0 && limit < n) n = limit;
  const int64_t h = img.dims[1], w = img.dims[2];
  ds.images = at::empty({n, 1, h, w}, at::kByte);
  std::memcpy(ds.images.data_ptr<uint8_t>(), img.data.data(), size_t(n * h * w));
  ds.labels = at::empty({n}, at::kLong);
  auto* l = ds.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    // EMNIST-letters has labels 1..26, so labels are kept as they are; anything over 254 is
    // no class label of an MNIST-style set.
    if (lab.data[i] == 255) {
      throw InputError(ds.labels_file.string() + ": label " + std::to_string(lab.data[i]) +
                       " at index " + std::to_string(i) + " is out of range");
    }
    l[i] = lab.data[i];
  }
  return ds;
}

bool is_synthetic(const std::string& data) { return data.rfind("synthetic:", 0) == 0; }

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
