#include "pathkernel/fs_util.h"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "pathkernel/errors.h"

namespace pathkernel {
namespace fs = std::filesystem;

void sync_directory(const fs::path& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void atomic_write(const fs::path& path, const std::string& bytes, bool durable) {
  const fs::path tmp = path.string() + ".tmp-" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) {
    throw InputError("cannot write " + path.string() + ": " + std::strerror(errno));
  }
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string why = std::strerror(errno);
      ::close(fd);
      ::unlink(tmp.c_str());
      throw InputError("cannot write " + path.string() + ": " + why);
    }
    done += static_cast<size_t>(n);
  }
  if ((durable && ::fsync(fd) != 0) || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw InputError("cannot flush " + path.string() + ": " + std::strerror(errno));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    ::unlink(tmp.c_str());
    throw InputError("cannot rename " + tmp.string() + " to " + path.string() + ": " + ec.message());
  }
  if (durable) sync_directory(path.parent_path());
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot open " + path.string() + ": " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

nlohmann::json read_json(const fs::path& path, bool object) {
  if (!fs::is_regular_file(path)) throw InputError(path.string() + ": no such file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path.string() + ": not valid JSON (" + std::string(e.what()).substr(0, 200) + ")");
  }
  if (object && !j.is_object()) throw InputError(path.string() + ": expected a JSON object");
  return j;
}

namespace {

/// `out` does not exist: the nearest folder that exists must take a new entry. Tried with a
/// probe folder, removed at once (access(2) says yes to root on /proc or a read-only mount).
void check_creatable(const fs::path& out) {
  std::error_code ec;
  fs::path parent = fs::absolute(out, ec).parent_path();
  while (!parent.empty() && !fs::exists(fs::symlink_status(parent, ec)) && parent != parent.root_path()) {
    parent = parent.parent_path();
  }
  if (!fs::is_directory(parent, ec)) {
    throw InputError(out.string() + ": cannot be created (" + parent.string() + " is not a folder)");
  }
  std::string probe = (parent / ".pathkernel-probe-XXXXXX").string();
  if (!::mkdtemp(probe.data())) {
    throw InputError(out.string() + ": cannot be created in " + parent.string() + " (" + std::strerror(errno) + ")");
  }
  ::rmdir(probe.c_str());
}

}  // namespace

void check_output_file(const fs::path& out, bool force) {
  std::error_code ec;
  const auto st = fs::status(out, ec);
  if (ec || st.type() == fs::file_type::not_found) return check_creatable(out);
  if (st.type() != fs::file_type::regular) throw InputError(out.string() + ": exists and is not a file");
  if (!force) throw InputError(out.string() + " exists; pass --force to overwrite it");
  check_creatable(out.parent_path().empty() ? fs::path("x") : out.parent_path() / "x");
}

void check_output_dir(const fs::path& out, bool force, const std::string& marker, const std::string& format) {
  if (out.empty()) throw InputError("--out DIR is required");
  std::error_code ec;
  const auto st = fs::symlink_status(out, ec);
  if (ec || st.type() == fs::file_type::not_found) {
    check_creatable(out);
    return;
  }
  if (st.type() == fs::file_type::symlink) throw InputError(out.string() + ": is a symbolic link; give a real folder");
  if (st.type() != fs::file_type::directory) throw InputError(out.string() + ": exists and is not a folder");
  if (::access(out.c_str(), W_OK) != 0) throw InputError(out.string() + ": is not writable");
  if (fs::is_empty(out)) return;
  if (!force) throw InputError(out.string() + " already exists and is not empty; choose another --out or pass --force");
  const fs::path m = out / marker;
  bool ours = fs::is_regular_file(m) && !fs::exists(out / "manifest.json");
  if (ours && !format.empty()) {
    try {
      ours = read_json(m).value("format", "") == format;
    } catch (const InputError&) {
      ours = false;
    }
  }
  if (!ours) {
    throw InputError(out.string() + ": --force replaces only an earlier output of this command (" + marker +
                     (format.empty() ? "" : " of format " + format) + "), and this folder holds something else");
  }
}

StagedOutput::StagedOutput(const fs::path& out) : out_(out) {
  const fs::path parent = out.parent_path().empty() ? fs::path(".") : out.parent_path();
  fs::create_directories(parent);
  std::string name = (parent / ("." + out.filename().string() + ".staging-XXXXXX")).string();
  if (!::mkdtemp(name.data())) throw InputError(out.string() + ": cannot create a folder beside it (" + std::strerror(errno) + ")");
  staging_ = name;
}

StagedOutput::~StagedOutput() {
  if (committed_) return;
  std::error_code ec;
  fs::remove_all(staging_, ec);
}

void StagedOutput::commit() {
  std::error_code ec;
  fs::path old;
  if (fs::exists(out_)) {
    old = out_.string() + ".replaced";
    fs::remove_all(old, ec);
    fs::rename(out_, old);
  }
  fs::permissions(staging_, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                fs::perms::others_read | fs::perms::others_exec);
  fs::rename(staging_, out_);
  committed_ = true;
  if (!old.empty()) fs::remove_all(old, ec);
}

DirLock::DirLock(const fs::path& dir, bool exclusive) {
  const int fd = ::open((dir / ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) {
    if (errno == EACCES || errno == EROFS) return;  // a read-only run can still be read
    throw InputError((dir / ".lock").string() + ": cannot be opened (" + std::strerror(errno) + ")");
  }
  if (::flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0) {
    ::close(fd);
    return;
  }
  fd_ = fd;
}

DirLock::~DirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the flock
}

}  // namespace pathkernel
