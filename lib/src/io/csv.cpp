#include "pathkernel/io/csv.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <sstream>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace fs = std::filesystem;

const std::vector<double>& Table::at(const std::string& name, const fs::path& file) const {
  auto it = cols.find(name);
  if (it == cols.end()) throw InputError(file.string() + ": no column '" + name + "'");
  return it->second;
}

Table read_csv(const fs::path& path) {
  std::istringstream in(read_file(path));
  std::string line;
  if (!std::getline(in, line)) throw InputError(path.string() + ": empty");
  std::vector<std::string> names;
  for (std::stringstream ss(line); std::getline(ss, line, ',');) names.push_back(line);
  Table t;
  for (const auto& n : names) {
    if (n.empty() || !t.cols.emplace(n, std::vector<double>{}).second) {
      throw InputError(path.string() + ": header has an empty or repeated column name '" + n.substr(0, 40) + "'");
    }
  }
  while (std::getline(in, line)) {
    const size_t row = t.rows + 2;  // 1-based, after the header
    size_t start = 0, col = 0;
    for (;; ++col) {
      const size_t end = line.find(',', start);
      const std::string cell = line.substr(start, end == std::string::npos ? std::string::npos : end - start);
      if (col >= names.size()) throw InputError(fmt::format("{}: row {} has more cells than the header", path.string(), row));
      double v = NAN;
      if (!cell.empty()) {
        char* stop = nullptr;
        v = std::strtod(cell.c_str(), &stop);
        if (stop != cell.c_str() + cell.size()) {
          throw InputError(fmt::format("{}: row {}, column '{}': '{}' is not a number", path.string(), row,
                                       names[col], cell.substr(0, 40)));
        }
      }
      t.cols[names[col]].push_back(v);
      if (end == std::string::npos) break;
      start = end + 1;
    }
    if (col + 1 != names.size()) {
      throw InputError(fmt::format("{}: row {} has {} cells, the header {}", path.string(), row, col + 1, names.size()));
    }
    ++t.rows;
  }
  return t;
}

std::string csv_float(double v) {
  std::string s = fmt::format("{}", v);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // n: nan and inf stay as they are
  return s;
}

}  // namespace pathkernel
