#pragma once
// Pieces of report.html that read beyond the analysis folder: the run's facts, class names and
// the per-class table. Internal to report.cpp.

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "pathkernel/csv.h"

namespace pathkernel::report_detail {

/// Text for HTML: strings from files are data, never markup.
std::string html_text(const std::string& t);

/// Standard base64 of `bytes` (for images embedded in the page).
std::string base64(const std::string& bytes);

/// The run's facts as HTML table rows (model, parameters, loss, optimizer, learning rate, batch,
/// steps, data, test accuracy, probes), from the analysis summary, its steps table and, when the
/// run directory named in the summary is there, the run's manifest and summary. Facts that
/// cannot be had are left out rather than guessed.
std::string run_facts_rows(const nlohmann::json& summary, const Table& steps, const std::filesystem::path& steps_file);

/// Names of classes 0..classes-1: one per line from `names_file` when given; Fashion-MNIST's ten
/// names when the run's data is Fashion-MNIST (its folder name says so); else "class K".
/// Throws InputError naming the file when it is unreadable or has fewer names than classes.
std::vector<std::string> class_names(const nlohmann::json& summary, int64_t classes, const std::string& names_file);

/// Per probe class: probes, the mean of f_N - f_0, sum K (or Kopt), sum U, sum R over the class's
/// probes and outputs, and the median over steps of r restricted to the class's probes
/// (|R| / |F| over its probes and outputs). Arrays are [steps, probes, outputs].
std::string class_table_html(const std::vector<int64_t>& probe_labels, const std::vector<std::string>& names,
                             const at::Tensor& d, const at::Tensor& f, const at::Tensor& k, const at::Tensor& u,
                             const at::Tensor& r, const std::string& kernel_name);

}  // namespace pathkernel::report_detail
