#pragma once
// Pieces of report.html that read beyond the analysis folder: the run's facts, class names and
// the per-class table. Internal to report.cpp.

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <cmath>
#include <string>
#include <vector>

#include "pathkernel/io/csv.h"

namespace pathkernel::report_detail {

/// Text for HTML: strings from files are data, never markup.
std::string html_text(const std::string& t);

/// Standard base64 of `bytes` (for images embedded in the page).
std::string base64(const std::string& bytes);

/// The run an analysis analyzed, as its summary.json (`summary_file`) identifies it: the
/// absolute path it recorded, if a run is still there and its manifest.json has the SHA-256 the
/// analysis recorded. "" (with a warning) when the run is gone or the analysis is older than
/// these records, so that its facts are left out. Throws InputError when a run is there but is
/// not the one analyzed (its manifest differs): the report would show another run's facts.
std::filesystem::path analyzed_run(const nlohmann::json& summary, const std::filesystem::path& summary_file);

/// The run's facts as HTML table rows (model, parameters, loss, optimizer, learning rate, batch,
/// steps, data, test accuracy, probes), from the analysis summary, its steps table and, when
/// `run` (analyzed_run) is not empty, the run's manifest and summary. Facts that cannot be had
/// are left out rather than guessed.
std::string run_facts_rows(const nlohmann::json& summary, const std::filesystem::path& run, const Table& steps,
                           const std::filesystem::path& steps_file);


/// One probe class: its probes, the means over its probes and outputs of f_N - f_0 and of the
/// summed K (or Kopt), U and R, and the median over steps of r restricted to its probes (|R| / |F|
/// over its probes and outputs).
struct ClassRow {
  int64_t label = 0;
  std::string name;
  int64_t probes = 0;
  double change = 0, k = 0, u = 0, r = 0, median_r = 0;
  /// With the optimizer's split: u is its weight-decay part and this its rounding part; NaN without.
  double u_round = NAN;
};

/// The rows of every class present among the probes, by label. Arrays are [steps, probes, outputs].
std::vector<ClassRow> class_rows(const std::vector<int64_t>& probe_labels, const std::vector<std::string>& names,
                                 const at::Tensor& d, const at::Tensor& f, const at::Tensor& k, const at::Tensor& u,
                                 const at::Tensor& r, const at::Tensor& u_round = {});

/// The rows as an HTML table; `kernel_name` is K or Kopt. Rows with u_round get a column for it
/// (the update term as Uopt_wd and Uopt_round).
std::string class_table_html(const std::vector<ClassRow>& rows, const std::string& kernel_name);

}  // namespace pathkernel::report_detail
