#pragma once
// Test helpers: temporary folders, tiny synthetic IDX data sets, and error-message assertions.

#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace pathkernel::testing {

/// A fresh temporary directory, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

/// Big-endian IDX bytes for `dims` and `data`, optionally with a wrong magic/type or cut short.
std::string idx_bytes(const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data);

/// Writes bytes to a file, gzip-compressed when `gz`.
void write_file(const std::filesystem::path& path, const std::string& bytes, bool gz);

/// Writes a learnable synthetic MNIST-style folder: `n_train`/`n_test` images of size x size,
/// `classes` classes, each class a different bright square on noise. Standard file names.
void write_synthetic_idx(const std::filesystem::path& dir, int n_train, int n_test, int size = 12,
                         int classes = 3, bool gz = true);

/// Runs argv[0] (an absolute path) with its arguments, no shell, stdout and stderr to `log`,
/// in the working folder `cwd` (when given); returns its exit status (-signal when killed).
/// `cpu_seconds` (when given) receives the user + system CPU time the program used.
int run_program(const std::vector<std::string>& argv, const std::filesystem::path& log,
                const std::filesystem::path& cwd = {}, double* cpu_seconds = nullptr);

}  // namespace pathkernel::testing

/// Asserts that `stmt` throws `type` whose what() contains `substring`.
#define EXPECT_THROW_WITH(stmt, type, substring)                                         \
  do {                                                                                   \
    try {                                                                                \
      stmt;                                                                              \
      ADD_FAILURE() << "expected " #type " containing '" << (substring) << "'";          \
    } catch (const type& e) {                                                            \
      EXPECT_NE(std::string(e.what()).find(substring), std::string::npos) << e.what();   \
    }                                                                                    \
  } while (0)
