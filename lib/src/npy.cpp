#include "pathkernel/npy.h"

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

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

}  // namespace pathkernel
