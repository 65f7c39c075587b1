// Every input kept for the fuzzers (seeds in tests/fuzz/corpus/, past crashes in
// tests/fuzz/regressions/) goes through its reader in every build: each is accepted or refused
// as bad input, never anything else. Under the sanitizer build (CI) this replays each past
// crash with ASan and UBSan watching.
#include <gtest/gtest.h>

#include <filesystem>

#include "fuzz/readers.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

TEST(FuzzInputsTest, KeptInputsAreAcceptedOrRefusedAsBadInput) {
  const fs::path root = PATHKERNEL_FUZZ_DIR;
  int regressions = 0;
  for (const auto& reader : fuzz::readers()) {
    int seeds = 0;
    for (const char* kind : {"corpus", "regressions"}) {
      const fs::path dir = root / kind / reader.name;
      if (!fs::is_directory(dir)) continue;
      for (const auto& e : fs::directory_iterator(dir)) {
        const std::string bytes = read_file(e.path());
        SCOPED_TRACE(e.path().string());
        reader.read(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
        (std::string(kind) == "corpus" ? seeds : regressions) += 1;
      }
    }
    EXPECT_GT(seeds, 0) << "no seed inputs for the " << reader.name << " fuzzer";
  }
  EXPECT_GE(regressions, 3);
}

}  // namespace
}  // namespace pathkernel
