#include "pathkernel/io/blas_core.h"

#include <fstream>
#include <set>
#include <sstream>

namespace pathkernel {

std::string best_core_for_flags(const std::string& cpu_flags) {
  std::set<std::string> f;
  std::istringstream in(cpu_flags);
  for (std::string w; in >> w;) f.insert(w);
  auto has = [&](std::initializer_list<const char*> names) {
    for (const char* n : names) {
      if (!f.count(n)) return false;
    }
    return true;
  };
  if (has({"avx512f", "avx512dq", "avx512bw", "avx512vl"})) return "SkylakeX";
  if (has({"avx2", "fma"})) return "Haswell";
  if (has({"avx"})) return "SandyBridge";
  return "";
}

bool is_generic_core(const std::string& core) {
  static const std::set<std::string> generic = {"Prescott", "Core2",   "Penryn",    "Dunnington",
                                                "Nehalem",  "Atom",    "Opteron",   "Opteron_SSE3",
                                                "Barcelona", "Katmai", "Coppermine", "Northwood"};
  return generic.count(core) > 0;
}

BlasCoreChoice choose_blas_core(const char* env_core, bool keep, const std::string& run_core,
                                const std::string& detected, const std::string& cpu_flags) {
  if (env_core) return {"", "environment"};
  if (keep) return {"", "keep"};
  if (detected.empty()) return {"", "not OpenBLAS"};
  if (!run_core.empty()) return {run_core == detected ? "" : run_core, "run"};
  if (is_generic_core(detected)) {
    const std::string best = best_core_for_flags(cpu_flags);
    if (!best.empty()) return {best, "cpu"};
  }
  return {"", "detected"};
}

std::string read_cpu_flags() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("flags", 0) == 0) {
      const size_t colon = line.find(':');
      return colon == std::string::npos ? "" : line.substr(colon + 1);
    }
  }
  return "";
}

}  // namespace pathkernel
