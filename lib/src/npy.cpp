#include "pathkernel/npy.h"

#include <ATen/ATen.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "pathkernel/errors.h"
#include "pathkernel/fs_util.h"

namespace pathkernel {

void save_npy(const std::filesystem::path& path, const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::string descr;
  if (c.scalar_type() == at::kDouble) descr = "<f8";
  else if (c.scalar_type() == at::kLong) descr = "<i8";
  else if (c.scalar_type() == at::kFloat) descr = "<f4";
  else throw std::invalid_argument("save_npy: unsupported dtype");
  std::string shape = "(";
  for (int64_t d : c.sizes()) shape += std::to_string(d) + ",";
  if (c.dim() > 1) shape.pop_back();
  shape += ")";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of 64.
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string bytes = "\x93NUMPY";
  bytes += '\x01';
  bytes += '\x00';
  bytes += static_cast<char>(header.size() & 0xff);
  bytes += static_cast<char>(header.size() >> 8);
  bytes += header;
  bytes.append(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.nbytes()));
  atomic_write(path, bytes);
}

at::Tensor load_npy(const std::filesystem::path& path) {
  const std::string bytes = read_file(path);
  const std::string name = path.string();
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) throw InputError(name + ": not a .npy file");
  const size_t hlen = static_cast<uint8_t>(bytes[8]) | (static_cast<size_t>(static_cast<uint8_t>(bytes[9])) << 8);
  if (bytes[6] != 1 || bytes.size() < 10 + hlen) throw InputError(name + ": unsupported .npy version or truncated header");
  const std::string header = bytes.substr(10, hlen);
  at::ScalarType type;
  if (header.find("'<f8'") != std::string::npos) type = at::kDouble;
  else if (header.find("'<f4'") != std::string::npos) type = at::kFloat;
  else if (header.find("'<i8'") != std::string::npos) type = at::kLong;
  else throw InputError(name + ": unsupported dtype (expected <f8, <f4 or <i8)");
  if (header.find("'fortran_order': False") == std::string::npos) throw InputError(name + ": Fortran order");
  const size_t a = header.find("'shape': ("), b = header.find(')', a);
  if (a == std::string::npos || b == std::string::npos) throw InputError(name + ": no shape in header");
  // Dimensions are plain decimal numbers; their product times the element size must be exactly
  // the bytes after the header, checked before anything is allocated.
  std::vector<int64_t> shape;
  const std::string dims = header.substr(a + 10, b - a - 10);
  int64_t nbytes = static_cast<int64_t>(c10::elementSize(type));
  for (size_t pos = 0; pos < dims.size();) {
    const size_t comma = dims.find(',', pos);
    std::string d = dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    d.erase(0, d.find_first_not_of(' '));
    d.erase(d.find_last_not_of(' ') + 1);
    if (!d.empty()) {
      if (d.size() > 18 || d.find_first_not_of("0123456789") != std::string::npos) {
        throw InputError(name + ": shape entry '" + d.substr(0, 20) + "' is not a whole number");
      }
      shape.push_back(std::stoll(d));
      if (__builtin_mul_overflow(nbytes, shape.back(), &nbytes)) throw InputError(name + ": shape too large");
    } else if (comma != std::string::npos && !(shape.size() == 1 && dims.find_first_not_of(' ', comma + 1) == std::string::npos)) {
      throw InputError(name + ": malformed shape (" + dims.substr(0, 40) + ")");
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  if (shape.size() > 16) throw InputError(name + ": more than 16 dimensions");
  if (static_cast<uint64_t>(nbytes) != bytes.size() - 10 - hlen) {
    throw InputError(name + ": data size does not match the shape in its header");
  }
  at::Tensor t = at::empty(shape, type);
  if (nbytes > 0) std::memcpy(t.data_ptr(), bytes.data() + 10 + hlen, static_cast<size_t>(nbytes));
  return t;
}

}  // namespace pathkernel
