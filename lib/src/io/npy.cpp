#include "pathkernel/io/npy.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {

void save_npy(const std::filesystem::path& path, const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::string descr;
  if (c.scalar_type() == at::kDouble) descr = "<f8";
  else if (c.scalar_type() == at::kLong) descr = "<i8";
  else if (c.scalar_type() == at::kFloat) descr = "<f4";
  else if (c.scalar_type() == at::kByte) descr = "|u1";
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

namespace {

/// The header of a .npy file, a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`, parsed strictly: exactly the
/// keys descr, fortran_order and shape, each once, nothing else.
class NpyHeader {
 public:
  NpyHeader(const std::string& text, const std::string& name) : s_(text), name_(name) {
    expect('{');
    bool descr = false, order = false, shape = false;
    while (true) {
      skip();
      if (peek() == '}') {
        ++i_;
        break;
      }
      const std::string key = quoted();
      skip();
      expect(':');
      skip();
      if (key == "descr" && !descr) {
        descr = true;
        descr_ = quoted();
      } else if (key == "fortran_order" && !order) {
        order = true;
        fortran_ = word() == "True";
      } else if (key == "shape" && !shape) {
        shape = true;
        read_shape();
      } else {
        const bool known = key == "descr" || key == "fortran_order" || key == "shape";
        fail(known ? "the key '" + key + "' twice" : "an unknown key '" + key.substr(0, 20) + "'");
      }
      skip();
      if (peek() == ',') {
        ++i_;
      } else if (peek() != '}') {
        fail("no ',' or '}' after '" + key + "'");
      }
    }
    if (!descr || !order || !shape) fail("not all of descr, fortran_order and shape");
    if (s_.find_first_not_of(" \n", i_) != std::string::npos) fail("text after the dict");
  }
  const std::string& descr() const { return descr_; }
  bool fortran_order() const { return fortran_; }
  const std::vector<int64_t>& shape() const { return shape_; }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw InputError(name_ + ": malformed header (" + what + ")"); }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip() {
    while (peek() == ' ') ++i_;
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string quoted() {
    const char q = peek();
    if (q != '\'' && q != '"') fail("expected a quoted string");
    const size_t end = s_.find(q, i_ + 1);
    if (end == std::string::npos || end - i_ > 64) fail("an unterminated or long string");
    std::string v = s_.substr(i_ + 1, end - i_ - 1);
    i_ = end + 1;
    return v;
  }
  std::string word() {
    for (const char* w : {"True", "False"}) {
      if (s_.compare(i_, std::strlen(w), w) == 0) {
        i_ += std::strlen(w);
        return w;
      }
    }
    fail("fortran_order must be True or False");
  }
  void read_shape() {
    expect('(');
    while (true) {
      skip();
      if (peek() == ')') {
        ++i_;
        break;
      }
      if (peek() == ',') fail("malformed shape");
      const size_t a = i_;
      while (peek() >= '0' && peek() <= '9') ++i_;
      if (i_ == a || (peek() != ',' && peek() != ')' && peek() != ' ')) {
        const size_t end = std::min(s_.find_first_of(",)", a), a + 20);
        throw InputError(name_ + ": shape entry '" + s_.substr(a, end - a) + "' is not a whole number");
      }
      if (i_ - a > 18) fail("a shape entry too large");
      shape_.push_back(std::stoll(s_.substr(a, i_ - a)));
      skip();
      if (peek() == ',') {
        ++i_;
      } else if (peek() != ')') {
        fail("malformed shape");
      }
    }
    if (shape_.size() > 16) fail("more than 16 dimensions");
  }

  std::string s_, name_;
  size_t i_ = 0;
  std::string descr_;
  bool fortran_ = false;
  std::vector<int64_t> shape_;
};

}  // namespace

namespace {

/// Where a .npy file's data lies and what it holds, from its first bytes `head` (at least the
/// magic, version, length and header) and its whole size: the shape's bytes checked against the
/// bytes after the header before anything is allocated.
struct NpyLayout {
  at::ScalarType type = at::kDouble;
  std::vector<int64_t> shape;
  size_t offset = 0;
  int64_t nbytes = 0;
};

NpyLayout npy_layout(const std::string& head, uint64_t file_size, const std::string& name) {
  if (head.size() < 10 || head.compare(0, 6, "\x93NUMPY") != 0) throw InputError(name + ": not a .npy file");
  const size_t hlen = static_cast<uint8_t>(head[8]) | (static_cast<size_t>(static_cast<uint8_t>(head[9])) << 8);
  if (head[6] != 1 || head.size() < 10 + hlen) throw InputError(name + ": unsupported .npy version or truncated header");
  const NpyHeader header(head.substr(10, hlen), name);
  NpyLayout l;
  if (header.descr() == "<f8") l.type = at::kDouble;
  else if (header.descr() == "<f4") l.type = at::kFloat;
  else if (header.descr() == "<i8") l.type = at::kLong;
  else if (header.descr() == "|u1") l.type = at::kByte;
  else throw InputError(name + ": unsupported dtype (expected <f8, <f4, <i8 or |u1)");
  if (header.fortran_order()) throw InputError(name + ": Fortran order");
  l.nbytes = static_cast<int64_t>(c10::elementSize(l.type));
  for (int64_t d : header.shape()) {
    if (__builtin_mul_overflow(l.nbytes, d, &l.nbytes)) throw InputError(name + ": shape too large");
  }
  l.offset = 10 + hlen;
  if (static_cast<uint64_t>(l.nbytes) != file_size - l.offset) {
    throw InputError(name + ": data size does not match the shape in its header");
  }
  l.shape = header.shape();
  return l;
}

}  // namespace

at::Tensor load_npy(const std::filesystem::path& path) {
  const std::string bytes = read_file(path);
  const NpyLayout l = npy_layout(bytes, bytes.size(), path.string());
  at::Tensor t = at::empty(l.shape, l.type);
  if (l.nbytes > 0) std::memcpy(t.data_ptr(), bytes.data() + l.offset, static_cast<size_t>(l.nbytes));
  return t;
}

NpyInfo npy_info(const std::filesystem::path& path) {
  int64_t size = 0;
  const std::string head = read_file_head(path, 10 + 65535, &size);  // the largest header, v2
  const NpyLayout l = npy_layout(head, static_cast<uint64_t>(size), path.string());
  return {l.type, l.shape};
}

}  // namespace pathkernel
