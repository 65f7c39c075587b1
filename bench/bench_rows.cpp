// explain's probe rows on a recorded run's own TorchScript model: the [P*C, n_params] gradient
// rows the explicit route forms for the per-example split, in float64 at the run's step 0, on the
// probes bench_generic.py gives functorch's vmap(jacrev) (every (test split size / P)-th test
// example). Measures each way of forming them, the workspace kept between calls as explain keeps
// it: one backward per row, one batched backward per probe (batched_rows.h), functorch's vmap
// over blocks of probes of its grad transform (functorch_rows.h), and the mode choose_rows_mode
// takes; and an analyzed step's Jacobian-vector products along four directions,
// one forward per direction (jvp-each) and all in one forward (jvp-batched); and --second-order's
// S = 1/2 dw^T H dw along one of them, per row (a Hessian-vector product a row) and all rows at
// once (s-per-row, s-all-rows; the latter with layer_norm made differentiable to the third order,
// norm_rules.cpp). Prints one line per way: name, best seconds of the repeats after a warm-up, and
// (for the chosen mode) why.
// bench_generic.py runs it beside functorch.
//
// usage: bench_rows RUN PROBES [REPEATS [WAYS]]   (WAYS: a comma-separated subset of
//        per-row,batched,functorch,jvp-each,jvp-batched,s-per-row,s-all-rows,chosen; all by default)
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>
#include <string>

#include "pathkernel/analysis/batched_rows.h"
#include "pathkernel/analysis/functorch_rows.h"
#include "pathkernel/analysis/kernels.h"
#include "pathkernel/analysis/step_terms.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/trajectory/trajectory.h"

using namespace pathkernel;
using Clock = std::chrono::steady_clock;

namespace {

/// The best of `repeats` timed calls of f after one untimed call.
template <class F>
double best_of(int repeats, F&& f) {
  f();
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: bench_rows RUN PROBES [REPEATS [WAYS]]\n");
    return 2;
  }
  tune_allocator();  // as pathkernel's main does
  spdlog::set_default_logger(spdlog::stderr_color_mt("bench_rows"));  // stdout holds the figures
  spdlog::set_level(spdlog::level::warn);
  const ThreadInfo threads = pin_threads(1);
  const int64_t probes = std::stoll(argv[2]);
  const int repeats = argc > 3 ? std::stoi(argv[3]) : 2;
  const std::string ways = argc > 4 ? "," + std::string(argv[4]) + "," : "";
  auto wanted = [&](const std::string& way) { return ways.empty() || ways.find("," + way + ",") != std::string::npos; };
  if (!ways.empty()) {  // a misspelt way would measure nothing and say nothing
    std::string left = ways;
    for (const char* way : {"per-row", "batched", "functorch", "jvp-each", "jvp-batched", "s-per-row", "s-all-rows", "chosen"}) {
      const size_t at = left.find("," + std::string(way) + ",");
      if (at != std::string::npos) left.erase(at, std::string(way).size() + 1);
    }
    if (left != ",") {
      std::fprintf(stderr,
                   "bench_rows: unknown way in '%s' "
                   "(per-row,batched,functorch,jvp-each,jvp-batched,s-per-row,s-all-rows,chosen)\n",
                   argv[4]);
      return 2;
    }
  }
  auto traj = open_trajectory(argv[1]);
  auto model = traj->make_model();
  model->to(at::kDouble);
  ParamMap w;
  for (const auto& [name, t] : traj->weights_at(0)) w[name] = t.to(at::kDouble);
  set_weights(*model, w);
  const int64_t n_test = traj->split_size("test"), stride = std::max<int64_t>(1, n_test / probes);
  const at::Tensor idx = at::arange(0, std::min(n_test, stride * probes), stride, at::kLong);
  const at::Tensor x = traj->inputs("test", idx, at::kDouble);
  const int64_t nc = traj->num_classes();
  const at::Tensor cols = at::arange(nc, at::kLong).unsqueeze(0).expand({x.size(0), nc}).contiguous();
  std::printf("model %s, %lld probes x %lld outputs, 1 thread, OpenBLAS core %s\n", argv[1],
              static_cast<long long>(x.size(0)), static_cast<long long>(nc), threads.blas_core.c_str());
  for (const auto& [name, mode] : {std::pair<const char*, RowsMode>{"per-row", RowsMode::kPerRow},
                                   {"batched", RowsMode::kBatchedOutputs},
                                   {"functorch", RowsMode::kFunctorch}}) {
    if (!wanted(name)) continue;
    RowsWorkspace ws;
    ws.mode = mode;
    try {
      const double s = best_of(repeats, [&] { probe_rows(*model, x, cols, /*explicit_route=*/true, nullptr, &ws); });
      std::printf("%-8s %.4f\n", name, s);
    } catch (const BatchedRowsUnsupported& e) {
      std::printf("%-8s unsupported: %s\n", name, e.what());
    } catch (const FunctorchRowsUnsupported& e) {
      std::printf("%-8s unsupported: %s\n", name, e.what());
    }
  }
  // The products of one analyzed step of a momentum run (four directions): one forward per
  // direction, and all four in one forward (their tangents a vmap batch).
  std::vector<ParamMap> dirs(4);
  {
    const at::Generator gen = at::detail::createCPUGenerator(0);
    for (auto& d : dirs) {
      for (const auto& item : model->named_parameters()) d[item.key()] = at::randn(item.value().sizes(), gen, at::kDouble);
    }
  }
  const std::vector<const ParamMap*> step = {&dirs[0], &dirs[1], &dirs[2], &dirs[3]};
  for (const auto& [name, mode] : {std::pair<const char*, JvpMode>{"jvp-each", JvpMode::kForward},
                                   {"jvp-batched", JvpMode::kForwardBatched}}) {
    if (!wanted(name)) continue;
    try {
      at::Tensor logits;
      const JvpMode how = mode;  // a structured binding cannot be captured (C++17)
      const double s = best_of(repeats, [&] { probe_jvps(*model, x, cols, step, &logits, how); });
      std::printf("%-8s %.4f\n", name, s);
    } catch (const c10::Error& e) {
      std::printf("%-8s unsupported: %s\n", name, e.what_without_backtrace());
    }
  }
  for (const auto& [name, mode] : {std::pair<const char*, SecondOrderMode>{"s-per-row", SecondOrderMode::kPerRow},
                                   {"s-all-rows", SecondOrderMode::kAllRows}}) {
    if (!wanted(name)) continue;
    const SecondOrderMode how = mode;
    const double s = best_of(repeats, [&] { second_order(*model, x, cols, dirs[0], how); });
    std::printf("%-8s %.4f\n", name, s);
  }
  if (wanted("s-all-rows")) {
    std::string why;
    choose_second_order_mode(*model, x, cols, dirs[0], &why);
    std::printf("s-chosen %s\n", why.c_str());
  }
  if (!wanted("chosen")) return 0;
  RowsWorkspace chosen;
  const double s = best_of(repeats, [&] { probe_rows(*model, x, cols, /*explicit_route=*/true, nullptr, &chosen); });
  std::printf("chosen   %.4f %s\n", s, chosen.why.c_str());
  return 0;
}
