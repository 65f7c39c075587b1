#include "pathkernel/run_dir.h"

#include <cstdio>
#include <sstream>

#include "pathkernel/errors.h"
#include "pathkernel/fs_util.h"

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

}  // namespace

fs::path RunDir::checkpoint(int64_t step) const { return checkpoints_dir() / (step_name(step) + ".pt"); }
fs::path RunDir::state(int64_t step) const { return checkpoints_dir() / (step_name(step) + ".state.pt"); }
bool RunDir::complete() const { return fs::exists(complete_marker()); }

nlohmann::json RunDir::read_manifest() const {
  if (!fs::is_directory(root_)) throw InputError(root_.string() + ": no such run directory");
  if (!fs::exists(manifest())) throw InputError(manifest().string() + ": missing (not a pathkernel run directory?)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(manifest()));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(manifest().string() + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object() || j.value("format", "") != kRunFormat) {
    throw InputError(manifest().string() + ": not a " + std::string(kRunFormat) + " manifest");
  }
  return j;
}

std::vector<int64_t> RunDir::checkpoint_steps() const {
  std::vector<int64_t> steps;
  if (!fs::is_directory(checkpoints_dir())) return steps;
  for (const auto& e : fs::directory_iterator(checkpoints_dir())) {
    const std::string n = e.path().filename().string();
    long long s = 0;
    char tail[8] = {0};
    // step_XXXXXXXX.pt exactly: temporary files (.pt.tmp-PID) and state files do not match.
    if (n.size() == 16 && std::sscanf(n.c_str(), "step_%8lld.%2s", &s, tail) == 2 &&
        std::string(tail) == "pt" && fs::exists(state(s))) {
      steps.push_back(s);
    }
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

std::vector<nlohmann::json> read_step_log(const fs::path& path) {
  std::vector<nlohmann::json> out;
  if (!fs::exists(path)) return out;
  const std::string text = read_file(path);
  std::istringstream in(text);
  std::string line;
  int64_t lineno = 0;
  const bool ends_clean = text.empty() || text.back() == '\n';
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      if (!ends_clean && in.peek() == EOF) break;  // the crash-cut last line
      throw InputError(path.string() + ":" + std::to_string(lineno) + ": not valid JSON");
    }
    if (!j.contains("step") || j["step"].get<int64_t>() != static_cast<int64_t>(out.size())) {
      throw InputError(path.string() + ":" + std::to_string(lineno) + ": expected step " +
                       std::to_string(out.size()));
    }
    out.push_back(std::move(j));
  }
  return out;
}

void truncate_step_log(const fs::path& path, int64_t step) {
  if (!fs::exists(path)) return;
  const auto records = read_step_log(path);
  std::string text;
  for (const auto& r : records) {
    if (r["step"].get<int64_t>() < step) text += r.dump() + "\n";
  }
  atomic_write(path, text);
}

}  // namespace pathkernel
