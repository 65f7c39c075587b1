// The analysis's rules that need no run: which probes (choose_probes), the Gauss-Legendre nodes
// of the exact path kernel, which steps are complex (mark_complex_steps, SPEC "Complex
// timesteps"), what is computed over the analyzed steps once they are all there (finish_analysis:
// the quadrature error, the steps not walked, T_c, the run identity) and which of the
// analysis's own checks failed (failed_checks).
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {

std::vector<int64_t> choose_probes(const AnalyzeConfig& c, int64_t n, const at::Tensor& labels) {
  std::vector<int64_t> idx;
  if (!c.probe_indices.empty()) {
    for (int64_t v : c.probe_indices) {
      if (v < 0 || v >= n) {
        throw InputError("probe index " + std::to_string(v) + " is outside the " + c.split + " split (0.." +
                         std::to_string(n - 1) + ")");
      }
    }
    return c.probe_indices;
  }
  if (!c.probe_indices_file.empty()) {
    std::istringstream in(read_file(c.probe_indices_file, int64_t{64} << 20));  // regular files only
    long long v;
    while (in >> v) {
      if (v < 0 || v >= n) {
        throw InputError(c.probe_indices_file + ": probe index " + std::to_string(v) + " is outside the " + c.split +
                         " split (0.." + std::to_string(n - 1) + ")");
      }
      idx.push_back(v);
    }
    if (!in.eof()) throw InputError(c.probe_indices_file + ": expected one integer index per line");
    if (idx.empty()) throw InputError(c.probe_indices_file + ": no probe indices");
    return idx;
  }
  if (c.balanced) {
    // Per class, evenly spaced over that class's examples; classes absent from the split are
    // skipped, so the count is spread over the classes present.
    std::vector<std::vector<int64_t>> by_class;
    const int64_t* l = labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (l[i] >= static_cast<int64_t>(by_class.size())) by_class.resize(static_cast<size_t>(l[i] + 1));
      by_class[static_cast<size_t>(l[i])].push_back(i);
    }
    std::vector<const std::vector<int64_t>*> present;
    for (const auto& v : by_class) {
      if (!v.empty()) present.push_back(&v);
    }
    const auto classes = static_cast<int64_t>(present.size());
    for (int64_t k = 0; k < classes; ++k) {
      const auto& members = *present[static_cast<size_t>(k)];
      const int64_t m = static_cast<int64_t>(members.size());
      const int64_t want = std::min(m, c.probes / classes + (k < c.probes % classes ? 1 : 0));
      for (int64_t i = 0; i < want; ++i) idx.push_back(members[static_cast<size_t>(i * m / want)]);
    }
    std::sort(idx.begin(), idx.end());
    return idx;
  }
  // Evenly spaced over the split: deterministic, and recorded in probes.csv.
  const int64_t p = std::min(c.probes, n);
  for (int64_t i = 0; i < p; ++i) idx.push_back(i * n / p);
  return idx;
}

std::pair<std::vector<double>, std::vector<double>> gauss_legendre(int64_t q) {
  // Newton's method on the Legendre polynomial P_q from Chebyshev starting points, then mapped
  // from [-1, 1] to [0, 1].
  std::vector<double> x(static_cast<size_t>(q)), w(static_cast<size_t>(q));
  for (int64_t i = 0; i < q; ++i) {
    double z = std::cos(M_PI * (static_cast<double>(i) + 0.75) / (static_cast<double>(q) + 0.5));
    double dp = 0;
    for (int it = 0; it < 100; ++it) {
      double p0 = 1, p1 = 0;
      for (int64_t j = 1; j <= q; ++j) {
        const double p2 = p1;
        p1 = p0;
        p0 = ((2.0 * j - 1.0) * z * p1 - (j - 1.0) * p2) / static_cast<double>(j);
      }
      dp = static_cast<double>(q) * (z * p0 - p1) / (z * z - 1.0);
      const double dz = p0 / dp;
      z -= dz;
      if (std::abs(dz) < 1e-16) break;
    }
    x[i] = 0.5 * (1.0 - z);
    w[i] = 1.0 / ((1.0 - z * z) * dp * dp);  // 2 / ((1 - z^2) P'^2), halved for [0, 1]
  }
  return {x, w};
}

void mark_complex_steps(std::vector<StepRow>& steps, const AnalyzeConfig& c) {
  for (size_t k = 0; k < steps.size(); ++k) {
    if (c.tc_rule == "tau") {
      steps[k].in_tc = steps[k].r > c.tau;
      continue;
    }
    // outlier: r_k > median + kappa * 1.4826 * MAD over the `window` analyzed steps before k.
    const size_t lo = k >= static_cast<size_t>(c.tc_window) ? k - c.tc_window : 0;
    if (k - lo < 5) {  // too little history to call anything unusual
      steps[k].in_tc = false;
      continue;
    }
    std::vector<double> w;
    for (size_t j = lo; j < k; ++j) w.push_back(steps[j].r);
    std::sort(w.begin(), w.end());
    const double med = w.size() % 2 ? w[w.size() / 2] : 0.5 * (w[w.size() / 2 - 1] + w[w.size() / 2]);
    for (double& v : w) v = std::abs(v - med);
    std::sort(w.begin(), w.end());
    const double mad = w.size() % 2 ? w[w.size() / 2] : 0.5 * (w[w.size() / 2 - 1] + w[w.size() / 2]);
    steps[k].in_tc = steps[k].r > med + c.tc_kappa * 1.4826 * mad;
  }
}

std::vector<std::string> failed_checks(const AnalysisResult& r, const AnalyzeConfig& c) {
  std::vector<std::string> failed;
  const std::pair<const char*, const at::Tensor*> arrays[] = {{"D", &r.d}, {"F", &r.f}, {"K", &r.k}, {"U", &r.u},
                                                             {"R", &r.r}, {"S", &r.s}, {"Kopt", &r.kopt},
                                                             {"Kexact", &r.kexact}};
  for (const auto& [name, t] : arrays) {
    if (t->defined() && !at::isfinite(*t).all().item<bool>()) {
      failed.push_back(std::string(name) + " holds values that are not finite (NaN or inf)");
    }
  }
  if (!(r.kernel_split_error <= c.kernel_split_tolerance)) {
    failed.push_back(fmt::format("the kernel term's per-example split differs from -a_k g . grad L_k (autograd) by "
                                 "{:.3e}, beyond {:.0e}", r.kernel_split_error, c.kernel_split_tolerance));
  }
  if (c.exact_nodes > 0 && (r.smooth || c.kink_split) && !(r.quad_error_rel <= c.quadrature_tolerance)) {
    failed.push_back(fmt::format("the exact path kernel's quadrature error is {:.3e} of max |D| with {} nodes on a "
                                 "{}, beyond {:.0e}: use more nodes (--exact Q)",
                                 r.quad_error_rel, c.exact_nodes, c.kink_split ? "model split at its kinks" : "smooth model",
                                 c.quadrature_tolerance));
  }
  if (r.contiguous && !(r.identity_error <= c.identity_tolerance)) {
    failed.push_back(fmt::format("the run identity fails: error {:.3e} exceeds {:.0e} of max |f_N - f_0|",
                                 r.identity_error, c.identity_tolerance));
  }
  return failed;
}

void finish_analysis(AnalysisResult& res, const AnalyzeConfig& c) {
  if (res.kexact.defined()) {
    double qmax = 0, dmax = 0;
    for (const auto& row : res.steps) {
      // With --kinks, a step not walked (--kinks-max) took the plain rule: it is not gated.
      if (!c.kink_split || !std::isnan(row.kinks_probes)) qmax = std::max(qmax, row.quad_error);
      dmax = std::max(dmax, row.d_norm);
    }
    res.quad_error_rel = qmax / std::max(dmax, 1e-300);
  }
  res.kinks_skipped = 0;
  if (c.kink_split) {
    for (const auto& row : res.steps) res.kinks_skipped += std::isnan(row.kinks_probes) ? 1 : 0;
  }
  mark_complex_steps(res.steps, c);

  // The run identity (Eq. 9): f(w_end) - f(w_begin) = sum K + sum U + sum R, checked against
  // the outputs of the two end points computed directly.
  if (res.contiguous) {
    const at::Tensor total = res.f_final - res.f_initial;
    const at::Tensor sum = (res.k + res.u + res.r).sum(0);
    const double scale = std::max(1e-300, total.abs().max().item<double>());
    res.identity_error = (total - sum).abs().max().item<double>() / scale;
  }
}

}  // namespace pathkernel
