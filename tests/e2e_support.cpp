#include "e2e_support.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <fstream>
#include <iterator>
#include <thread>

#include "fixtures.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel::e2e {
namespace fs = std::filesystem;

pid_t spawn(const std::vector<std::string>& args, const fs::path& log_dir, char** env) {
  std::vector<std::string> all = {PATHKERNEL_BIN};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, (log_dir / "stdout").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, (log_dir / "stderr").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = 0;
  EXPECT_EQ(posix_spawn(&pid, PATHKERNEL_BIN, &fa, nullptr, argv.data(), env), 0);
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

std::string run_ok(const std::vector<std::string>& argv, const fs::path& log) {
  const int st = testing::run_program(argv, log);
  const std::string text = read_file(log);
  EXPECT_EQ(st, 0) << text;
  return text;
}

std::string lower(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

int wait_status(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

Result run(const std::vector<std::string>& args, const fs::path& log_dir) {
  const int st = wait_status(spawn(args, log_dir));
  return {st, read_file(log_dir / "stdout"), read_file(log_dir / "stderr")};
}

int64_t lines_in(const fs::path& p) {
  std::ifstream in(p);
  return std::count(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>(), '\n');
}

bool kill_when(const std::vector<std::string>& args, const fs::path& log_dir, const fs::path& file, int64_t lines) {
  const pid_t pid = spawn(args, log_dir);
  for (;;) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return false;
    if (fs::exists(file) && lines_in(file) >= lines) {
      kill(pid, SIGKILL);
      wait_status(pid);
      return true;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

}  // namespace pathkernel::e2e
