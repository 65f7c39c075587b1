#pragma once
/// \file report.h
/// `pathkernel report ANALYSIS --out DIR`: plots of an analysis (through gnuplot) and an HTML
/// page with them, the summary numbers and the Eq. 9 table. The data behind every plot is
/// written as CSV too, so that without gnuplot nothing but the pictures is missing.

#include <string>
#include <vector>

namespace pathkernel {

struct ReportConfig {
  std::string analysis;      ///< a directory written by `pathkernel analyze`
  std::string out;           ///< report directory (must not exist or be empty unless force)
  int64_t curves = 4;        ///< probes whose cumulative sums are plotted
  /// One class name per line (class 0 first); default: Fashion-MNIST's names for its data,
  /// "class K" otherwise.
  std::string class_names_file;
  bool force = false;
  void validate() const;
};

/// What was written.
struct ReportFiles {
  std::vector<std::string> pngs, csvs;
  std::string html;
  bool gnuplot = false;
};

/// Reads the analysis, writes CSVs, PNGs (when gnuplot is there) and report.html. Throws
/// InputError for a missing or malformed analysis.
ReportFiles write_report(const ReportConfig& config);

}  // namespace pathkernel
