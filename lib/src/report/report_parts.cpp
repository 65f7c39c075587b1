#include "report_parts.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <map>

#include "pathkernel/io/errors.h"
#include <spdlog/spdlog.h>
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/sha256.h"
#include "pathkernel/trajectory/recorded_run.h"

namespace pathkernel::report_detail {
namespace fs = std::filesystem;

std::string html_text(const std::string& t) {
  std::string out;
  for (const char c : t) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string base64(const std::string& bytes) {
  static const char* digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (size_t i = 0; i < bytes.size(); i += 3) {
    uint32_t v = static_cast<uint8_t>(bytes[i]) << 16;
    if (i + 1 < bytes.size()) v |= static_cast<uint8_t>(bytes[i + 1]) << 8;
    if (i + 2 < bytes.size()) v |= static_cast<uint8_t>(bytes[i + 2]);
    out += digits[(v >> 18) & 63];
    out += digits[(v >> 12) & 63];
    out += i + 1 < bytes.size() ? digits[(v >> 6) & 63] : '=';
    out += i + 2 < bytes.size() ? digits[v & 63] : '=';
  }
  return out;
}

namespace {

std::string row(const std::string& name, const std::string& value) {
  return "<tr><th>" + html_text(name) + "</th><td>" + html_text(value) + "</td></tr>\n";
}

/// The run's manifest (and summary), when the run directory the analysis names is readable.
struct RunFiles {
  nlohmann::json manifest, summary;
  bool recorded = false;
};

RunFiles read_run(const fs::path& run) {
  RunFiles r;
  try {
    if (run.empty() || !fs::exists(run / "manifest.json")) return r;
    r.manifest = read_json(run / "manifest.json");
    r.recorded = r.manifest.value("format", "") == kRecordedRunFormat;
    if (fs::exists(run / "summary.json")) r.summary = read_json(run / "summary.json");
    // A recorded run's COMPLETE marker holds its final test accuracy (python/pathkernel_record.py).
    if (r.recorded && fs::exists(run / "COMPLETE")) r.summary = read_json(run / "COMPLETE");
  } catch (const InputError&) {
    r.manifest = nlohmann::json();  // the facts are optional: the analysis itself was checked
  }
  return r;
}

}  // namespace

fs::path analyzed_run(const nlohmann::json& summary, const fs::path& summary_file) {
  const nlohmann::json id = summary.value("run", nlohmann::json());
  const std::string path = id.is_object() ? id.value("path", "") : "";
  if (path.empty()) {
    spdlog::warn("{}: made before analyses recorded their run's identity; the run's facts are left out",
                 summary_file.string());
    return {};
  }
  std::error_code ec;
  if (!fs::is_regular_file(fs::path(path) / "manifest.json", ec)) {
    spdlog::warn("{}: the run it analyzed ({}) is not there any more; its facts are left out", summary_file.string(), path);
    return {};
  }
  if (sha256_file(fs::path(path) / "manifest.json") != id.value("manifest_sha256", "")) {
    throw InputError(summary_file.string() + ": the run at " + path + " is not the one this analysis analyzed (its "
                     "manifest.json's SHA-256 differs from the one recorded); the report would show another run's facts");
  }
  return path;
}

std::string run_facts_rows(const nlohmann::json& summary, const fs::path& run_dir, const Table& steps,
                           const fs::path& steps_file) {
  const RunFiles run = read_run(run_dir);
  const nlohmann::json& m = run.manifest;
  std::string s;
  const std::string model = summary.value("model", m.is_object() && !run.recorded ? m["model"].value("spec", "") : "");
  if (!model.empty()) s += row("model", model + (model == "torchscript" ? " (the run's own model.pt)" : ""));
  try {
    if (m.is_object() && !run.recorded && m["model"].contains("num_parameters")) {
      s += row("parameters", fmt::format("{}", m["model"]["num_parameters"].get<int64_t>()));
    } else if (m.is_object() && run.recorded) {
      int64_t n = 0;
      for (const auto& p : m["model"]["parameters"]) {
        int64_t e = 1;
        for (const auto& d : p.at(1)) e *= d.get<int64_t>();
        n += e;
      }
      s += row("parameters", fmt::format("{}", n));
    }
    if (m.is_object()) s += row("loss", m.value("loss", "") == "mse" ? "mean squared error" : "cross-entropy");
    if (m.is_object() && !run.recorded) {
      const auto& c = m["config"];
      std::string opt = c.value("optimizer", "sgd");
      if (opt == "sgd" && c.value("momentum", 0.0) > 0) {
        opt += fmt::format(", momentum {}{}", c.value("momentum", 0.0), c.value("nesterov", false) ? " (Nesterov)" : "");
      }
      if (opt != "sgd" && c.contains("betas")) opt += fmt::format(", betas {}", c["betas"].dump());
      if (c.value("weight_decay", 0.0) > 0) opt += fmt::format(", weight decay {}", c.value("weight_decay", 0.0));
      s += row("optimizer", opt);
      s += row("learning-rate schedule", fmt::format("{} (base {})", c.value("lr_schedule", "constant"), c.value("lr", 0.0)));
      s += row("batch", fmt::format("{}", c.value("batch", 0)));
      s += row("data", fmt::format("{} ({} training examples)", c.value("data_dir", ""),
                                   m["data"].value("train_examples", int64_t{0})));
      s += row("steps trained", fmt::format("{}", m.value("total_steps", int64_t{0})));
    } else if (m.is_object()) {
      const auto& g = m["optimizer"]["param_groups"].at(0);
      std::string opt = m["optimizer"].value("name", "");
      if (g.contains("momentum") && g["momentum"].get<double>() > 0) {
        opt += fmt::format(", momentum {}{}", g["momentum"].get<double>(), g.value("nesterov", false) ? " (Nesterov)" : "");
      }
      if (g.contains("betas")) opt += ", betas " + g["betas"].dump();
      if (g.value("weight_decay", 0.0) > 0) opt += fmt::format(", weight decay {}", g.value("weight_decay", 0.0));
      s += row("optimizer", opt + " (torch.optim, recorded)");
      s += row("data", fmt::format("recorded inputs {} ({} training examples)", m["data"]["train"]["input_shape"].dump(),
                                   m["data"]["train"].value("examples", int64_t{0})));
    }
  } catch (const nlohmann::json::exception&) {
    // A manifest of another version: the facts it has are shown, the analysis stands on its own.
  }
  const auto& lr = steps.at("lr", steps_file);
  const auto [lo, hi] = std::minmax_element(lr.begin(), lr.end());
  // Four significant digits: a scheduler's rates (0.0040000000000000036) read as what they are.
  s += row("learning rate in the analyzed steps", *lo == *hi ? fmt::format("{:.4g} (constant)", *lo)
                                                             : fmt::format("{:.4g} to {:.4g}", *lo, *hi));
  s += row("analyzed steps", fmt::format("{} ({}..{})", summary.value("steps_analyzed", 0), summary.value("first_step", 0),
                                         summary.value("last_step", 0)));
  const nlohmann::json id = summary.value("run", nlohmann::json());
  if (id.is_object() && id.contains("complete") && id["complete"].is_boolean() && !id["complete"].get<bool>()) {
    s += row("run", "not complete when analyzed (no COMPLETE marker): its training was interrupted or was still "
                    "running; the analysis covers the steps logged then");
  }
  if (run.summary.is_object() && run.summary.contains("test_accuracy") && run.summary["test_accuracy"].is_number()) {
    s += row("test accuracy at the end", fmt::format("{:.4f}", run.summary["test_accuracy"].get<double>()));
  }
  const auto& st = summary.at("settings");
  s += row("probes", fmt::format("{} from the {} split{}, outputs: {}", st.value("probes", 0), st.value("split", ""),
                                 st.value("balanced", false) ? " (balanced by class)" : "", st.value("outputs", "")));
  s += row("optimizer (as analyzed)", summary.value("optimizer", "") + ", kernel term " + summary.value("kernel_term", "K") +
                                          ", " + summary.value("kernel_route_used", "") + " route");
  return s;
}

std::vector<ClassRow> class_rows(const std::vector<int64_t>& probe_labels, const std::vector<std::string>& names,
                                 const at::Tensor& d, const at::Tensor& f, const at::Tensor& k, const at::Tensor& u,
                                 const at::Tensor& r, const at::Tensor& u_round) {
  std::map<int64_t, std::vector<int64_t>> by_class;
  for (size_t p = 0; p < probe_labels.size(); ++p) by_class[probe_labels[p]].push_back(static_cast<int64_t>(p));
  std::vector<ClassRow> rows;
  for (const auto& [label, members] : by_class) {
    const at::Tensor idx = at::tensor(members, at::kLong);
    auto sel = [&](const at::Tensor& a) { return a.index_select(1, idx); };
    // r restricted to the class: per step, |R| / |F| over its probes and outputs.
    const at::Tensor rk = sel(r).flatten(1).norm(2, 1) / sel(f).flatten(1).norm(2, 1).clamp_min(1e-300);
    ClassRow row;
    row.label = label;
    row.name = label >= 0 && label < static_cast<int64_t>(names.size()) ? names[static_cast<size_t>(label)]
                                                                          : fmt::format("class {}", label);
    row.probes = static_cast<int64_t>(members.size());
    row.change = sel(d).sum(0).mean().item<double>();
    row.k = sel(k).sum(0).mean().item<double>();
    row.u = sel(u).sum(0).mean().item<double>();
    if (u_round.defined()) row.u_round = sel(u_round).sum(0).mean().item<double>();
    row.r = sel(r).sum(0).mean().item<double>();
    row.median_r = rk.median().item<double>();
    rows.push_back(row);
  }
  return rows;
}

std::string class_table_html(const std::vector<ClassRow>& rows, const std::string& kernel_name) {
  const bool split = !rows.empty() && !std::isnan(rows.front().u_round);
  std::string s = fmt::format(
      "<table><tr><th>class</th><th>probes</th><th>mean f_N - f_0</th><th>mean sum {}</th>{}"
      "<th>mean sum R</th><th>median over steps of r</th></tr>\n",
      html_text(kernel_name),
      split ? "<th>mean sum Uopt_wd</th><th>mean sum Uopt_round</th>" : "<th>mean sum U</th>");
  for (const auto& c : rows) {
    const std::string u = split ? fmt::format("<td>{:.4g}</td><td>{:.4g}</td>", c.u, c.u_round) : fmt::format("<td>{:.4g}</td>", c.u);
    s += fmt::format("<tr><th>{} ({})</th><td>{}</td><td>{:.4g}</td><td>{:.4g}</td>{}<td>{:.4g}</td><td>{:.3g}</td></tr>\n",
                     html_text(c.name), c.label, c.probes, c.change, c.k, u, c.r, c.median_r);
  }
  return s + "</table>\n";
}

}  // namespace pathkernel::report_detail
