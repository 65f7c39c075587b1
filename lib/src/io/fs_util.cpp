#include "pathkernel/io/fs_util.h"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "pathkernel/io/errors.h"

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

int open_regular_file(const fs::path& path, int64_t& size, int64_t max_bytes, const std::string& what) {
  const std::string name = path.string() + (what.empty() ? "" : " (" + what + ")");
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) throw InputError("cannot open " + name + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    const bool dir = S_ISDIR(st.st_mode);
    ::close(fd);
    throw InputError(name + ": " + (dir ? "is a folder" : "not a regular file (a FIFO, socket or device)") +
                     "; give a file");
  }
  if (st.st_size > max_bytes) {
    ::close(fd);
    throw InputError(name + ": " + std::to_string(st.st_size) + " bytes, more than the " + std::to_string(max_bytes) +
                     " such a file may hold");
  }
  size = static_cast<int64_t>(st.st_size);
  return fd;
}

std::string read_file(const fs::path& path, int64_t max_bytes) {
  int64_t size = 0;
  const int fd = open_regular_file(path, size, max_bytes);
  std::string bytes(static_cast<size_t>(size), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string why = n < 0 ? std::strerror(errno) : "it became shorter while being read";
      ::close(fd);
      throw InputError("cannot read " + path.string() + ": " + why);
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return bytes;
}

std::string read_file_head(const fs::path& path, size_t n, int64_t* file_size, int64_t max_bytes) {
  int64_t size = 0;
  const int fd = open_regular_file(path, size, max_bytes);
  if (file_size) *file_size = size;
  std::string bytes(std::min(n, static_cast<size_t>(size)), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t got = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    done += static_cast<size_t>(got);
  }
  ::close(fd);
  bytes.resize(done);
  return bytes;
}

bool resolves_inside(const fs::path& dir, const fs::path& file) {
  std::error_code ec;
  const fs::path d = fs::weakly_canonical(dir, ec);
  if (ec) return false;
  const fs::path f = fs::weakly_canonical(file, ec);
  if (ec) return false;
  const fs::path rel = f.lexically_relative(d);
  return !rel.empty() && *rel.begin() != ".." && !rel.is_absolute() && rel != ".";
}

nlohmann::json read_json(const fs::path& path, bool object) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw InputError(path.string() + ": no such file");
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
  if (const fs::path extra = foreign_entry(out); !extra.empty()) {
    const bool recorded = fs::is_regular_file(out / kWrittenRecord);
    throw InputError(out.string() + ": --force would remove " + (out / extra).string() +
                     (recorded ? ", which is not part of the earlier output (" + std::string(kWrittenRecord) +
                                     " lists what is)"
                               : "; this output holds no record of what pathkernel wrote in it (" +
                                     std::string(kWrittenRecord) + ": it is older than the record)") +
                     ": move it out, or choose another --out");
  }
}

namespace {

/// What commit() puts in place: every entry under `dir`, relative, files and folders, sorted.
std::vector<std::string> entries_under(const fs::path& dir) {
  std::vector<std::string> names;
  for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
    names.push_back(it->path().lexically_relative(dir).generic_string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

/// A command's working state in its own output folder (written in place, not through staging).
bool working_state(const std::string& top) {
  static const std::set<std::string> names = {"workers",         "segments",        "partial.json",
                                              "later_share.json", "later_share.npy", "later_share_exact.npy"};
  return names.count(top) > 0;
}

}  // namespace

fs::path foreign_entry(const fs::path& out) {
  std::set<std::string> written;
  std::error_code ec;
  if (fs::is_regular_file(fs::symlink_status(out / kWrittenRecord, ec))) {
    try {
      const nlohmann::json j = read_json(out / kWrittenRecord);
      if (j.value("format", "") == kWrittenFormat && j.contains("entries") && j["entries"].is_array()) {
        for (const auto& e : j["entries"]) {
          if (e.is_string()) written.insert(e.get<std::string>());
        }
      }
    } catch (const std::exception&) {
      written.clear();  // a damaged record vouches for nothing
    }
  }
  std::vector<std::string> found;
  auto it = fs::recursive_directory_iterator(out, ec);  // links are entries, never followed
  for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    const fs::path rel = it->path().lexically_relative(out);
    const std::string name = rel.generic_string();
    if (it.depth() == 0 && (working_state(name) || name == kWrittenRecord)) {
      it.disable_recursion_pending();
      continue;
    }
    if (written.count(name) == 0) found.push_back(name);
  }
  if (ec) throw InputError(out.string() + ": cannot be listed (" + ec.message() + ")");
  if (found.empty()) return {};
  std::sort(found.begin(), found.end());
  return found.front();
}

namespace {

/// lstat of `p`: false when nothing is there.
bool lstat_of(const fs::path& p, struct stat& st) { return ::lstat(p.c_str(), &st) == 0; }

fs::path parent_of(const fs::path& p) { return p.parent_path().empty() ? fs::path(".") : p.parent_path(); }

/// An output path as named, without a trailing separator ("runs/a/" is runs/a), so that what is
/// made beside it (staging folder, lock file) lands beside it and not inside it.
fs::path named_path(const fs::path& out) {
  fs::path p = out.lexically_normal();
  while (!p.has_filename() && p.has_parent_path() && p != p.root_path()) p = p.parent_path();
  return p;
}

}  // namespace

StagedOutput::StagedOutput(const fs::path& named) : out_(named_path(named)) {
  const fs::path& out = out_;
  const fs::path parent = parent_of(out);
  fs::create_directories(parent);
  struct stat st {};
  if (lstat_of(out, st)) {
    if (!S_ISDIR(st.st_mode)) throw InputError(out.string() + ": exists and is not a folder (or is a symbolic link)");
    existed_ = true;
    dev_ = static_cast<unsigned long>(st.st_dev);
    ino_ = static_cast<unsigned long>(st.st_ino);
  }
  std::string name = (parent / ("." + out.filename().string() + ".staging-XXXXXX")).string();
  if (!::mkdtemp(name.data())) throw InputError(out.string() + ": cannot create a folder beside it (" + std::strerror(errno) + ")");
  staging_ = name;
}

StagedOutput::~StagedOutput() {
  if (committed_) return;
  std::error_code ec;
  fs::remove_all(staging_, ec);  // our own folder; remove_all does not follow links inside it
}

void StagedOutput::commit() {
  // The record first: a failure writing it (a full disk) leaves the earlier output in place.
  const nlohmann::json record = {{"format", kWrittenFormat}, {"entries", entries_under(staging_)}};
  atomic_write(staging_ / kWrittenRecord, record.dump(1) + "\n");
  struct stat st {};
  const bool there = lstat_of(out_, st);
  if (there && (!existed_ || !S_ISDIR(st.st_mode) || static_cast<unsigned long>(st.st_dev) != dev_ ||
                static_cast<unsigned long>(st.st_ino) != ino_)) {
    throw InputError(out_.string() + ": " + (existed_ ? "was replaced" : "appeared") +
                     " while this command ran (another process wrote it); it is left as it is and nothing was "
                     "written: give another --out");
  }
  if (!there && existed_) {
    throw InputError(out_.string() + ": was removed while this command ran; nothing was written");
  }
  fs::path displaced;
  if (there) {
    // Moved aside into a folder only this object created, so the name cannot be anyone else's.
    std::string name = (parent_of(out_) / ("." + out_.filename().string() + ".replaced-XXXXXX")).string();
    if (!::mkdtemp(name.data())) {
      throw InputError(out_.string() + ": cannot create a folder beside it (" + std::strerror(errno) + ")");
    }
    displaced = name;
    fs::rename(out_, displaced / "old");
  }
  fs::permissions(staging_, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                fs::perms::others_read | fs::perms::others_exec);
  fs::rename(staging_, out_);
  committed_ = true;
  std::error_code ec;
  if (!displaced.empty()) fs::remove_all(displaced, ec);
}

OutputLock::OutputLock(const fs::path& named) {
  const fs::path out = named_path(named);
  const fs::path parent = parent_of(out);
  fs::create_directories(parent);
  path_ = parent / ("." + out.filename().string() + ".lock");
  // A holder removes the file before it lets go: a lock taken on a file that is no longer at the
  // path guards nothing, so it is taken again on the one that is.
  for (int attempt = 0; attempt < 8; ++attempt) {
    const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) throw InputError(path_.string() + ": cannot be opened (" + std::strerror(errno) + ")");
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd);
      throw InputError(out.string() + ": another pathkernel command is writing it (it holds " + path_.string() +
                       "); wait for it to finish or give another --out");
    }
    struct stat held {}, now {};
    if (::fstat(fd, &held) == 0 && lstat_of(path_, now) && held.st_dev == now.st_dev && held.st_ino == now.st_ino) {
      fd_ = fd;
      return;
    }
    ::close(fd);
  }
  throw InputError(path_.string() + ": keeps changing; is another program removing it?");
}

OutputLock::~OutputLock() {
  if (fd_ < 0) return;
  ::unlink(path_.c_str());  // while still held: see the constructor
  ::close(fd_);
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
