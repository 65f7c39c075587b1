#include "fixtures.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include <unistd.h>
#include <zlib.h>

#include <fstream>
#include <random>
#include <stdexcept>

extern char** environ;

namespace pathkernel::testing {

int run_program(const std::vector<std::string>& args, const std::filesystem::path& log, const std::filesystem::path& cwd,
                double* cpu_seconds) {
  std::vector<std::string> all = args;
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  if (!cwd.empty()) posix_spawn_file_actions_addchdir_np(&fa, cwd.c_str());
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return -1000;
  int status = 0;
  rusage ru{};
  wait4(pid, &status, 0, &ru);
  if (cpu_seconds) {
    *cpu_seconds = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                   1e-6 * static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

namespace fs = std::filesystem;

TempDir::TempDir() {
  std::string tmpl = (fs::temp_directory_path() / "pathkernel-test-XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

std::string idx_bytes(const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data) {
  std::string b = {0, 0, 0x08, static_cast<char>(dims.size())};
  for (uint32_t d : dims) {
    for (int s = 24; s >= 0; s -= 8) b += static_cast<char>((d >> s) & 0xff);
  }
  b.append(data.begin(), data.end());
  return b;
}

void write_file(const fs::path& path, const std::string& bytes, bool gz) {
  if (gz) {
    gzFile f = gzopen(path.c_str(), "wb");
    gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
    gzclose(f);
  } else {
    std::ofstream(path, std::ios::binary) << bytes;
  }
}

void write_synthetic_idx(const fs::path& dir, int n_train, int n_test, int size, int classes, bool gz) {
  fs::create_directories(dir);
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> noise(0, 60);
  auto make = [&](const std::string& prefix, int n) {
    std::vector<uint8_t> img(static_cast<size_t>(n) * size * size), lab(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      const int c = i % classes;
      lab[i] = static_cast<uint8_t>(c);
      for (int p = 0; p < size * size; ++p) {
        const int r = p / size, col = p % size;
        const bool in_square = r / (size / 2) == (c % 2) && col / (size / 2) == ((c / 2) % 2);
        img[static_cast<size_t>(i) * size * size + p] = static_cast<uint8_t>(noise(rng) + (in_square ? 180 : 0));
      }
    }
    const std::string ext = gz ? ".gz" : "";
    write_file(dir / (prefix + "-images-idx3-ubyte" + ext),
               idx_bytes({uint32_t(n), uint32_t(size), uint32_t(size)}, img), gz);
    write_file(dir / (prefix + "-labels-idx1-ubyte" + ext), idx_bytes({uint32_t(n)}, lab), gz);
  };
  make("train", n_train);
  make("t10k", n_test);
}

}  // namespace pathkernel::testing
