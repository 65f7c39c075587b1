#include "pathkernel/report/report.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <sstream>

#include "pathkernel/io/csv.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/gnuplot.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/trajectory/class_names.h"
#include "pathkernel/trajectory/recorded_run.h"
#include "pathkernel/trajectory/replay.h"
#include "report_parts.h"

namespace pathkernel {
namespace fs = std::filesystem;
using report_detail::html_text;

namespace {

/// The report trusts nothing in the analysis folder that it can check: the tables and arrays
/// must agree in size, and the values it plots or indexes by must be finite.
void check_inputs(const fs::path& in, const Table& steps, const Table& probes, const std::vector<at::Tensor>& arrays,
                  const at::Tensor& outputs) {
  const char* names[] = {"D", "F", "K", "U", "R"};
  const at::Tensor& d = arrays[0];
  if (d.dim() != 3) throw InputError((in / "arrays/D.npy").string() + ": expected 3 dimensions [steps, probes, outputs]");
  for (size_t i = 0; i < arrays.size(); ++i) {
    const fs::path file = in / "arrays" / (std::string(names[i]) + ".npy");
    if (arrays[i].sizes() != d.sizes()) {
      throw InputError(file.string() + ": shape " + c10::str(arrays[i].sizes()) + " differs from D.npy's " +
                       c10::str(d.sizes()));
    }
    if (!at::isfinite(arrays[i]).all().item<bool>()) throw InputError(file.string() + ": holds values that are not finite");
  }
  if (outputs.dim() != 2 || outputs.size(0) != d.size(1) || outputs.size(1) != d.size(2)) {
    throw InputError((in / "arrays/outputs.npy").string() + ": shape " + c10::str(outputs.sizes()) +
                     ", expected [probes, outputs] = [" + std::to_string(d.size(1)) + ", " + std::to_string(d.size(2)) + "]");
  }
  if (static_cast<int64_t>(steps.rows) != d.size(0) || steps.rows == 0) {
    throw InputError(fmt::format("{}: {} rows, the arrays hold {} steps", (in / "steps.csv").string(), steps.rows,
                                 d.size(0)));
  }
  if (static_cast<int64_t>(probes.rows) != d.size(1) * d.size(2)) {
    throw InputError(fmt::format("{}: {} rows, the arrays hold {} probes x {} outputs", (in / "probes.csv").string(),
                                 probes.rows, d.size(1), d.size(2)));
  }
  for (const char* col : {"step", "r", "lr", "in_Tc"}) {
    for (size_t i = 0; i < steps.rows; ++i) {
      const double v = steps.at(col, in / "steps.csv")[i];
      if (!std::isfinite(v) || (std::string(col) == "r" && v < 0)) {
        throw InputError(fmt::format("{}: row {}, column '{}': {} is not a valid value", (in / "steps.csv").string(),
                                     i + 2, col, v));
      }
    }
  }
  for (const char* col : {"probe", "label", "f_initial", "f_final", "sum_K", "sum_U", "sum_R_Tc", "sum_R_other"}) {
    for (size_t i = 0; i < probes.rows; ++i) {
      if (!std::isfinite(probes.at(col, in / "probes.csv")[i])) {
        throw InputError(fmt::format("{}: row {}, column '{}' is not a finite number", (in / "probes.csv").string(),
                                     i + 2, col));
      }
    }
  }
}


/// Renders figure NAME (PNG, SVG, PDF and its .gp script) in DIR and records it.
void figure(const fs::path& out, ReportFiles& files, const std::string& name, const std::string& script) {
  render_gnuplot(out / (name + ".png"), script, /*vector_copies=*/true);
  files.pngs.push_back(name + ".png");
}

/// Writes a plot's data as DIR/data/NAME.csv and records it.
void write_data(const fs::path& out, ReportFiles& files, const std::string& name, const std::string& csv) {
  atomic_write(out / "data" / (name + ".csv"), csv);
  files.csvs.push_back("data/" + name + ".csv");
}

/// What every part of the report reads: the analysis folder's tables, summary and arrays, each
/// checked (check_inputs), and the run it analyzed (empty when that run is not there).
struct Analysis {
  fs::path in;
  Table steps, probes;
  nlohmann::json summary;
  at::Tensor d, f, k, u, r, outputs;
  fs::path run_dir;
};

void check_analysis_files(const fs::path& in) {
  for (const char* f : {"steps.csv", "probes.csv", "summary.json", "arrays/D.npy"}) {
    if (!fs::exists(in / f)) throw InputError((in / f).string() + ": missing (not an analysis directory?)");
  }
}

Analysis read_analysis_folder(const fs::path& in) {
  Analysis a;
  a.in = in;
  a.steps = read_csv(in / "steps.csv");
  a.probes = read_csv(in / "probes.csv");
  a.summary = read_json(in / "summary.json");
  a.d = load_npy(in / "arrays/D.npy"), a.f = load_npy(in / "arrays/F.npy");
  a.k = load_npy(in / "arrays/K.npy"), a.u = load_npy(in / "arrays/U.npy");
  a.r = load_npy(in / "arrays/R.npy"), a.outputs = load_npy(in / "arrays/outputs.npy");
  check_inputs(in, a.steps, a.probes, {a.d, a.f, a.k, a.u, a.r}, a.outputs);
  a.run_dir = report_detail::analyzed_run(a.summary, in / "summary.json");  // this run, or none
  return a;
}

/// The kernel term the analysis sums: Kopt for optimizers with memory or a preconditioner.
bool uses_kopt(const Analysis& a) {
  return a.summary.value("kernel_term", "K") == "Kopt" && a.probes.cols.count("sum_Kopt");
}

/// Figure 1: r per step (log scale), the tau line under rule tau, T_c as ticks in a band below
/// the curve (they never cover it), the learning rate only when it varies.
void plot_r_per_step(const Analysis& a, const fs::path& out, ReportFiles& files) {
  const Table& steps = a.steps;
  const nlohmann::json& summary = a.summary;
  const auto& step = a.steps.at("step", a.in / "steps.csv");
  const auto& rr = a.steps.at("r", a.in / "steps.csv");
  const auto& tc = a.steps.at("in_Tc", a.in / "steps.csv");
  const auto& lr = a.steps.at("lr", a.in / "steps.csv");
  const std::string rule = a.summary["settings"].value("tc_rule", "tau");
  std::string csv = "step,r,in_Tc,lr\n";
  for (size_t i = 0; i < steps.rows; ++i) {
    csv += fmt::format("{},{},{},{}\n", step[i], csv_float(rr[i]), tc[i], csv_float(lr[i]));
  }
  write_data(out, files, "r_per_step", csv);
  if (files.gnuplot) {
    double r_lo = 1e300, r_hi = 0;
    for (double v : rr) {
      if (v > 0) r_lo = std::min(r_lo, v), r_hi = std::max(r_hi, v);
    }
    const double tau = summary["settings"].value("tau", 0.1);
    if (rule == "tau") r_lo = std::min(r_lo, tau), r_hi = std::max(r_hi, tau);
    if (!(r_hi > 0)) r_lo = 1e-3, r_hi = 1;
    const double band = r_lo / 3;  // the T_c ticks' row, below every value of r
    const bool lr_varies = *std::min_element(lr.begin(), lr.end()) != *std::max_element(lr.begin(), lr.end());
    std::string plot = png_header(1000, 450, 10) + fmt::format(
        "set key outside right top\nset xlabel 'step k'\nset ylabel 'r = |R| / |F|'\nset logscale y\n"
        "set yrange [{}:{}]\nset title 'Taylor residual per step: {} of {} steps in T_c (rule {})'\n",
        band / 2, r_hi * 2, static_cast<int64_t>(summary.value("tc_size", 0)), steps.rows, gp_text(rule));
    if (lr_varies) plot += "set y2label 'learning rate'\nset y2tics\nset ytics nomirror\n";
    plot += fmt::format(
        "plot '{}' skip 1 using 1:2 with lines lw 1.5 lc rgb '#3060c0' title 'r', "
        "'' skip 1 using 1:($3 > 0 ? {} : 1/0) with points pt 5 ps 0.35 lc rgb '#d02020' title 'step in T_c'",
        "data/r_per_step.csv", band);
    if (rule == "tau") plot += fmt::format(", {} with lines dt 2 lc rgb '#d02020' title 'tau = {}'", tau, tau);
    if (lr_varies) plot += ", '' skip 1 using 1:4 axes x1y2 with lines lc rgb '#909090' dt 3 title 'learning rate'";
    figure(out, files, "r_per_step", plot + "\n");
  }
}

/// With --second-order: |R|, its second-order part |S| and the rest |R - S| per step.
void plot_second_order(const Analysis& a, const fs::path& out, ReportFiles& files) {
  const fs::path& in = a.in;
  const Table& steps = a.steps;
  const auto& step = a.steps.at("step", a.in / "steps.csv");
  const bool has_s = steps.cols.count("S_norm") && steps.cols.count("higher_norm") &&
                     std::all_of(steps.cols.at("S_norm").begin(), steps.cols.at("S_norm").end(),
                                 [](double v) { return std::isfinite(v); });
  if (has_s) {
    const auto& s_norm = steps.at("S_norm", in / "steps.csv");
    const auto& r_norm = steps.at("R_norm", in / "steps.csv");
    const auto& higher = steps.at("higher_norm", in / "steps.csv");
    std::string csv = "step,R_norm,S_norm,higher_norm\n";
    for (size_t i = 0; i < steps.rows; ++i) {
      csv += fmt::format("{},{},{},{}\n", step[i], csv_float(r_norm[i]), csv_float(s_norm[i]), csv_float(higher[i]));
    }
    write_data(out, files, "second_order", csv);
    if (files.gnuplot) {
      figure(out, files, "second_order", png_header(1000, 420, 10) + fmt::format(
          "set key outside right top\nset xlabel 'step k'\nset ylabel 'norm over probes and outputs'\nset logscale y\n"
          "set title 'The residual and its orders: S = 1/2 dw^T H dw (exact), R - S (third and higher)'\n"
          "plot '{}' skip 1 using 1:2 with lines lw 1.5 lc rgb '#d02020' title '|R|', "
          "'' skip 1 using 1:3 with lines lc rgb '#3060c0' title '|S|', "
          "'' skip 1 using 1:4 with lines lc rgb '#30a030' title '|R - S|'\n",
          "data/second_order.csv"));
    }
  }
}

/// With --sharpness: lambda_max over training against the stability limit 2 / lr, with the
/// steps in T_c marked (issue 13: does T_c gather where lr * lambda_max nears 2?).
void plot_sharpness(const Analysis& a, const fs::path& out, ReportFiles& files) {
  const fs::path& in = a.in;
  const Table& steps = a.steps;
  const auto& step = a.steps.at("step", a.in / "steps.csv");
  const auto& lr = a.steps.at("lr", a.in / "steps.csv");
  if (steps.cols.count("lambda_max_train")) {
    const auto& lt = steps.at("lambda_max_train", in / "steps.csv");
    const auto& lb = steps.at("lambda_max_batch", in / "steps.csv");
    std::string csv = "step,lambda_max_train,lambda_max_batch,two_over_lr\n";
    size_t points = 0;
    for (size_t i = 0; i < steps.rows; ++i) {
      if (std::isnan(lt[i])) continue;
      csv += fmt::format("{},{},{},{}\n", step[i], csv_float(lt[i]), csv_float(lb[i]), csv_float(2.0 / lr[i]));
      ++points;
    }
    if (points > 0) {
      write_data(out, files, "sharpness", csv);
      if (files.gnuplot) {
        figure(out, files, "sharpness", png_header(1000, 450, 10) + fmt::format(
            "set termoption noenhanced\nset key outside right top\nset xlabel 'step k'\n"
            "set ylabel 'top Hessian eigenvalue'\nset yrange [0:*]\n"
            "set title 'Sharpness against the stability limit of gradient descent (lr * lambda_max = 2); T_c marked'\n"
            "plot '{}' skip 1 using 1:2 with linespoints pt 7 ps 0.5 lw 1.5 lc rgb '#3060c0' title 'lambda_max, "
            "training subset', '' skip 1 using 1:3 with points pt 6 ps 0.6 lc rgb '#30a030' title 'lambda_max, batch', "
            "'' skip 1 using 1:4 with lines dt 2 lw 1.5 lc rgb '#d02020' title '2 / lr', "
            "'{}' skip 1 using 1:($3 > 0 ? 0 : 1/0) with points pt 5 ps 0.35 lc rgb '#d02020' title 'step in T_c'\n",
            "data/sharpness.csv", "data/r_per_step.csv"));
      }
    }
  }
}

/// Cumulative sum K, sum U, sum R against the actual change, for a few probes.
void plot_cumulative(const Analysis& a, int64_t max_curves, const fs::path& out, ReportFiles& files) {
  const fs::path& in = a.in;
  const Table& steps = a.steps;
  const Table& probes = a.probes;
  const auto& step = a.steps.at("step", a.in / "steps.csv");
  const at::Tensor& d = a.d;
  const at::Tensor& k = a.k;
  const at::Tensor& u = a.u;
  const at::Tensor& r = a.r;
  const at::Tensor& outputs = a.outputs;
  const int64_t np = d.size(1), nc = d.size(2), curves = std::min<int64_t>(max_curves, np);
  const auto& plabel = probes.at("label", in / "probes.csv");
  const auto& pidx = probes.at("probe", in / "probes.csv");
  std::string csv = "step,probe,output,cum_D,cum_K,cum_U,cum_R\n";
  std::string plots;
  for (int64_t p = 0; p < curves; ++p) {
    // The column of the probe's label when all logits were analyzed, else the one column.
    int64_t col = 0;
    for (int64_t j = 0; j < nc; ++j) {
      if (outputs[p][j].item<int64_t>() == static_cast<int64_t>(plabel[static_cast<size_t>(p * nc)])) col = j;
    }
    const at::Tensor cd = d.select(2, col).select(1, p).cumsum(0), ck = k.select(2, col).select(1, p).cumsum(0);
    const at::Tensor cu = u.select(2, col).select(1, p).cumsum(0), cr = r.select(2, col).select(1, p).cumsum(0);
    for (size_t i = 0; i < steps.rows; ++i) {
      csv += fmt::format("{},{},{},{},{},{},{}\n", step[i], pidx[static_cast<size_t>(p * nc)],
                         outputs[p][col].item<int64_t>(), csv_float(cd[i].item<double>()),
                         csv_float(ck[i].item<double>()), csv_float(cu[i].item<double>()),
                         csv_float(cr[i].item<double>()));
    }
    plots += fmt::format(
        "set title 'probe {}, logit {}'\nplot '{}' skip 1 using ($2=={} && $3=={} ? $1 : 1/0):4 with lines lw 2 lc "
        "rgb 'black' title 'f - f_0', '' skip 1 using ($2=={} && $3=={} ? $1 : 1/0):5 with lines lc rgb '#3060c0' "
        "title 'sum K', '' skip 1 using ($2=={} && $3=={} ? $1 : 1/0):6 with lines lc rgb '#30a030' title 'sum U', "
        "'' skip 1 using ($2=={} && $3=={} ? $1 : 1/0):7 with lines lc rgb '#d02020' title 'sum R'\n",
        pidx[static_cast<size_t>(p * nc)], outputs[p][col].item<int64_t>(), "data/cumulative.csv",
        pidx[static_cast<size_t>(p * nc)], outputs[p][col].item<int64_t>(), pidx[static_cast<size_t>(p * nc)],
        outputs[p][col].item<int64_t>(), pidx[static_cast<size_t>(p * nc)], outputs[p][col].item<int64_t>(),
        pidx[static_cast<size_t>(p * nc)], outputs[p][col].item<int64_t>());
  }
  write_data(out, files, "cumulative", csv);
  if (files.gnuplot) {
    const int cols = curves > 1 ? 2 : 1, rows = static_cast<int>((curves + 1) / 2);
    figure(out, files, "cumulative", png_header(1000, rows * 330 + 40, 9) + fmt::format(
        "set key outside right top\nset xlabel 'step'\nset multiplot layout {},{} title 'Eq. 9 over the run: f - f_0 = "
        "sum K + sum U + sum R'\n{}unset multiplot\n",
        rows, cols, plots));
  }
}

/// D against F for every step and probe: distance from the tangent plane.
void plot_d_vs_f(const Analysis& a, const fs::path& out, ReportFiles& files) {
  const at::Tensor& d = a.d;
  const at::Tensor& f = a.f;
  const at::Tensor dflat = d.reshape({-1}), fflat = f.reshape({-1});
  const int64_t n = dflat.size(0), stride = std::max<int64_t>(1, n / 20000);
  std::string csv = "F,D\n";
  for (int64_t i = 0; i < n; i += stride) {
    csv += fmt::format("{},{}\n", csv_float(fflat[i].item<double>()), csv_float(dflat[i].item<double>()));
  }
  write_data(out, files, "d_vs_f", csv);
  if (files.gnuplot) {
    figure(out, files, "d_vs_f", png_header(600, 560, 10) + fmt::format(
        "set key top left\nset xlabel 'F = g . dw (first order)'\nset ylabel 'D (actual change)'\nset size ratio -1\n"
        "set title 'actual against first-order change (every {}th point)'\n"
        "plot '{}' skip 1 using 1:2 with points pt 7 ps 0.3 lc rgb '#3060c0' title 'step x probe x output', "
        "x with lines lc rgb 'black' dt 2 title 'D = F'\n",
        stride, "data/d_vs_f.csv"));
  }
}

/// Histogram of r (log bins).
void plot_r_histogram(const Analysis& a, const fs::path& out, ReportFiles& files) {
  const auto& rr = a.steps.at("r", a.in / "steps.csv");
  const double share = a.summary.value("share_of_R_norm_in_tc", 0.0);
  std::vector<double> logs;
  for (double v : rr) {
    if (v > 0) logs.push_back(std::log10(v));
  }
  const double lo = logs.empty() ? 0 : std::floor(*std::min_element(logs.begin(), logs.end()) * 4) / 4;
  const double hi = logs.empty() ? 1 : std::ceil(*std::max_element(logs.begin(), logs.end()) * 4) / 4 + 0.25;
  std::vector<int64_t> counts(static_cast<size_t>(std::max(1.0, (hi - lo) * 4)), 0);
  for (double v : logs) counts[std::min(counts.size() - 1, static_cast<size_t>((v - lo) * 4))]++;
  std::string csv = "log10_r_lo,log10_r_hi,steps\n";
  for (size_t i = 0; i < counts.size(); ++i) csv += fmt::format("{},{},{}\n", lo + i * 0.25, lo + (i + 1) * 0.25, counts[i]);
  write_data(out, files, "r_histogram", csv);
  if (files.gnuplot) {
    figure(out, files, "r_histogram", png_header(700, 450, 10) + fmt::format(
        "set xlabel 'log10 r'\nset ylabel 'steps'\nset style fill solid 0.6\nunset key\n"
        "set title 'r = |R|/|F| over steps; share of sum |R| in T_c: {:.1f}%'\n"
        "plot '{}' skip 1 using (($1+$2)/2):3:(0.24) with boxes lc rgb '#3060c0'\n",
        100 * share, "data/r_histogram.csv"));
  }
}

/// For a one-parameter toy run: the loss landscape with the path of w and T_c marked.
void plot_landscape(const Analysis& a, const fs::path& out, ReportFiles& files) {
  const Table& steps = a.steps;
  const fs::path& run_dir = a.run_dir;
  const auto& step = a.steps.at("step", a.in / "steps.csv");
  const auto& tc = a.steps.at("in_Tc", a.in / "steps.csv");
  if (!run_dir.empty() && !is_recorded_run(run_dir)) {
    Replayer replay(run_dir);
    RunContext& ctx = replay.context();
    if (ctx.model->parameters().size() == 1 && ctx.model->parameters()[0].numel() == 1) {
      std::vector<double> path;
      for (size_t i = 0; i < steps.rows; ++i) path.push_back(replay.weights_at(static_cast<int64_t>(step[i]))[0].second.item<double>());
      const double w_end = replay.weights_at(static_cast<int64_t>(step.back()) + 1)[0].second.item<double>();
      const double lo_w = std::min(*std::min_element(path.begin(), path.end()), w_end) - 0.5;
      const double hi_w = std::max(*std::max_element(path.begin(), path.end()), w_end) + 0.5;
      const auto xy = ctx.batch([&] {
        std::vector<int64_t> all(static_cast<size_t>(ctx.train.size()));
        for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
        return all;
      }());
      at::Tensor w = ctx.model->parameters()[0];
      auto loss_at = [&](double v) {
        at::NoGradGuard ng;
        w.fill_(v);
        return batch_loss(ctx.model->forward(xy.first), xy.second, config_loss(ctx.config)).item<double>();
      };
      std::string land = "w,loss\n", pcsv = "step,w,loss,in_Tc\n";
      for (int i = 0; i <= 400; ++i) {
        const double v = lo_w + (hi_w - lo_w) * i / 400.0;
        land += fmt::format("{},{}\n", v, loss_at(v));
      }
      for (size_t i = 0; i < path.size(); ++i) pcsv += fmt::format("{},{},{},{}\n", step[i], path[i], loss_at(path[i]), tc[i]);
      pcsv += fmt::format("{},{},{},0\n", step.back() + 1, w_end, loss_at(w_end));
      write_data(out, files, "landscape", land);
      write_data(out, files, "path", pcsv);
      if (files.gnuplot) {
        figure(out, files, "landscape", png_header(900, 500, 10) + fmt::format(
            "set xlabel 'w'\nset ylabel 'training loss L(w)'\nset key top right\n"
            "set title 'Loss landscape of {} and the path of w (lr {}); T_c steps in red'\n"
            "plot '{}' skip 1 using 1:2 with lines lw 2 lc rgb 'black' title 'L(w)', "
            "'{}' skip 1 using 2:3 with linespoints pt 7 ps 0.7 lc rgb '#3060c0' title 'w_k', "
            "'' skip 1 using 2:($4 > 0 ? $3 : 1/0) with points pt 6 ps 2 lw 2 lc rgb '#d02020' title 'T_c'\n",
            gp_text(ctx.config.model), ctx.config.lr, "data/landscape.csv", "data/path.csv"));
      }
    }
  }
}

/// report.html's head, the run's facts and Eq. 9's terms (from probes.csv).
std::string eq9_html(const Analysis& a, const std::string& analysis) {
  const fs::path& in = a.in;
  const Table& steps = a.steps;
  const Table& probes = a.probes;
  const nlohmann::json& summary = a.summary;
  const fs::path& run_dir = a.run_dir;
  auto mean = [&](const char* col) {
    double s = 0;
    for (double v : probes.at(col, in / "probes.csv")) s += v;
    return s / static_cast<double>(probes.rows);
  };
  auto mean_abs = [&](const char* col) {
    double s = 0;
    for (double v : probes.at(col, in / "probes.csv")) s += std::abs(v);
    return s / static_cast<double>(probes.rows);
  };
  const int64_t np = a.d.size(1), nc = a.d.size(2);
  std::vector<double> change;
  for (size_t i = 0; i < probes.rows; ++i) {
    change.push_back(probes.at("f_final", in / "probes.csv")[i] - probes.at("f_initial", in / "probes.csv")[i]);
  }
  double mc = 0, mac = 0;
  for (double v : change) mc += v / change.size(), mac += std::abs(v) / change.size();
  // The kernel term the analysis sums: Kopt for optimizers with memory or a preconditioner.
  const bool kopt = uses_kopt(a);
  const char* kcol = kopt ? "sum_Kopt" : "sum_K";
  std::string html = fmt::format(
      "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>pathkernel report</title>\n"
      "<style>body{{font-family:sans-serif;max-width:1050px;margin:2em auto}} table{{border-collapse:collapse}} "
      "td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} th{{text-align:left}} img{{max-width:100%}} "
      "figure{{margin:1.5em 0}} figcaption{{font-size:90%;color:#444}}</style></head><body>\n"
      "<h1>pathkernel report</h1>\n<p>Analysis <code>{}</code> of run <code>{}</code>, {} probes x {} outputs, "
      "in float64.</p>\n<h2>Run</h2>\n<table>\n{}</table>\n",
      html_text(analysis), html_text(run_dir.empty() ? summary["settings"].value("run", "") : run_dir.string()), np, nc,
      report_detail::run_facts_rows(summary, run_dir, steps, in / "steps.csv"));
  const std::string kname = kopt ? "Kopt" : "K", uname = kopt ? "Uopt" : "U";
  // With the optimizer's split, its update term in two columns: weight decay, and rounding (what
  // the optimizer's update leaves: float rounding in a verified run).
  const std::vector<std::string> ucols = kopt ? std::vector<std::string>{"sum_Uopt_wd", "sum_Uopt_round"}
                                              : std::vector<std::string>{"sum_U"};
  std::string uhead, umean, uabs;
  for (const auto& col : ucols) {
    uhead += "<th>sum " + col.substr(4) + "</th>";
    umean += fmt::format("<td>{:.4g}</td>", mean(col.c_str()));
    uabs += fmt::format("<td>{:.4g}</td>", mean_abs(col.c_str()));
  }
  html += fmt::format(
      "<h2>Eq. 9: f_N - f_0 = sum {k} + sum {u} + sum R(T_c) + sum R(rest)</h2>\n"
      "<table><tr><th></th><th>f_N - f_0</th><th>sum {k}</th>{uh}<th>sum R(T_c)</th><th>sum R(rest)</th></tr>\n"
      "<tr><th>mean</th><td>{:.4g}</td><td>{:.4g}</td>{um}<td>{:.4g}</td><td>{:.4g}</td></tr>\n"
      "<tr><th>mean |.|</th><td>{:.4g}</td><td>{:.4g}</td>{ua}<td>{:.4g}</td><td>{:.4g}</td></tr></table>\n"
      "<p>Means over probes and outputs of each term summed over the analyzed steps{note}.</p>\n",
      mc, mean(kcol), mean("sum_R_Tc"), mean("sum_R_other"), mac, mean_abs(kcol),
      mean_abs("sum_R_Tc"), mean_abs("sum_R_other"), fmt::arg("k", kname), fmt::arg("u", uname),
      fmt::arg("uh", uhead), fmt::arg("um", umean), fmt::arg("ua", uabs),
      fmt::arg("note", kopt ? "; sum Uopt = sum Uopt_wd (weight decay) + sum Uopt_round (what the optimizer's "
                              "update leaves: float rounding)"
                            : ""));
  return html;
}

/// report.html's summary table (T_c, r's percentiles, the residual's share).
std::string summary_html(const Analysis& a) {
  const nlohmann::json& summary = a.summary;
  const double share = a.summary.value("share_of_R_norm_in_tc", 0.0);
  const std::string rule = a.summary["settings"].value("tc_rule", "tau");
  const auto& pct = summary["r_percentiles"];
  return fmt::format(
      "<h2>Summary</h2><table>\n<tr><th>T_c (rule {})</th><td>{} of {} steps</td></tr>\n"
      "<tr><th>share of sum over steps of |R_k| in T_c</th><td>{:.1f}%</td></tr>\n<tr><th>r percentiles p5 / p50 / p95 / max</th>"
      "<td>{:.3g} / {:.3g} / {:.3g} / {:.3g}</td></tr>\n"
      "<tr><th>sum over probes and outputs of |sum_k R_k|, over the sum of |f_N - f_0|</th><td>{:.3g}</td></tr>\n"
      "<tr><th>steps whose batch loss went up</th><td>{}</td></tr>\n<tr><th>max run identity error</th><td>{}</td></tr>\n"
      "<tr><th>Pearson(r, lr)</th><td>{:.3g}</td></tr></table>\n",
      html_text(rule), static_cast<int64_t>(summary.value("tc_size", 0)), summary.value("steps_analyzed", 0), 100 * share,
      pct.value("p5", 0.0), pct.value("p50", 0.0), pct.value("p95", 0.0), pct.value("max", 0.0),
      summary.value("sum_R_over_change", 0.0), summary.value("steps_with_loss_up", 0),
      summary["max_identity_error"].dump(), summary.value("pearson_r_lr", 0.0));
}

/// report.html's table by probe class (names: --class-names, the run's, or Fashion-MNIST's), and
/// the same as a figure.
std::string by_class_html(const Analysis& a, const ReportConfig& c, const fs::path& out, ReportFiles& files) {
  const fs::path& in = a.in;
  const fs::path& run_dir = a.run_dir;
  const at::Tensor& d = a.d;
  const at::Tensor& f = a.f;
  const at::Tensor& k = a.k;
  const at::Tensor& u = a.u;
  const at::Tensor& r = a.r;
  const int64_t np = d.size(1), nc = d.size(2);
  const auto& plabel = a.probes.at("label", in / "probes.csv");
  const bool kopt = uses_kopt(a);
  const std::string kname = kopt ? "Kopt" : "K", uname = kopt ? "Uopt" : "U";
  std::vector<int64_t> labels;
  int64_t classes = 0;
  for (int64_t p = 0; p < np; ++p) {
    labels.push_back(static_cast<int64_t>(plabel[static_cast<size_t>(p * nc)]));
    classes = std::max(classes, labels.back() + 1);
  }
  const at::Tensor kk = kopt ? load_npy(in / "arrays/Kopt.npy") : k;
  // With the optimizer's split: decay and rounding in columns of their own.
  const at::Tensor uu = kopt ? load_npy(in / "arrays/Uopt_wd.npy") : u;
  const at::Tensor ur = kopt ? load_npy(in / "arrays/Uopt_round.npy") : at::Tensor();
  if (kk.sizes() != d.sizes() || uu.sizes() != d.sizes() || (ur.defined() && ur.sizes() != d.sizes())) {
    throw InputError(c.analysis + ": Kopt/Uopt arrays differ in shape from D");
  }
  const auto rows = report_detail::class_rows(
      labels, class_names(run_dir, classes, c.class_names_file), d, f, kk, uu, r, ur);
  std::string html = "<h2>By probe class</h2>\n" + report_detail::class_table_html(rows, kname);
  // The same as a figure: the Eq. 9 terms by class as bars, r by class as points. Names go
  // into the data file (read as text by gnuplot, never as code), without CSV separators.
  std::string csv = "label,name,change,sum_K,sum_U,sum_R,median_r\n";
  for (const auto& row : rows) {
    std::string name = row.name;
    for (char& ch : name) {
      if (ch == ',' || ch == '"' || ch == '\n' || ch == '\r') ch = ' ';
    }
    csv += fmt::format("{},\"{}\",{},{},{},{},{}\n", row.label, name, csv_float(row.change), csv_float(row.k),
                       csv_float(row.u + (std::isnan(row.u_round) ? 0.0 : row.u_round)), csv_float(row.r),
                       csv_float(row.median_r));
  }
  write_data(out, files, "by_class", csv);
  if (files.gnuplot) {
    figure(out, files, "by_class", png_header(1000, 450, 10) + fmt::format(
        "set key outside right top\nset style data histograms\nset style histogram clustered gap 1\n"
        "set style fill solid 0.7 border -1\nset ylabel 'mean over the class (summed over steps)'\n"
        "set y2label 'median r'\nset y2tics\nset ytics nomirror\nset xtics rotate by -30 noenhanced\n"
        "set title 'Eq. 9 by probe class: f_N - f_0 = sum {} + sum {} + sum R'\n"
        "plot '{}' skip 1 using 3:xtic(2) lc rgb 'black' title 'f_N - f_0', '' skip 1 using 4 lc rgb '#3060c0' "
        "title 'sum {}', '' skip 1 using 5 lc rgb '#30a030' title 'sum {}', '' skip 1 using 6 lc rgb '#d02020' "
        "title 'sum R', '' skip 1 using 0:7 axes x1y2 with points pt 7 ps 1.2 lc rgb '#e08000' title 'median r'\n",
        kname, uname, "data/by_class.csv", kname, uname));
  }
  return html;
}

/// report.html's figures (embedded) and the links to the plot data.
std::string figures_html(const fs::path& out, const ReportFiles& files) {
  std::string html;
  if (files.gnuplot) {
    html += "<h2>Figures</h2>\n";
    for (const auto& png : files.pngs) {
      // Embedded, so the page stands alone; the PNG, SVG and PDF files are beside it.
      const std::string stem = fs::path(png).stem().string();
      html += fmt::format(
          "<figure><img src='data:image/png;base64,{}' alt='{}'><figcaption>{} (<a href='{}'>PNG</a>, "
          "<a href='{}.svg'>SVG</a>, <a href='{}.pdf'>PDF</a>, <a href='{}.gp'>gnuplot script</a>)</figcaption></figure>\n",
          report_detail::base64(read_file(out / png)), html_text(png), html_text(stem), html_text(png), html_text(stem),
          html_text(stem), html_text(stem));
    }
  } else {
    html += "<p><b>gnuplot was not found</b> (apt-get install gnuplot-nox): no plots; their data is in data/.</p>\n";
  }
  html += "<p>Plot data: ";
  for (const auto& f2 : files.csvs) html += fmt::format("<a href='{}'>{}</a> ", f2, f2);
  // Once the page has loaded, it notes how many of its pictures decoded (the browser test reads
  // it); no data from any file reaches this script.
  html += "</p>\n<script>window.addEventListener('load', function () { var n = 0, ok = 0; "
          "for (var i = 0; i < document.images.length; ++i) { ++n; var im = document.images[i]; "
          "if (im.complete && im.naturalWidth > 0) ++ok; } "
          "document.body.setAttribute('data-images-loaded', ok + '/' + n); });</script>\n</body></html>\n";
  return html;
}

}  // namespace

ReportFiles write_report(const ReportConfig& c) {
  c.validate();
  check_output_dir(c.out, c.force, "report.html");  // before anything is read
  // Made now, so that an --out that another process writes while this one runs is seen at commit.
  StagedOutput staged(c.out);
  const fs::path in(c.analysis);
  check_analysis_files(in);
  if (fs::weakly_canonical(c.out) == fs::weakly_canonical(in)) {
    throw InputError(c.out + ": is the analysis itself; give the report its own folder");
  }
  const Analysis a = read_analysis_folder(in);
  const fs::path out = staged.path();
  fs::create_directories(out / "data");
  ReportFiles files;
  files.gnuplot = gnuplot_available();
  if (!files.gnuplot) {
    spdlog::warn("gnuplot not found (apt-get install gnuplot-nox): writing the plot data as CSV, no PNGs");
  }
  // The figures, in the page's order; each writes its data (data/NAME.csv) and, with gnuplot, its
  // picture.
  plot_r_per_step(a, out, files);
  plot_second_order(a, out, files);
  plot_sharpness(a, out, files);
  plot_cumulative(a, c.curves, out, files);
  plot_d_vs_f(a, out, files);
  plot_r_histogram(a, out, files);
  plot_landscape(a, out, files);
  // report.html: the run, Eq. 9 (from probes.csv), the summary, the classes, the figures.
  std::string html = eq9_html(a, c.analysis);
  html += summary_html(a);
  html += by_class_html(a, c, out, files);
  html += figures_html(out, files);
  atomic_write(out / "report.html", html);
  staged.commit();
  files.html = (fs::path(c.out) / "report.html").string();
  return files;
}

}  // namespace pathkernel
