#pragma once
// Shared by the libFuzzer harnesses: a reader may refuse an input only the way the tool's main()
// turns into exit status 2 (InputError, or a JSON error naming the file); any other exception
// escapes the harness and libFuzzer reports it, as it reports a crash or a sanitizer finding.
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "pathkernel/io/errors.h"

namespace pathkernel::fuzz {

// A file of this process's own scratch folder (in $TMPDIR), rewritten with the input each time.
inline std::filesystem::path scratch(const char* name, const uint8_t* data, size_t size) {
  static const std::filesystem::path dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    auto d = std::filesystem::path(tmp && *tmp ? tmp : "/tmp") / ("pathkernel-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  const auto path = dir / name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  return path;
}

template <class F>
void refuse_only_as_bad_input(F&& read) {
  try {
    read();
  } catch (const InputError&) {
  } catch (const nlohmann::json::exception&) {
  }
}

}  // namespace pathkernel::fuzz
