#pragma once
// Helpers of the end-to-end tests: the pathkernel binary started as a child process, its exit
// status and output.
#include <sys/types.h>
#include <unistd.h>  // environ

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace pathkernel::e2e {

/// Fashion-MNIST as the Debian package installs it.
inline constexpr const char* kData = "/usr/share/datasets/fashion-mnist";

/// The source tree (the Python recorder, examples and checks the tests run).
inline const std::string kSource = PATHKERNEL_SOURCE_DIR;

/// Starts the pathkernel binary with `args`, stdout and stderr to files in `log_dir`, with the
/// environment `env`.
pid_t spawn(const std::vector<std::string>& args, const std::filesystem::path& log_dir, char** env = environ);

/// The child's exit status, or minus the signal that ended it.
int wait_status(pid_t pid);

struct Result {
  int status;
  std::string out, err;
};

/// Runs the binary to its end: status, stdout, stderr.
Result run(const std::vector<std::string>& args, const std::filesystem::path& log_dir);

/// Lines in a file (0 when it does not exist).
int64_t lines_in(const std::filesystem::path& p);

/// Starts a process and SIGKILLs it once `file` has at least `lines` lines (or exists, for 0).
/// Returns true when it was killed, false when it finished first.
bool kill_when(const std::vector<std::string>& args, const std::filesystem::path& log_dir,
               const std::filesystem::path& file, int64_t lines);

/// Runs a program (testing::run_program); fails the test with its output unless it exits 0;
/// returns the output.
std::string run_ok(const std::vector<std::string>& argv, const std::filesystem::path& log);

/// ASCII lower case.
std::string lower(std::string s);

}  // namespace pathkernel::e2e
