#include "pathkernel/io/run_dir.h"

#include <zlib.h>

#include <algorithm>
#include <cstdio>

#include <cstdio>
#include <sstream>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"

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
fs::path RunDir::digest(int64_t step) const { return checkpoints_dir() / (step_name(step) + ".crc32"); }

namespace {

std::string crc_of(const fs::path& p) {
  const std::string bytes = read_file(p);
  uLong crc = crc32(0L, Z_NULL, 0);
  size_t off = 0;
  while (off < bytes.size()) {  // zlib takes lengths as uInt
    const size_t n = std::min<size_t>(bytes.size() - off, 1u << 30);
    crc = crc32(crc, reinterpret_cast<const Bytef*>(bytes.data() + off), static_cast<uInt>(n));
    off += n;
  }
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%08lx", static_cast<unsigned long>(crc));
  return buf;
}

}  // namespace

void RunDir::write_digest(int64_t step, const std::string& extra) const {
  atomic_write(digest(step),
               "weights " + crc_of(checkpoint(step)) + "\nstate " + crc_of(state(step)) + "\n" + extra,
               /*durable=*/false);
}

void RunDir::check_digest(int64_t step) const {
  if (!fs::exists(digest(step))) return;
  const std::string expect = read_file(digest(step));
  for (const auto& [key, file] : {std::pair{"weights ", checkpoint(step)}, {"state ", state(step)}}) {
    const size_t pos = expect.find(key);
    if (pos == std::string::npos) throw InputError(digest(step).string() + ": malformed (no '" + std::string(key) + "')");
    if (expect.compare(pos + std::string(key).size(), 8, crc_of(file)) != 0) {
      throw InputError(file.string() + ": does not match its digest in " + digest(step).string() +
                       " (the file was changed or damaged after it was written)");
    }
  }
}
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
  if (j.is_object() && j.value("format", "") == "pathkernel-recorded-run/1") {
    throw InputError(root_.string() + ": a run recorded with python/pathkernel_record.py; analyze, explain "
                     "and report read such runs; replay cannot (a recorded run is not replayed, its weights are stored)");
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
    // An integer first: get<int64_t> of a float such as 1e41 is undefined behaviour.
    if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer() ||
        j["step"].get<int64_t>() != static_cast<int64_t>(out.size())) {
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

void check_step_records(const std::vector<nlohmann::json>& log, int64_t n, int64_t batch, const std::string& file) {
  for (size_t k = 0; k < log.size(); ++k) {
    const std::string where = file + ":" + std::to_string(k + 1) + ": ";
    try {
      const double lr = log[k].at("lr").get<double>();
      if (!(lr > 0) || !std::isfinite(lr)) throw InputError(where + "learning rate " + log[k].at("lr").dump());
      const auto& b = log[k].at("batch");
      if (!b.is_array() || b.empty() || static_cast<int64_t>(b.size()) > batch) {
        throw InputError(where + "the batch must hold 1 to " + std::to_string(batch) + " indices");
      }
      for (const auto& i : b) {
        if (!i.is_number_integer() || i.get<int64_t>() < 0 || i.get<int64_t>() >= n) {
          throw InputError(where + "batch index " + i.dump() + " is outside the training set (0.." +
                           std::to_string(n - 1) + ")");
        }
      }
      if (!log[k].at("loss").is_number()) throw InputError(where + "no loss");
    } catch (const nlohmann::json::exception& e) {
      throw InputError(where + "malformed record (" + std::string(e.what()) + ")");
    }
  }
}

bool fresh_run_dir(const fs::path& root) {
  if (!fs::exists(root)) return true;
  if (!fs::is_directory(root)) return false;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string name = e.path().filename().string();
    if (name == ".lock") continue;
    if (name == "checkpoints" && fs::is_directory(e.path()) && fs::is_empty(e.path())) continue;
    return false;
  }
  return true;
}

void check_new_run_dir(const fs::path& root) {
  if (!fresh_run_dir(root)) {
    throw InputError(root.string() + " already exists and is not empty; choose another --out, or " +
                     "continue it with --resume " + root.string());
  }
  std::error_code ec;
  if (!fs::exists(root, ec)) check_output_dir(root, /*force=*/false, "manifest.json");  // creatable?
}

}  // namespace pathkernel
