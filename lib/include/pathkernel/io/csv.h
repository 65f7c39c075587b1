#pragma once
/// \file csv.h
/// The numeric CSV tables that analyze writes (steps.csv, probes.csv), read back strictly.

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace pathkernel {

/// A CSV with a header row, as columns by name (numbers; empty cells become NaN).
struct Table {
  std::map<std::string, std::vector<double>> cols;
  size_t rows = 0;
  /// The column `name`. Throws InputError naming `file` when there is none.
  const std::vector<double>& at(const std::string& name, const std::filesystem::path& file) const;
};

/// Reads a CSV written by write_analysis. Every cell must be empty or a number, every row must
/// have the header's number of cells, and header names must be distinct and non-empty; anything
/// else throws InputError naming the file, row and column.
Table read_csv(const std::filesystem::path& path);

/// A float cell: the shortest text that reads back to `v` exactly, always with a decimal point or
/// an exponent ("0.0", not "0"), so that a float column never looks like an integer column.
std::string csv_float(double v);

}  // namespace pathkernel
