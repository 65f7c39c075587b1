// The class names reports and explanations show (class_names.h).
#include "pathkernel/trajectory/class_names.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <sstream>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/trajectory/recorded_run.h"

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

struct RunManifest {
  nlohmann::json manifest;
  bool recorded = false;
};

}  // namespace

std::vector<std::string> class_names(const fs::path& run_dir, int64_t classes, const std::string& names_file) {
  std::vector<std::string> names;
  if (!names_file.empty()) {
    std::istringstream in(read_file(names_file, int64_t{1} << 20));  // regular files only
    for (std::string line; std::getline(in, line) && static_cast<int64_t>(names.size()) < classes;) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      names.push_back(line.substr(0, 60));
    }
    if (static_cast<int64_t>(names.size()) < classes) {
      throw InputError(fmt::format("{}: {} names, the run has {} classes (one name per line)", names_file, names.size(),
                                   classes));
    }
    return names;
  }
  RunManifest run;
  try {
    if (!run_dir.empty() && fs::exists(run_dir / "manifest.json")) {
      run.manifest = read_json(run_dir / "manifest.json");
      run.recorded = run.manifest.value("format", "") == kRecordedRunFormat;
    }
  } catch (const InputError&) {
    run.manifest = nlohmann::json();  // the names are optional: fall back to the defaults
  }
  // A recorded run's own class names (Recorder(classes=...) or its dataset's `classes`), when they
  // name every class; the reader checked them.
  if (run.recorded && run.manifest.contains("classes") && run.manifest["classes"].is_array() &&
      static_cast<int64_t>(run.manifest["classes"].size()) == classes) {
    for (const auto& n : run.manifest["classes"]) names.push_back(n.is_string() ? n.get<std::string>().substr(0, 60) : "");
    if (std::none_of(names.begin(), names.end(), [](const std::string& n) { return n.empty(); })) return names;
    names.clear();
  }
  std::string data;
  if (run.manifest.is_object() && !run.recorded) data = run.manifest["config"].value("data_dir", "");
  std::transform(data.begin(), data.end(), data.begin(), [](unsigned char c) { return std::tolower(c); });
  if (classes == 10 && data.find("fashion") != std::string::npos) {
    return {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};
  }
  for (int64_t c = 0; c < classes; ++c) names.push_back(fmt::format("class {}", c));
  return names;
}

}  // namespace pathkernel
