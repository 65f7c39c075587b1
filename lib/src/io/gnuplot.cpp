#include "pathkernel/io/gnuplot.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "pathkernel/io/fs_util.h"

extern char** environ;

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

/// The gnuplot executable on PATH, searched here (no shell), or empty.
std::string find_gnuplot() {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    const size_t end = dirs.find(':', start);
    const std::string dir = dirs.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!dir.empty()) {
      const fs::path candidate = fs::path(dir) / "gnuplot";
      if (::access(candidate.c_str(), X_OK) == 0 && fs::is_regular_file(candidate)) return candidate.string();
    }
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return {};
}

/// Runs gnuplot in `dir` with `script` on its standard input; returns its exit status and what it
/// wrote to stderr. No shell is involved: nothing in the script or the paths is ever parsed as a
/// command line.
std::pair<int, std::string> run_gnuplot(const std::string& exe, const fs::path& dir, const std::string& script) {
  int in[2], err[2];
  if (::pipe2(in, O_CLOEXEC) != 0) throw std::runtime_error("gnuplot: cannot create a pipe");
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(in[0]);
    ::close(in[1]);
    throw std::runtime_error("gnuplot: cannot create a pipe");
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in[0], 0);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addchdir_np(&fa, dir.c_str());
  std::vector<std::string> args = {exe, "-"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(in[0]);
  ::close(err[1]);
  if (rc != 0) {
    ::close(in[1]);
    ::close(err[0]);
    throw std::runtime_error("cannot start " + exe + ": " + std::strerror(rc));
  }
  // Write the script and read stderr together, so that neither pipe can fill up and block.
  std::string errors;
  size_t written = 0;
  bool in_open = true;
  char buf[4096];
  for (;;) {
    pollfd fds[2] = {{err[0], POLLIN, 0}, {in_open ? in[1] : -1, POLLOUT, 0}};
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) break;
    if (in_open && (fds[1].revents & (POLLOUT | POLLERR | POLLHUP))) {
      const ssize_t n = ::write(in[1], script.data() + written, script.size() - written);
      if (n > 0) written += static_cast<size_t>(n);
      if (n < 0 || written == script.size()) {
        ::close(in[1]);
        in_open = false;
      }
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t n = ::read(err[0], buf, sizeof(buf));
      if (n <= 0) break;
      if (errors.size() < 65536) errors.append(buf, static_cast<size_t>(n));
    }
  }
  if (in_open) ::close(in[1]);
  ::close(err[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), errors};
}

}  // namespace

std::string png_header(int width, int height, int font_pt) {
  return "set terminal pngcairo size " + std::to_string(width) + "," + std::to_string(height) + " font 'sans," +
         std::to_string(font_pt) + "'\nset output '@OUTPUT@'\nset datafile separator ','\n";
}

bool gnuplot_available() { return !find_gnuplot().empty(); }

std::string gp_text(const std::string& s) {
  std::string out;
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f) continue;       // no line breaks or control characters
    if (c == '`' || c == '@' || c == '\\') {   // no command or macro substitution, no escapes
      out += '_';
    } else if (c == '\'') {
      out += "''";                             // a quote inside a single-quoted gnuplot string
    } else {
      out += ch;
    }
  }
  return out;
}

void render_gnuplot(const fs::path& png, const std::string& script, bool vector_copies) {
  const std::string exe = find_gnuplot();
  if (exe.empty()) throw std::runtime_error("gnuplot is not on the PATH (apt-get install gnuplot-nox)");
  const fs::path dir = png.parent_path().empty() ? fs::path(".") : png.parent_path();
  const fs::path gp = fs::path(png).replace_extension(".gp");
  // The script names files relative to its own folder, where gnuplot runs: the kept .gp file
  // re-renders the figure from there, wherever the folder has moved.
  const std::string name = png.filename().string(), tmp_name = name + ".tmp.png";
  std::string body = script, run = script;
  for (size_t pos; (pos = body.find("@OUTPUT@")) != std::string::npos;) body.replace(pos, 8, gp_text(name));
  for (size_t pos; (pos = run.find("@OUTPUT@")) != std::string::npos;) run.replace(pos, 8, gp_text(tmp_name));
  atomic_write(gp, body);
  const auto [status, err] = run_gnuplot(exe, dir, run);
  const fs::path tmp_png = dir / tmp_name;
  if (status != 0 || !fs::exists(tmp_png)) {
    fs::remove(tmp_png);
    throw std::runtime_error("gnuplot failed on " + gp.string() + ": " + err.substr(0, 400));
  }
  fs::rename(tmp_png, png);
  if (!vector_copies) return;
  int w = 0, h = 0;
  const std::string first = script.substr(0, script.find('\n'));
  if (std::sscanf(first.c_str(), "set terminal pngcairo size %d,%d", &w, &h) != 2) {
    throw std::runtime_error(gp.string() + ": vector copies need a first line 'set terminal pngcairo size W,H'");
  }
  const std::string rest = script.substr(script.find('\n'));
  for (const auto& [ext, terminal] :
       {std::pair<std::string, std::string>{".svg", fmt::format("set terminal svg size {},{} dynamic font 'sans,10'", w, h)},
        std::pair<std::string, std::string>{".pdf", fmt::format("set terminal pdfcairo size {}in,{}in font 'sans,7'",
                                                                w / 100.0, h / 100.0)}}) {
    const std::string target = fs::path(name).replace_extension(ext).string(), tmp = target + ".tmp" + ext;
    std::string variant = terminal + rest;
    for (size_t pos; (pos = variant.find("@OUTPUT@")) != std::string::npos;) variant.replace(pos, 8, gp_text(tmp));
    const auto [st, e] = run_gnuplot(exe, dir, variant);
    if (st != 0 || !fs::exists(dir / tmp)) {
      fs::remove(dir / tmp);
      throw std::runtime_error("gnuplot failed on the " + ext + " copy of " + gp.string() + ": " + e.substr(0, 400));
    }
    fs::rename(dir / tmp, dir / target);
  }
}

void render_image_grid(const fs::path& png, const std::vector<GridImage>& images, int columns,
                       const std::string& title) {
  const int n = static_cast<int>(images.size());
  const int rows = (n + columns - 1) / columns;
  std::string s = fmt::format(
      "set terminal pngcairo size {},{} font 'sans,9'\nset output '@OUTPUT@'\n"
      "set palette gray negative\nunset colorbox\nunset key\nunset tics\nunset border\n"
      "set size ratio -1\nset multiplot layout {},{} title '{}' font 'sans,11'\n",
      std::max(4, columns) * 175, rows * 170 + 40, rows, columns, gp_text(title));
  for (int i = 0; i < n; ++i) {
    const at::Tensor img = images[i].pixels.contiguous();
    const int64_t h = img.size(0), w = img.size(1);
    s += fmt::format("$img{} << EOD\n", i);
    const uint8_t* p = img.data_ptr<uint8_t>();
    for (int64_t r = 0; r < h; ++r) {
      for (int64_t c = 0; c < w; ++c) s += fmt::format("{}{}", c ? " " : "", static_cast<int>(p[r * w + c]));
      s += "\n";
    }
    s += "EOD\n";
    s += fmt::format("set title '{}' font 'sans,9'\nset xrange [-0.5:{}]\nset yrange [{}:-0.5]\n"
                     "set cbrange [0:255]\nplot $img{} matrix with image\n",
                     gp_text(images[i].caption), w - 0.5, h - 0.5, i);
  }
  s += "unset multiplot\n";
  render_gnuplot(png, s);
}

}  // namespace pathkernel
