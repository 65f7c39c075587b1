#include "pathkernel/analysis/sharpness.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pathkernel/analysis/kernels.h"

namespace pathkernel {
namespace {

at::Tensor flat(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& like) {
  std::vector<at::Tensor> f;
  for (size_t i = 0; i < like.size(); ++i) {
    f.push_back(ts[i].defined() ? ts[i].reshape({-1}) : at::zeros({like[i].numel()}, like[i].options()));
  }
  return at::cat(f);
}

/// H v for the mean loss over (x, y), summed over chunks with their share of the examples.
at::Tensor hvp(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss, const at::Tensor& v,
               int64_t chunk) {
  const std::vector<at::Tensor> params = parameters_of(model);
  std::vector<at::Tensor> vs;
  int64_t off = 0;
  for (const auto& p : params) {
    vs.push_back(v.narrow(0, off, p.numel()).view(p.sizes()).to(p.scalar_type()));
    off += p.numel();
  }
  const int64_t n = x.size(0);
  if (model.in_training_context()) chunk = n;  // a step's masks cover its whole batch: one forward
  at::Tensor out = at::zeros_like(v);
  for (int64_t i = 0; i < n; i += chunk) {
    const int64_t len = std::min(chunk, n - i);
    const at::Tensor l = batch_loss(model.forward(x.narrow(0, i, len)), y.narrow(0, i, len), loss) *
                         (static_cast<double>(len) / static_cast<double>(n));
    const auto g = torch::autograd::grad({l}, params, {}, /*retain_graph=*/true, /*create_graph=*/true, true);
    at::Tensor dot = at::zeros({}, v.options());
    for (size_t j = 0; j < g.size(); ++j) {
      if (g[j].defined()) dot = dot + (g[j] * vs[j]).sum();
    }
    if (!dot.requires_grad()) continue;  // a loss linear in the weights: no curvature
    const auto h = torch::autograd::grad({dot}, params, {}, /*retain_graph=*/false, false, true);
    out += flat(h, params).to(v.scalar_type());
  }
  return out;
}

}  // namespace

Sharpness hessian_top_eigenvalue(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss,
                                 int64_t max_iterations, double tolerance, uint64_t seed, int64_t chunk) {
  const std::vector<at::Tensor> params = parameters_of(model);
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor q = at::randn({n}, gen, opts);
  q /= q.norm();
  std::vector<at::Tensor> basis = {q};
  std::vector<double> alpha, beta;
  Sharpness s;
  const int64_t m = std::min(max_iterations, n);
  for (int64_t j = 0; j < m; ++j) {
    at::Tensor w = hvp(model, x, y, loss, basis.back(), chunk);
    const double a = w.dot(basis.back()).item<double>();
    alpha.push_back(a);
    // Full reorthogonalization, twice (Kahan's "twice is enough"), against every basis vector.
    const at::Tensor qs = at::stack(basis);
    for (int pass = 0; pass < 2; ++pass) w -= at::mv(qs.t(), at::mv(qs, w));
    const double b = w.norm().item<double>();
    // The Ritz values of the tridiagonal T_j: the largest and its vector's last entry.
    const int64_t k = j + 1;
    at::Tensor t = at::zeros({k, k}, opts);
    for (int64_t i = 0; i < k; ++i) {
      t[i][i] = alpha[i];
      if (i + 1 < k) t[i][i + 1] = t[i + 1][i] = beta[i];
    }
    const auto [evals, evecs] = at::linalg_eigh(t);
    s.lambda_max = evals[k - 1].item<double>();
    s.iterations = k;
    s.residual = b * std::abs(evecs[k - 1][k - 1].item<double>()) / std::max(1e-300, std::abs(s.lambda_max));
    if (s.residual <= tolerance || b <= 1e-300) break;
    beta.push_back(b);
    basis.push_back(w / b);
  }
  return s;
}

double mean_loss(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss, int64_t chunk) {
  at::NoGradGuard ng;
  double total = 0;
  for (int64_t i = 0; i < x.size(0); i += chunk) {
    const int64_t len = std::min(chunk, x.size(0) - i);
    total += batch_loss(model.forward(x.narrow(0, i, len)), y.narrow(0, i, len), loss).item<double>() *
             static_cast<double>(len);
  }
  return total / static_cast<double>(x.size(0));
}

at::Tensor explicit_hessian(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss) {
  const std::vector<at::Tensor> params = parameters_of(model);
  const at::Tensor l = batch_loss(model.forward(x), y, loss);
  const auto g = torch::autograd::grad({l}, params, {}, true, true, true);
  const at::Tensor gf = flat(g, params);
  const int64_t n = gf.numel();
  at::Tensor h = at::zeros({n, n}, at::kDouble);
  for (int64_t i = 0; i < n; ++i) {
    if (!gf.requires_grad()) break;
    const auto row = torch::autograd::grad({gf[i]}, params, {}, true, false, true);
    h[i] = flat(row, params).to(at::kDouble);
  }
  return h;
}

}  // namespace pathkernel
