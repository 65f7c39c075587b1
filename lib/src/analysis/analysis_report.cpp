// Writing an analysis: steps.csv, probes.csv, summary.json, arrays/*.npy, and the Eq. 9 table.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/step_verification.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"

namespace pathkernel {
namespace fs = std::filesystem;
namespace {

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

double pearson(const std::vector<double>& a, const std::vector<double>& b) {
  const size_t n = a.size();
  if (n < 2) return 0;
  double ma = 0, mb = 0;
  for (size_t i = 0; i < n; ++i) ma += a[i] / n, mb += b[i] / n;
  double sab = 0, saa = 0, sbb = 0;
  for (size_t i = 0; i < n; ++i) {
    sab += (a[i] - ma) * (b[i] - mb);
    saa += (a[i] - ma) * (a[i] - ma);
    sbb += (b[i] - mb) * (b[i] - mb);
  }
  return saa > 0 && sbb > 0 ? sab / std::sqrt(saa * sbb) : 0.0;  // 0 when one side is constant
}

/// [steps] mask of T_c, as float64 [steps, 1, 1] for broadcasting over [steps, P, C].
at::Tensor tc_mask(const AnalysisResult& r) {
  std::vector<double> m;
  for (const auto& s : r.steps) m.push_back(s.in_tc ? 1.0 : 0.0);
  return at::tensor(m, at::kDouble).reshape({-1, 1, 1});
}

std::string g(double v) { return csv_float(v); }
/// A cell computed on some steps only (the signals of issue 13): empty where it was not.
std::string opt(double v) { return std::isnan(v) ? "" : csv_float(v); }

/// sharpness.csv: the steps where lambda_max was computed.
std::string sharpness_csv(const AnalysisResult& r) {
  std::string s =
      "step,lr,lambda_max_train,lambda_max_batch,lr_times_lambda,iterations,residual,subset_loss_before,"
      "subset_loss_after,subset_loss_up\n";
  for (const auto& x : r.steps) {
    if (std::isnan(x.lambda_train)) continue;
    s += fmt::format("{},{},{},{},{},{},{},{},{},{}\n", x.step, g(x.lr), g(x.lambda_train), g(x.lambda_batch),
                     g(x.lr * x.lambda_train), g(x.lanczos_iterations), g(x.lanczos_residual), g(x.subset_loss_before),
                     g(x.subset_loss_after), x.subset_loss_after > x.subset_loss_before ? 1 : 0);
  }
  return s;
}

std::string steps_csv(const AnalysisResult& r, bool second) {
  std::string s =
      "step,lr,batch_loss_before,batch_loss_after,loss_went_up,grad_norm,update_norm,D_norm,F_norm,K_norm,U_norm,"
      "U_round_norm,U_wd_norm,U_mom_norm,R_norm,S_norm,higher_norm,r,in_Tc,Kexact_norm,quad_error,"
      "Kopt_norm,Uopt_wd_norm,Uopt_round_norm,grad_cos_prev,kinks_probes,kinks_batch,kink_pieces,lambda_max_train,"
      "lambda_max_batch,lr_times_lambda,lanczos_iterations,lanczos_residual,subset_loss_before,subset_loss_after,"
      "verified,verify_loss_error,verify_gradient_error";
  // Columns of terms added through AnalyzeConfig::extra_terms (step_terms.h), after these.
  if (!r.steps.empty()) {
    for (const auto& [name, v] : r.steps.front().extra) s += "," + name;
  }
  s += "\n";
  const bool exact = r.kexact.defined();
  for (const auto& x : r.steps) {
    s += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", x.step, g(x.lr),
                     g(x.loss_before), g(x.loss_after), x.loss_up ? 1 : 0, g(x.grad_norm), g(x.update_norm),
                     g(x.d_norm), g(x.f_norm), g(x.k_norm), g(x.u_norm), g(x.u_round_norm), g(x.u_wd_norm),
                     g(x.u_mom_norm), g(x.r_norm), second ? g(x.s_norm) : "", second ? g(x.higher_norm) : "", g(x.r),
                     x.in_tc ? 1 : 0, exact ? g(x.kexact_norm) : "", exact ? g(x.quad_error) : "", g(x.kopt_norm),
                     g(x.uopt_wd_norm), g(x.uopt_round_norm), opt(x.grad_cos), opt(x.kinks_probes),
                     opt(x.kinks_batch), opt(x.kink_pieces), opt(x.lambda_train), opt(x.lambda_batch),
                     opt(x.lr * x.lambda_train), opt(x.lanczos_iterations), opt(x.lanczos_residual),
                     opt(x.subset_loss_before), opt(x.subset_loss_after),
                     x.verified < 0 ? std::string() : std::to_string(x.verified), opt(x.verify_loss_error),
                     opt(x.verify_gradient_error));
    if (!x.extra.empty()) {
      s.pop_back();  // the row's newline, after its extra columns
      for (const auto& [name, v] : x.extra) s += "," + opt(v);
      s += "\n";
    }
  }
  return s;
}

std::string probes_csv(const AnalysisResult& r, bool second) {
  const at::Tensor mask = tc_mask(r);
  const at::Tensor sum_k = r.k.sum(0), sum_u = r.u.sum(0);
  const at::Tensor sum_r_tc = (r.r * mask).sum(0), sum_r_other = (r.r * (1 - mask)).sum(0);
  const at::Tensor sum_s = second ? r.s.sum(0) : at::zeros_like(sum_k);
  const at::Tensor ident = r.f_final - r.f_initial - (sum_k + sum_u + sum_r_tc + sum_r_other);
  const at::Tensor sum_kopt = r.kopt.sum(0), sum_uwd = r.uopt_wd.sum(0), sum_uround = r.uopt_round.sum(0);
  std::string s =
      "probe,label,output,f_initial,f_final,sum_K,sum_U,sum_R_Tc,sum_R_other,sum_S,identity_error,sum_Kopt,"
      "sum_Uopt_wd,sum_Uopt_round\n";
  for (int64_t p = 0; p < r.k.size(1); ++p) {
    for (int64_t c = 0; c < r.k.size(2); ++c) {
      s += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", r.probe_indices[p], r.probe_labels[p],
                       r.outputs[p][c].item<int64_t>(), g(r.f_initial[p][c].item<double>()),
                       g(r.f_final[p][c].item<double>()), g(sum_k[p][c].item<double>()), g(sum_u[p][c].item<double>()),
                       g(sum_r_tc[p][c].item<double>()), g(sum_r_other[p][c].item<double>()),
                       second ? g(sum_s[p][c].item<double>()) : "",
                       r.contiguous ? g(ident[p][c].item<double>()) : "", g(sum_kopt[p][c].item<double>()),
                       g(sum_uwd[p][c].item<double>()), g(sum_uround[p][c].item<double>()));
    }
  }
  return s;
}

/// T_c by both rules with the configured parameters, for comparing them after the fact: the
/// number of steps and their share of sum |R| (norms over probes and outputs).
nlohmann::json tc_by_rule(const AnalysisResult& r, const AnalyzeConfig& c) {
  nlohmann::json out;
  for (const char* rule : {"tau", "outlier"}) {
    AnalyzeConfig rc = c;
    rc.tc_rule = rule;
    std::vector<StepRow> steps = r.steps;
    mark_complex_steps(steps, rc);
    int64_t n = 0;
    double in = 0, all = 0;
    for (const auto& s : steps) {
      all += s.r_norm;
      if (s.in_tc) in += s.r_norm, ++n;
    }
    out[rule] = {{"tc_size", n}, {"share_of_R_norm_in_tc", all > 0 ? in / all : 0.0}};
  }
  return out;
}

}  // namespace

nlohmann::json analysis_settings(const AnalyzeConfig& c, int64_t probes) {
  return {{"run", c.run}, {"probes", probes}, {"balanced", c.balanced},
          {"probe_indices_file", c.probe_indices_file}, {"split", c.split},
          {"outputs", c.outputs}, {"step_begin", c.step_begin}, {"step_end", c.step_end},
          {"every", c.every}, {"second_order", c.second_order}, {"exact_nodes", c.exact_nodes},
          {"kernel_route", c.kernel_route}, {"products", c.products}, {"tc_rule", c.tc_rule},
          {"tau", c.tau}, {"tc_window", c.tc_window}, {"tc_kappa", c.tc_kappa},
          {"identity_tolerance", c.identity_tolerance}, {"check_every", c.check_every},
          {"threads", c.threads}, {"kinks", c.kink_split}, {"kinks_examples", c.kinks_examples},
          {"kinks_max", c.kinks_max}, {"allow_unverified", c.allow_unverified},
          {"sharpness_every", c.sharpness_every},
          {"sharpness_examples", c.sharpness_examples}, {"sharpness_iterations", c.sharpness_iterations}};
}

namespace {

nlohmann::json summary_json(const AnalysisResult& r, const AnalyzeConfig& c) {
  std::vector<double> rs, lrs;
  double r_tc = 0, r_all = 0;
  int64_t tc = 0, up = 0;
  for (const auto& s : r.steps) {
    rs.push_back(s.r);
    lrs.push_back(s.lr);
    r_all += s.r_norm;
    if (s.in_tc) r_tc += s.r_norm, ++tc;
    up += s.loss_up;
  }
  nlohmann::json settings = analysis_settings(c, static_cast<int64_t>(r.probe_indices.size()));
  // What was used: a run with fewer training examples than asked for gives all it has.
  if (c.sharpness_every > 0 && r.sharpness_examples > 0) settings["sharpness_examples"] = r.sharpness_examples;
  return {{"format", kAnalysisFormat},
          {"steps_analyzed", static_cast<int64_t>(r.steps.size())},
          {"first_step", r.steps.front().step},
          {"last_step", r.steps.back().step},
          {"tc_size", tc},
          {"tc_steps", [&] {
             std::vector<int64_t> v;
             for (const auto& s : r.steps) if (s.in_tc) v.push_back(s.step);
             return v;
           }()},
          {"share_of_R_norm_in_tc", r_all > 0 ? r_tc / r_all : 0.0},
          {"tc_by_rule", tc_by_rule(r, c)},
          {"steps_with_loss_up", up},
          {"r_percentiles", {{"p5", percentile(rs, 0.05)}, {"p25", percentile(rs, 0.25)}, {"p50", percentile(rs, 0.5)},
                             {"p75", percentile(rs, 0.75)}, {"p95", percentile(rs, 0.95)}, {"max", percentile(rs, 1.0)}}},
          {"pearson_r_lr", pearson(rs, lrs)},
          {"mean_abs_change", (r.f_final - r.f_initial).abs().mean().item<double>()},
          {"mean_abs_sum_K", r.k.sum(0).abs().mean().item<double>()},
          {"mean_abs_sum_U", r.u.sum(0).abs().mean().item<double>()},
          {"mean_abs_sum_R", r.r.sum(0).abs().mean().item<double>()},
          {"optimizer", r.optimizer},
          {"loss", r.loss},
          {"model", r.model},
          {"kernel_route_used", r.route},
          {"kernel_route_reason", r.route_reason},
          {"products_used", r.products},
          {"products_reason", r.products_why},
          {"probe_rows_used", r.rows_used},
          {"kernel_term", r.uses_kopt ? "Kopt" : "K"},
          {"mean_abs_sum_Kopt", r.kopt.sum(0).abs().mean().item<double>()},
          {"mean_abs_sum_Uopt_wd", r.uopt_wd.sum(0).abs().mean().item<double>()},
          {"mean_abs_sum_Uopt_round", r.uopt_round.sum(0).abs().mean().item<double>()},
          {"sum_R_over_change", r.r.sum(0).abs().sum().item<double>() /
                                    std::max(1e-300, (r.f_final - r.f_initial).abs().sum().item<double>())},
          {"identity_applies", r.contiguous},
          {"max_identity_error", r.contiguous ? nlohmann::json(r.identity_error) : nlohmann::json(nullptr)},
          {"max_kernel_split_error", r.kernel_split_error},
          {"kernel_split_checked_steps", r.kernel_split_checked},
          {"max_quad_error", [&] {
             if (!r.kexact.defined()) return nlohmann::json(nullptr);
             double m = 0;
             for (const auto& s : r.steps) m = std::max(m, s.quad_error);
             return nlohmann::json(m);
           }()},
          {"quad_error_rel", r.kexact.defined() ? nlohmann::json(r.quad_error_rel) : nlohmann::json(nullptr)},
          {"smooth_model", r.smooth},
          {"kinks_skipped_steps", c.kink_split ? nlohmann::json(r.kinks_skipped) : nlohmann::json(nullptr)},
          {"seconds", r.seconds},
          {"seconds_per_step", r.seconds / static_cast<double>(r.steps.size())},
          {"startup_seconds", r.startup_seconds},
          {"threads", r.threads},
          {"blas", r.blas},
          {"blas_core", r.blas_core},
          {"run", {{"path", r.run_path}, {"manifest_sha256", r.run_manifest_sha256}, {"complete", r.run_complete}}},
          {"verification", r.verified_steps < 0
                               ? nlohmann::json(nullptr)
                               : nlohmann::json{{"steps_checked", r.verified_steps},
                                                {"steps_failed", r.unverified_steps},
                                                {"steps_verified_in_float32", r.float32_steps},
                                                {"loss_tolerance", kLossTolerance},
                                                {"gradient_tolerance", kGradientTolerance}}},
          {"shard", r.shard_count > 0 ? nlohmann::json{{"index", r.shard_index}, {"count", r.shard_count},
                                                       {"whole_begin", r.whole_begin}, {"whole_end", r.whole_end}}
                                     : nlohmann::json(nullptr)},
          {"settings", settings}};
}

}  // namespace

void write_analysis(const AnalysisResult& r, const AnalyzeConfig& c) {
  if (!is_partial_analysis(c.out)) check_output_dir(c.out, c.force, "summary.json", kAnalysisFormat);
  // Written beside --out and moved into place when complete: a failure leaves nothing, and
  // --force leaves no stale file of an earlier analysis.
  StagedOutput staged(c.out);
  const fs::path out = staged.path();
  fs::create_directories(out / "arrays");
  const bool second = r.s.defined();
  save_npy(out / "arrays" / "D.npy", r.d);
  save_npy(out / "arrays" / "F.npy", r.f);
  save_npy(out / "arrays" / "K.npy", r.k);
  save_npy(out / "arrays" / "U.npy", r.u);
  save_npy(out / "arrays" / "R.npy", r.r);
  save_npy(out / "arrays" / "Kopt.npy", r.kopt);
  save_npy(out / "arrays" / "Uopt_wd.npy", r.uopt_wd);
  save_npy(out / "arrays" / "Uopt_round.npy", r.uopt_round);
  if (second) save_npy(out / "arrays" / "S.npy", r.s);
  if (r.u_stats.defined()) save_npy(out / "arrays" / "U_stats.npy", r.u_stats);
  if (r.kexact.defined()) {
    save_npy(out / "arrays" / "Kexact.npy", r.kexact);
    save_npy(out / "arrays" / "Uexact.npy", r.uexact);
    if (r.koptexact.defined()) {
      save_npy(out / "arrays" / "Koptexact.npy", r.koptexact);
      save_npy(out / "arrays" / "Uoptexact.npy", r.uoptexact);
    }
  }
  save_npy(out / "arrays" / "outputs.npy", r.outputs);
  // The other coordinates of the arrays' axes: each step, and each probe's index and label.
  std::vector<int64_t> step_of;
  for (const auto& s : r.steps) step_of.push_back(s.step);
  save_npy(out / "arrays" / "step.npy", at::tensor(step_of, at::kLong));
  save_npy(out / "arrays" / "probe.npy", at::tensor(r.probe_indices, at::kLong));
  save_npy(out / "arrays" / "label.npy", at::tensor(r.probe_labels, at::kLong));
  atomic_write(out / "steps.csv", steps_csv(r, second));
  atomic_write(out / "probes.csv", probes_csv(r, second));
  if (c.sharpness_every > 0) atomic_write(out / "sharpness.csv", sharpness_csv(r));
  atomic_write(out / "summary.json", summary_json(r, c).dump(2) + "\n");
  staged.commit();
}

std::string eq9_footer(const AnalysisResult& r, const AnalyzeConfig& c, int64_t tc);

/// Eq. 9 with the optimizer's kernel term, for optimizers with memory or a preconditioner.
std::string eq9_table_kopt(const AnalysisResult& r, const AnalyzeConfig& c, int64_t tc) {
  const at::Tensor mask = tc_mask(r);
  auto mean = [](const at::Tensor& t) { return t.mean().item<double>(); };
  auto mean_abs = [](const at::Tensor& t) { return t.abs().mean().item<double>(); };
  const at::Tensor total = r.f_final - r.f_initial;
  const at::Tensor sk = r.kopt.sum(0), sw = r.uopt_wd.sum(0), so = r.uopt_round.sum(0);
  const at::Tensor srt = (r.r * mask).sum(0), sro = (r.r * (1 - mask)).sum(0);
  std::string s = fmt::format(
      "steps {}..{} of {} ({} analyzed), {} probes x {} outputs, in float64, optimizer {}\n\n"
      "  f_N - f_0  =  sum Kopt   +  sum Uopt_wd + sum Uopt_round + sum R(T_c) + sum R(rest)\n"
      "  {:<+10.4g} =  {:<+10.4g} +  {:<+10.4g} +  {:<+10.4g}   +  {:<+10.4g} +  {:<+10.4g}   mean over probes and outputs\n"
      "  {:<10.4g}    {:<10.4g}    {:<10.4g}    {:<10.4g}      {:<10.4g}    {:<10.4g}   mean absolute value\n"
      "  (the note's Eq. 7 kernel term alone, sum K: mean {:+.4g}, mean absolute {:.4g}; the rest of the update, "
      "sum U: {:+.4g})\n\n",
      r.steps.front().step, r.steps.back().step, c.run, r.steps.size(), r.k.size(1), r.k.size(2), r.optimizer,
      mean(total), mean(sk), mean(sw), mean(so), mean(srt), mean(sro), mean_abs(total), mean_abs(sk), mean_abs(sw),
      mean_abs(so), mean_abs(srt), mean_abs(sro), mean(r.k.sum(0)), mean_abs(r.k.sum(0)), mean(r.u.sum(0)));
  if (r.u_stats.defined()) {  // BatchNorm: f_N - f_0 also holds sum U_stats (in U, not in Uopt's parts)
    s += fmt::format("  and the running statistics' own change, sum U_stats: mean {:+.4g}, mean absolute {:.4g}\n\n",
                     mean(r.u_stats.sum(0)), mean_abs(r.u_stats.sum(0)));
  }
  return s + eq9_footer(r, c, tc);
}

std::string eq9_table(const AnalysisResult& r, const AnalyzeConfig& c) {
  const at::Tensor mask = tc_mask(r);
  auto mean = [](const at::Tensor& t) { return t.mean().item<double>(); };
  auto mean_abs = [](const at::Tensor& t) { return t.abs().mean().item<double>(); };
  const at::Tensor total = r.f_final - r.f_initial;
  const at::Tensor sk = r.k.sum(0), su = r.u.sum(0), srt = (r.r * mask).sum(0), sro = (r.r * (1 - mask)).sum(0);
  int64_t tc = 0;
  for (const auto& s : r.steps) tc += s.in_tc;
  if (r.uses_kopt) return eq9_table_kopt(r, c, tc);
  std::string s = fmt::format(
      "steps {}..{} of {} ({} analyzed), {} probes x {} outputs, in float64\n\n"
      "  f_N - f_0  =  sum K      +  sum U      +  sum R(T_c) +  sum R(rest)\n"
      "  {:<+10.4g} =  {:<+10.4g} +  {:<+10.4g} +  {:<+10.4g} +  {:<+10.4g}   mean over probes and outputs\n"
      "  {:<10.4g}    {:<10.4g}    {:<10.4g}    {:<10.4g}    {:<10.4g}   mean absolute value\n\n",
      r.steps.front().step, r.steps.back().step, c.run, r.steps.size(), r.k.size(1), r.k.size(2), mean(total),
      mean(sk), mean(su), mean(srt), mean(sro), mean_abs(total), mean_abs(sk), mean_abs(su), mean_abs(srt),
      mean_abs(sro));
  return s + eq9_footer(r, c, tc);
}

std::string eq9_footer(const AnalysisResult& r, const AnalyzeConfig& c, int64_t tc) {
  std::string s = fmt::format("T_c: {} of {} steps (rule {}{})\n", tc, r.steps.size(), c.tc_rule,
                   c.tc_rule == "tau" ? fmt::format(", r > {}", c.tau)
                                      : fmt::format(", window {}, kappa {}", c.tc_window, c.tc_kappa));
  std::vector<double> rs;
  for (const auto& x : r.steps) rs.push_back(x.r);
  std::sort(rs.begin(), rs.end());
  s += fmt::format("r = |R|/|F| per step: median {:.3g}, max {:.3g}\n", rs[rs.size() / 2], rs.back());
  if (r.contiguous) {
    s += fmt::format("run identity error: {:.2e} (relative to max |f_N - f_0|)\n", r.identity_error);
  } else {
    s += "run identity: not checked (--every skips steps)\n";
  }
  return s;
}

}  // namespace pathkernel
