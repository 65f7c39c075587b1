#include "pathkernel/report/sweep.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>

#include "pathkernel/io/csv.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/gnuplot.h"
#include "pathkernel/io/idx.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/trainer.h"

namespace pathkernel {
namespace fs = std::filesystem;

namespace {

/// A sweep continues only runs it made itself: a run in its folder trained with other settings
/// (another model, optimizer, batch, data...) would be compared as if it were one of its rates.
void check_same_settings(const RunDir& run, TrainConfig wanted) {
  if (!is_synthetic(wanted.data_dir)) wanted.data_dir = fs::absolute(wanted.data_dir).lexically_normal().string();
  const nlohmann::json have = to_json(train_config_from_json(run.read_manifest().at("config"), run.manifest().string()));
  const nlohmann::json want = to_json(wanted);
  for (const auto& [key, value] : want.items()) {
    if (key == "out" || key == "lr_schedule") continue;  // where it is; a file schedule is the run's copy
    if (have.contains(key) && have[key] != value) {
      throw InputError(run.root().string() + ": was trained with " + key + " = " + have[key].dump() +
                       ", this sweep asks for " + value.dump() + "; give the sweep another --out");
    }
  }
}

/// Likewise an analysis it finds: it must have the sweep's analysis settings.
void check_same_analysis(const fs::path& summary_file, const nlohmann::json& summary, const AnalyzeConfig& a) {
  const nlohmann::json& s = summary.at("settings");
  const std::vector<std::pair<const char*, nlohmann::json>> want = {
      {"probes", a.probes},      {"split", a.split},           {"outputs", a.outputs},
      {"every", a.every},        {"second_order", a.second_order}, {"exact_nodes", a.exact_nodes},
      {"tc_rule", a.tc_rule},    {"tau", a.tau}};
  for (const auto& [key, value] : want) {
    if (s.contains(key) && s[key] != value) {
      throw InputError(summary_file.string() + ": an analysis with " + key + " = " + s[key].dump() +
                       ", this sweep asks for " + value.dump() + "; give the sweep another --out");
    }
  }
}

/// The run at rate lr in DIR/run: reused when complete or diverged, resumed when cut short,
/// else trained (a divergence ends it and is kept).
void ensure_run(const SweepConfig& c, const TrainConfig& t, const RunDir& run, const fs::path& dir) {
  const double lr = t.lr;
  if (fs::exists(run.manifest())) check_same_settings(run, t);
  if (run.complete()) {
    spdlog::info("lr {}: reusing the complete run {}", lr, t.out);
  } else if (fs::exists(run.manifest())) {
    if (fs::exists(run.summary()) &&
        read_json(run.summary()).value("status", "") == "diverged") {
      spdlog::info("lr {}: reusing the diverged run {}", lr, t.out);
    } else {
      spdlog::info("lr {}: resuming {}", lr, t.out);
      resume(t.out, c.command_line);
    }
  } else {
    spdlog::info("lr {}: training into {}", lr, t.out);
    fs::create_directories(dir);
    try {
      train(t, c.command_line + fmt::format(" [lr {}]", lr));
    } catch (const DivergenceError& e) {
      spdlog::warn("lr {}: {}", lr, e.what());
    }
  }
}

/// The analysis of the run at rate lr in DIR/analysis (reused when there, with the same
/// settings), its numbers into row.
void analyze_rate(const SweepConfig& c, const RunDir& run, const TrainConfig& t, const fs::path& dir, SweepRow& row) {
  AnalyzeConfig a = c.analysis;
  a.run = t.out;
  a.out = (dir / "analysis").string();
  nlohmann::json as;
  if (fs::exists(fs::path(a.out) / "summary.json")) {
    as = read_json(fs::path(a.out) / "summary.json");
    check_same_analysis(fs::path(a.out) / "summary.json", as, a);
  } else if (read_step_log(run.steps_log()).empty()) {
    spdlog::warn("lr {}: diverged at its first step; nothing to analyze", t.lr);
  } else {
    spdlog::info("lr {}: analyzing", t.lr);
    const AnalysisResult res = analyze(a);
    write_analysis(res, a);
    as = read_json(fs::path(a.out) / "summary.json");
  }
  if (!as.is_null()) {
    row.steps = as.value("steps_analyzed", int64_t{0});
    row.median_r = as["r_percentiles"].value("p50", 0.0);
    row.tc_share_steps = row.steps ? static_cast<double>(as.value("tc_size", int64_t{0})) / row.steps : 0.0;
    row.tc_share_r = as.value("share_of_R_norm_in_tc", 0.0);
    row.sum_r_over_change = as.value("sum_R_over_change", 0.0);
  }
}

/// sweep.csv and sweep.png (with gnuplot).
void write_sweep(const SweepConfig& c, const std::vector<SweepRow>& rows) {
  std::string csv = "lr,status,steps,test_accuracy,median_r,tc_share_steps,tc_share_R,sum_R_over_change\n";
  for (const auto& r : rows) {
    csv += fmt::format("{},{},{},{},{},{},{},{}\n", csv_float(r.lr), r.status, r.steps,
                       std::isnan(r.test_accuracy) ? std::string() : csv_float(r.test_accuracy), csv_float(r.median_r),
                       csv_float(r.tc_share_steps), csv_float(r.tc_share_r), csv_float(r.sum_r_over_change));
  }
  atomic_write(fs::path(c.out) / "sweep.csv", csv);
  if (gnuplot_available()) {
    render_gnuplot(fs::path(c.out) / "sweep.png", png_header(900, 520, 10) + fmt::format(
        "set logscale xy\nset format y '10^{{%L}}'\nset format x '10^{{%L}}'\nset xlabel 'learning rate'\n"
        "set key top left\nset grid\nset title 'Kernel picture against learning rate ({})'\nset y2tics\nset y2range [0:1]\nset ytics nomirror\n"
        "set y2label 'test accuracy'\n"
        "plot '{}' skip 1 using 1:($5>0?$5:1/0) with linespoints pt 7 lc rgb '#3060c0' title 'median r = |R|/|F|', "
        "'' skip 1 using 1:($8>0?$8:1/0) with linespoints pt 5 lc rgb '#d02020' title '|sum R| / |f_N - f_0|', "
        "'' skip 1 using 1:($6>0?$6:1/0) with linespoints pt 9 lc rgb '#30a030' title 'share of steps in T_c', "
        "'' skip 1 using 1:4 axes x1y2 with linespoints pt 4 dt 2 lc rgb '#808080' title 'test accuracy'\n",
        gp_text(c.train.model + (c.train.optimizer == "sgd" ? "" : ", " + c.train.optimizer)), "sweep.csv"));
  } else {
    spdlog::warn("gnuplot not found (apt-get install gnuplot-nox): sweep.csv written, no sweep.png");
  }
}

}  // namespace

std::vector<SweepRow> sweep(const SweepConfig& c) {
  c.validate();
  fs::create_directories(c.out);
  std::vector<SweepRow> rows;
  for (double lr : c.lrs) {
    const fs::path dir = fs::path(c.out) / fmt::format("lr_{}", lr);
    TrainConfig t = c.train;
    t.lr = lr;
    t.out = (dir / "run").string();
    SweepRow row;
    row.lr = lr;
    const RunDir run(t.out);
    ensure_run(c, t, run, dir);
    const auto summary = read_json(run.summary());
    row.status = summary.value("status", "");
    row.test_accuracy = summary["test_accuracy"].is_number() ? summary["test_accuracy"].get<double>() : NAN;
    analyze_rate(c, run, t, dir, row);
    rows.push_back(row);
  }
  write_sweep(c, rows);
  return rows;
}

std::string sweep_table(const std::vector<SweepRow>& rows) {
  std::string s = "  lr        status     steps  test acc  median r   T_c steps  R in T_c  |sum R|/|f_N-f_0|\n";
  for (const auto& r : rows) {
    s += fmt::format("  {:<9.3g} {:<10} {:>5}  {:>8}  {:<9.3g}  {:>8.1f}%  {:>7.1f}%  {:.3g}\n", r.lr, r.status,
                     r.steps, std::isnan(r.test_accuracy) ? "-" : fmt::format("{:.4f}", r.test_accuracy), r.median_r,
                     100 * r.tc_share_steps, 100 * r.tc_share_r, r.sum_r_over_change);
  }
  return s;
}

}  // namespace pathkernel
