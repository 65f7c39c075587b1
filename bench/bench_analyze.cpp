// The analyzer per step against its references, all measured in this one process:
//  - the kernel work of a step (per-example K against the batch, and F) at 16, 64, 256 and 1024
//    probes x 10 logits (MLP 784-128-10, batch 64, float64), against explicit per-row Jacobians
//    (what a functorch jacrev route computes: every probe row's and batch example's gradient,
//    then J_p J_m^T; in chunks of 256 probes, so that 1024 probes fit in memory) and against the
//    floor: one forward and one backward pass over the P distinct probes and the M batch rows;
//  - a whole `analyze` per step at each probe count (the difference of two ranges of one run,
//    so that start-up does not count), and its peak memory;
//  - 2 threads against 1 (whole analyze, 256 probes; needs OMP_WAIT_POLICY=PASSIVE, which this
//    program sets for itself as the pathkernel launcher does);
//  - CNNs: the kernel work of cnn:16,32 and cnn:32,64 at 64 probes x 10 logits against their
//    floor.
//
//  - issue 13's signals: --exact, --kinks and a --sharpness point against a plain analyzed step.
//
// usage: bench_analyze [--data DIR] [--repeats N] [--part mlp|cnn|whole|signals]
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <vector>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/io/idx.h"
#include <torch/csrc/autograd/autograd.h>
#include "pathkernel/io/threads.h"
#include "pathkernel/train/trainer.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace pathkernel;

namespace {

double seconds_of(const std::function<void()>& fn) {
  const auto t0 = Clock::now();
  fn();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double best_of(int repeats, const std::function<void()>& fn) {
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) best = std::min(best, seconds_of(fn));
  return best;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Batch {
  at::Tensor xp, xb, yb;  ///< probes (1024), batch inputs and labels (64)
};

Batch make_batch(const std::string& data) {
  const Dataset train_set = load_split(data, "train", 5000), test_set = load_split(data, "test");
  const at::Tensor pidx = at::arange(0, 10000, 10000 / 1024, at::kLong).slice(0, 0, 1024);
  const at::Tensor bidx = at::arange(64, at::kLong);
  return {to_inputs(test_set.images.index_select(0, pidx), at::kDouble, {}),
          to_inputs(train_set.images.index_select(0, bidx), at::kDouble, {}), train_set.labels.index_select(0, bidx)};
}

std::shared_ptr<models::Model> make_model(const std::string& spec) {
  at::manual_seed(0);
  auto model = models::build_model(models::parse_model_spec(spec), {1, 28, 28}, 10);
  model->to(at::kDouble);
  return model;
}

ParamMap random_direction(models::Model& model) {
  ParamMap dw;
  for (const auto& item : model.named_parameters()) dw[item.key()] = at::randn_like(item.value()).detach() * 1e-3;
  return dw;
}

const at::Tensor& all_outputs(int64_t probes) {
  static at::Tensor cols;
  if (!cols.defined() || cols.size(0) != probes) cols = shared_columns(probes, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  return cols;
}

/// The kernel work of one analyzed step: probe rows and batch rows at w_k, K per example, F.
at::Tensor kernel_work(models::Model& m, const at::Tensor& xp, const Batch& b, const ParamMap& dw) {
  const RowGradients sp = probe_rows(m, xp, all_outputs(xp.size(0)), /*explicit_route=*/false);
  const RowGradients sb = loss_rows(m, b.xb, b.yb, LossKind::kCrossEntropy, /*explicit_route=*/false);
  const at::Tensor k = row_gram(sp, sb);
  row_directional(sp, dw);
  return k;
}

/// The kernel work of an analyzed step whose per-example split is not checked: the batch's
/// loss gradient grad L_k (one forward and backward of the batch), then K = -lr J_p grad L_k and
/// F = J_p dw by forward-mode AD over the probes (two forwards carrying a tangent).
at::Tensor jvp_work(models::Model& m, const at::Tensor& xp, const Batch& b, const ParamMap& dw) {
  m.set_capture(false);
  const at::Tensor loss = at::cross_entropy_loss(m.forward(b.xb), b.yb);
  std::vector<at::Tensor> params;
  for (const auto& item : m.named_parameters()) params.push_back(item.value());
  const auto g = torch::autograd::grad({loss}, params);
  ParamMap grad;
  size_t i = 0;
  for (const auto& item : m.named_parameters()) grad[item.key()] = g[i++];
  return probe_jvps(m, xp, all_outputs(xp.size(0)), {&grad, &dw})[0];
}

/// The floor: one forward and one backward (parameter gradients) over the distinct probes and
/// the batch rows.
void floor_work(models::Model& m, const at::Tensor& xp, const Batch& b) {
  m.set_capture(false);
  const at::Tensor out = m.forward(at::cat({xp, b.xb}));
  (out * at::randn_like(out)).sum().backward();
  m.zero_grad();
}

/// The same K and F by explicit per-row Jacobians, 256 probes at a time.
at::Tensor explicit_work(models::Model& m, const at::Tensor& xp, const Batch& b, const ParamMap& dw) {
  const at::Tensor jb = explicit_loss_jacobian(m, b.xb, b.yb, LossKind::kCrossEntropy);
  const at::Tensor v = flatten_params(m, dw);
  std::vector<at::Tensor> k;
  for (int64_t p = 0; p < xp.size(0); p += 256) {
    const at::Tensor x = xp.slice(0, p, std::min<int64_t>(p + 256, xp.size(0)));
    const at::Tensor jp = explicit_probe_jacobian(m, x, all_outputs(x.size(0)));
    k.push_back(at::mm(jp, jb.t()));
    at::mv(jp, v);
  }
  return at::cat(k);
}

/// A short real run at the benchmark's setting, analyzed by `analyze_step`.
struct RunUnderTest {
  fs::path dir;
  std::string run;
};

RunUnderTest train_run(const std::string& data, int64_t steps, const std::string& model = "mlp:128:tanh") {
  RunUnderTest r{fs::temp_directory_path() / ("pathkernel-bench-analyze-" + std::to_string(::getpid())), ""};
  TrainConfig tc;
  tc.data_dir = data;
  tc.train_limit = 5000;
  tc.steps = steps;
  tc.model = model;
  tc.out = (r.dir / "run").string();
  train(tc, "bench_analyze");
  r.run = tc.out;
  return r;
}

/// A whole analysis per step: analyze steps 0:long and 0:short, divide the difference.
double analyze_step(const RunUnderTest& r, int64_t probes, int threads, int64_t short_range, int64_t long_range,
                    const std::function<void(AnalyzeConfig&)>& more = {}) {
  auto time_range = [&](int64_t end) {
    AnalyzeConfig ac;
    ac.run = r.run;
    ac.out = (r.dir / "analysis").string();
    ac.probes = probes;
    ac.threads = threads;
    ac.step_end = end;
    if (more) more(ac);
    return seconds_of([&] { analyze(ac); });
  };
  const double t_short = time_range(short_range), t_long = time_range(long_range);
  pin_threads(1);
  return (t_long - t_short) / static_cast<double>(long_range - short_range);
}

void bench_mlp(const Batch& b, int repeats) {
  auto model = make_model("mlp:128:tanh");
  const ParamMap dw = random_direction(*model);
  std::printf("kernel work per step, mlp:128:tanh, batch 64, P probes x 10 logits, float64:\n");
  std::printf("  (analyzer: the per-example K_{k,m} and F from the probe rows, what analyze does for models without\n"
              "   convolutions; fwd: K and F by forward-mode AD instead, what it does for CNNs, shown for comparison)\n");
  std::printf("  %6s %9s %12s %9s %12s %8s %9s %9s\n", "probes", "floor ms", "analyzer ms", "fwd ms", "explicit ms",
              "x floor", "x faster", "K agrees");
  for (int64_t p : {16, 64, 256, 1024}) {
    const at::Tensor xp = b.xp.slice(0, 0, p);
    at::Tensor k_fast, k_slow;
    const double floor = best_of(repeats, [&] { floor_work(*model, xp, b); });
    const double fast = best_of(repeats, [&] { k_fast = kernel_work(*model, xp, b, dw); });
    const double fwd = best_of(repeats, [&] { jvp_work(*model, xp, b, dw); });
    const double slow = best_of(1, [&] { k_slow = explicit_work(*model, xp, b, dw); });
    const double agree = (k_fast - k_slow).abs().max().item<double>() / k_slow.abs().max().item<double>();
    std::printf("  %6lld %9.2f %12.2f %9.2f %12.1f %8.2f %9.0f %9.1e\n", static_cast<long long>(p), floor * 1e3,
                fast * 1e3, fwd * 1e3, slow * 1e3, fast / floor, slow / fast, agree);
  }
}

void bench_cnn(const Batch& b, int repeats) {
  std::printf("kernel work per step, CNNs, batch 64, 64 probes x 10 logits, float64:\n");
  for (const char* spec : {"cnn:16,32", "cnn:32,64"}) {
    auto model = make_model(spec);
    const ParamMap dw = random_direction(*model);
    const at::Tensor xp = b.xp.slice(0, 0, 64);
    std::vector<double> ratios, floors, fasts, jvps, jratios, mixed;
    for (int i = 0; i < repeats; ++i) {
      const double floor = seconds_of([&] { floor_work(*model, xp, b); });
      const double fast = seconds_of([&] { kernel_work(*model, xp, b, dw); });
      const double jvp = seconds_of([&] { jvp_work(*model, xp, b, dw); });
      floors.push_back(floor);
      fasts.push_back(fast);
      jvps.push_back(jvp);
      ratios.push_back(fast / floor);
      jratios.push_back(jvp / floor);
      // analyze's default: the split on every 10th analyzed step, forward-mode on the others
      mixed.push_back((0.9 * jvp + 0.1 * (jvp + fast)) / floor);
    }
    std::printf("  %-10s floor %8.1f ms   per-example split %8.1f ms x%.2f   forward-mode K, F %8.1f ms x%.2f   "
                "analyze (split on every 10th step) x%.2f of the floor (medians of %d paired repeats)\n",
                spec, median(floors) * 1e3, median(fasts) * 1e3, median(ratios), median(jvps) * 1e3, median(jratios),
                median(mixed), repeats);
  }
}

/// Where a CNN step's kernel work goes (the parts of kernel_work, each timed alone).
void bench_cnn_parts(const Batch& b, int repeats) {
  for (const char* spec : {"cnn:16,32", "cnn:32,64"}) {
    auto model = make_model(spec);
    const ParamMap dw = random_direction(*model);
    const at::Tensor xp = b.xp.slice(0, 0, 64);
    RowSignals sp, sb;
    const double probe = best_of(repeats, [&] { sp = probe_signals(*model, xp, all_outputs(64)); });
    const double batch = best_of(repeats, [&] { sb = loss_signals(*model, b.xb, b.yb, LossKind::kCrossEntropy); });
    const double gram = best_of(repeats, [&] { factorized_gram(sp, sb); });
    const double dir = best_of(repeats, [&] { factorized_directional(sp, dw); });
    const double fwd = best_of(repeats, [&] {
      at::NoGradGuard ng;
      model->forward(xp);
    });
    std::printf("  %-10s probe rows %7.1f ms (a forward alone %5.1f)  batch rows %6.1f  gram %6.1f  F %5.1f ms\n", spec,
                probe * 1e3, fwd * 1e3, batch * 1e3, gram * 1e3, dir * 1e3);
  }
}

void bench_whole(const std::string& data, int repeats) {
  const RunUnderTest r = train_run(data, 45);
  std::printf("whole analyze per analyzed step (mlp:128:tanh, steps 5..45 of a run, start-up excluded):\n");
  for (int64_t p : {16, 64, 256, 1024}) {
    std::printf("  %5lld probes x 10 logits   %8.1f ms/step\n", static_cast<long long>(p),
                analyze_step(r, p, 1, 5, 45) * 1e3);
  }
  std::vector<double> ratios;
  double one = 0, two = 0;
  for (int i = 0; i < repeats; ++i) {
    one = analyze_step(r, 256, 1, 5, 45);
    two = analyze_step(r, 256, 2, 5, 45);
    ratios.push_back(one / two);
  }
  std::printf("  256 probes, 2 threads against 1: %.1f against %.1f ms/step, x%.2f (median of %d paired repeats)\n",
              two * 1e3, one * 1e3, median(ratios), repeats);
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  std::printf("  peak RSS of this process (the explicit route's Jacobians included): %.0f MB\n", ru.ru_maxrss / 1024.0);
  fs::remove_all(r.dir);
}

/// Issue 13's signals: a plain analyzed step against the same step with the exact path kernel
/// (2 nodes), with its kinks walked (probes and batch) and counted, walked and split, and with a
/// sharpness point (lambda_max on 1000 training examples and on the batch), for a ReLU MLP and a
/// ReLU CNN at 16 probes x 10 logits.
void bench_signals(const std::string& data) {
  std::printf("issue 13's signals per analyzed step, 16 probes x 10 logits, a run at lr 0.1, batch 64 (mlp: steps "
              "5..25; cnn: steps 5..8):\n");
  for (const char* spec : {"mlp:128:relu", "cnn:8,16:relu"}) {
    const bool cnn = std::string(spec).rfind("cnn", 0) == 0;
    const int64_t a = 5, b = cnn ? 8 : 25;
    const RunUnderTest r = train_run(data, b, spec);
    const double plain = analyze_step(r, 16, 1, a, b);
    const double exact = analyze_step(r, 16, 1, a, b, [](AnalyzeConfig& c) { c.exact_nodes = 2; });
    const double counted = analyze_step(r, 16, 1, a, b, [](AnalyzeConfig& c) { c.kink_split = true; });
    const double kinks = analyze_step(r, 16, 1, a, b, [](AnalyzeConfig& c) {
      c.exact_nodes = 2;
      c.kink_split = true;
    });
    AnalyzeConfig c;
    c.run = r.run;
    c.out = (r.dir / "analysis").string();
    c.probes = 16;
    c.exact_nodes = 2;
    c.kink_split = true;
    c.step_begin = a;
    c.step_end = b;
    double pieces = 0, kp = 0, kb = 0;
    const AnalysisResult res = analyze(c);
    const double n = static_cast<double>(res.steps.size());
    for (const auto& s : res.steps) {
      pieces += s.kink_pieces / n;
      kp += s.kinks_probes / n;
      kb += s.kinks_batch / n;
    }
    const double sharp = analyze_step(r, 16, 1, a, b, [](AnalyzeConfig& c2) { c2.sharpness_every = 1; });
    std::printf("  %-14s plain %7.1f ms   --exact 2 %7.1f ms (x%.1f)   --kinks %8.1f ms (x%.1f; kinks per step: %.0f "
                "probes, %.0f batch)   --exact 2 --kinks %8.1f ms (x%.1f; %.0f probe pieces)   with a sharpness point "
                "%8.1f ms (x%.1f)\n",
                spec, plain * 1e3, exact * 1e3, exact / plain, counted * 1e3, counted / plain, kp, kb, kinks * 1e3,
                kinks / plain, pieces, sharp * 1e3, sharp / plain);
    fs::remove_all(r.dir);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // libgomp reads its wait policy when it loads: set it for a fresh image of this program.
  if (!std::getenv("OMP_WAIT_POLICY")) {
    ::setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    ::execv("/proc/self/exe", argv);
  }
  std::string data = "/usr/share/datasets/fashion-mnist";
  int repeats = 5;
  std::string part;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--data") data = argv[i + 1];
    if (std::string(argv[i]) == "--part") part = argv[i + 1];
    if (std::string(argv[i]) == "--repeats") repeats = std::stoi(argv[i + 1]);
  }
  tune_allocator();
  spdlog::set_level(spdlog::level::warn);
  const ThreadInfo threads = pin_threads(1);
  const char* core = std::getenv("OPENBLAS_CORETYPE");
  std::printf("bench_analyze: 1 thread unless said, %s, OPENBLAS_CORETYPE=%s\n", threads.blas.c_str(),
              core ? core : "(unset)");
  const Batch b = make_batch(data);
  if (part.empty() || part == "mlp") bench_mlp(b, repeats);
  if (part.empty() || part == "cnn") bench_cnn(b, repeats);
  if (part.empty() || part == "cnn") bench_cnn_parts(b, repeats);
  if (part.empty() || part == "whole") bench_whole(data, 3);
  if (part.empty() || part == "signals") bench_signals(data);
  return 0;
}
