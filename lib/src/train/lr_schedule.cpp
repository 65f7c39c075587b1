#include "pathkernel/train/lr_schedule.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace {

double parse_double(const std::string& spec, const std::string& s) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || s.empty() || !std::isfinite(v)) {
    throw InputError("--lr-schedule '" + spec + "': '" + s + "' is not a number");
  }
  return v;
}

int64_t parse_count(const std::string& spec, const std::string& s) {
  const double v = parse_double(spec, s);
  if (v < 1 || v != std::floor(v) || v > 1e15) {
    throw InputError("--lr-schedule '" + spec + "': '" + s + "' is not a positive integer up to 10^15");
  }
  return static_cast<int64_t>(v);
}

std::vector<std::string> fields(const std::string& s) {
  std::vector<std::string> out;
  std::string f;
  std::istringstream in(s);
  while (std::getline(in, f, ':')) out.push_back(f);
  return out;
}

}  // namespace

LrSchedule::LrSchedule(const std::string& spec, double base_lr, int64_t total_steps, const std::string& base_dir)
    : spec_(spec), base_(base_lr), total_(total_steps) {
  if (!(base_lr > 0) || !std::isfinite(base_lr)) {
    throw InputError("--lr must be a positive number, got " + std::to_string(base_lr));
  }
  std::string rest = spec.empty() ? "constant" : spec;
  if (rest.rfind("warmup:", 0) == 0) {
    const size_t plus = rest.find('+');
    const std::string w = rest.substr(7, plus == std::string::npos ? std::string::npos : plus - 7);
    warmup_ = parse_count(spec, w);
    rest = plus == std::string::npos ? "constant" : rest.substr(plus + 1);
  }
  if (rest.rfind("file:", 0) == 0) {
    kind_ = "file";
    std::string path = rest.substr(5);
    if (!base_dir.empty() && !path.empty() && path[0] != '/') path = base_dir + "/" + path;
    // A regular file of at most 64 MiB (millions of rates); its text is never echoed in an error,
    // so naming a file that is not a schedule (a secret, say) reveals nothing of it.
    std::istringstream in(read_file(path, int64_t{64} << 20));
    std::string line;
    int64_t lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      const size_t hash = line.find('#');
      if (hash != std::string::npos) line.resize(hash);
      const size_t a = line.find_first_not_of(" \t\r"), b = line.find_last_not_of(" \t\r");
      if (a == std::string::npos) continue;
      const std::string word = line.substr(a, b - a + 1);
      char* end = nullptr;
      const double v = std::strtod(word.c_str(), &end);
      if (end != word.c_str() + word.size() || !std::isfinite(v)) {
        throw InputError(path + ":" + std::to_string(lineno) + ": not a learning rate (one number per line)");
      }
      if (!(v > 0)) throw InputError(path + ":" + std::to_string(lineno) + ": learning rate must be positive");
      table_.push_back(v);
    }
    if (static_cast<int64_t>(table_.size()) < total_steps) {
      throw InputError(path + ": has " + std::to_string(table_.size()) + " learning rates, the run needs " +
                       std::to_string(total_steps));
    }
    check_rates();
    return;
  }
  const auto f = fields(rest);
  kind_ = f.empty() ? "" : f[0];
  if (kind_ == "constant" && f.size() == 1) {
    check_rates();
    return;
  }
  if (kind_ == "step" && f.size() == 3) {
    every_ = parse_count(spec, f[1]);
    gamma_ = parse_double(spec, f[2]);
    if (!(gamma_ > 0)) throw InputError("--lr-schedule '" + spec + "': GAMMA must be positive");
    check_rates();
    return;
  }
  if (kind_ == "cosine" && f.size() <= 2) {
    lr_min_ = f.size() == 2 ? parse_double(spec, f[1]) : 0.0;
    if (lr_min_ < 0 || lr_min_ > base_) throw InputError("--lr-schedule '" + spec + "': LR_MIN must be in [0, --lr]");
    check_rates();
    return;
  }
  throw InputError("--lr-schedule '" + spec +
                   "': expected [warmup:W+]constant | step:EVERY:GAMMA | cosine[:LR_MIN] | file:PATH");
}

// Every step's rate must be a finite normal positive number: a decay that underflows to zero (or to
// a subnormal) or a growth that overflows would train on nonsense rates without a word. Each step
// is checked up to a million steps; beyond, the schedule's extremes: the warm-up's ends and the
// run's first and last steps (every schedule here is monotone between them).
void LrSchedule::check_rates() const {
  const auto check = [&](int64_t k) {
    const double v = at(k);
    if (!std::isfinite(v) || v < std::numeric_limits<double>::min()) {
      std::ostringstream what;
      what << "--lr-schedule '" << spec_ << "' with --lr " << base_ << ": the rate of step " << k << " is " << v
           << ", not a finite positive number (the schedule under- or overflows)";
      throw InputError(what.str());
    }
  };
  if (total_ <= 1000000) {
    for (int64_t k = 0; k < total_; ++k) check(k);
    return;
  }
  for (const int64_t k : {int64_t{0}, warmup_ - 1, warmup_, total_ - 1}) {
    if (k >= 0 && k < total_) check(k);
  }
}

double LrSchedule::at(int64_t step) const {
  double lr = base_;
  if (kind_ == "file") {
    lr = table_.at(static_cast<size_t>(step));
  } else if (kind_ == "step") {
    lr = base_ * std::pow(gamma_, static_cast<double>(step / every_));
  } else if (kind_ == "cosine") {
    const double t = total_ > 0 ? static_cast<double>(step) / static_cast<double>(total_) : 0.0;
    lr = lr_min_ + (base_ - lr_min_) * 0.5 * (1.0 + std::cos(M_PI * t));
  }
  if (step < warmup_) lr *= static_cast<double>(step + 1) / static_cast<double>(warmup_);
  return lr;
}

}  // namespace pathkernel
