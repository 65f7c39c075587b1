// explain --project on a model with over a million parameters (issue 12): mlp:1024,512:tanh
// (1.33M parameters) trained on 5000 Fashion-MNIST examples, explained for 32 test probes by
// the exact route and through random projections of several sizes, each in a child process of
// its own so that its peak memory is its own. Printed per route: time, peak RSS, the largest
// relative error of a_i (per probe, max_i |a~_i - a_i| / max_i |a_i|, the max over probes), the
// mean overlap of each probe's top-32 proponents, and the sum check's error.
//
// usage: bench_project [--data DIR] [--steps N] [--momentum M] [--dims D1,D2,...]
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "pathkernel/explain/explain.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/train/trainer.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace pathkernel;

namespace {

struct Measured {
  double seconds = 0, peak_mb = 0;
};

/// Runs explain in a child; its wall time and peak RSS.
Measured explain_in_child(const ExplainConfig& e) {
  const auto t0 = Clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    try {
      write_explanation(explain(e), e);
      std::_Exit(0);
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "explain failed: %s\n", ex.what());
      std::_Exit(1);
    }
  }
  int status = 0;
  struct rusage ru {};
  ::wait4(pid, &status, 0, &ru);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) throw std::runtime_error("explain failed in the child");
  return {std::chrono::duration<double>(Clock::now() - t0).count(), ru.ru_maxrss / 1024.0};
}

std::set<int64_t> top_of(const at::Tensor& row, int64_t k) {
  const at::Tensor idx = std::get<1>(row.topk(k));
  std::set<int64_t> s;
  for (int64_t i = 0; i < k; ++i) s.insert(idx[i].item<int64_t>());
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::string data = "/usr/share/datasets/fashion-mnist";
  int64_t steps = 80;
  double momentum = 0.9;
  std::vector<int64_t> dims = {1024, 4096, 16384};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--data") data = v;
    if (a == "--steps") steps = std::stoll(v);
    if (a == "--momentum") momentum = std::stod(v);
    if (a == "--dims") {
      dims.clear();
      std::stringstream ss(v);
      for (std::string d; std::getline(ss, d, ',');) dims.push_back(std::stoll(d));
    }
  }
  tune_allocator();
  spdlog::set_level(spdlog::level::warn);
  const ThreadInfo threads = pin_threads(1);
  const char* core = std::getenv("OPENBLAS_CORETYPE");
  const fs::path tmp = fs::temp_directory_path() / ("pathkernel-bench-project-" + std::to_string(::getpid()));
  TrainConfig tc;
  tc.data_dir = data;
  tc.model = "mlp:1024,512:tanh";
  tc.train_limit = 5000;
  tc.steps = steps;
  tc.batch = 64;
  tc.lr = 0.05;
  tc.momentum = momentum;
  tc.checkpoint_every = 20;
  tc.out = (tmp / "run").string();
  train(tc, "bench_project");
  std::printf("bench_project: %s, %lld steps of SGD (momentum %.1f, lr 0.05, batch 64) on 5000 examples, 32 test "
              "probes, their predicted logit; 1 thread, %s, OPENBLAS_CORETYPE=%s\n",
              tc.model.c_str(), static_cast<long long>(steps), momentum, threads.blas.c_str(), core ? core : "(unset)");
  auto config = [&](int64_t d) {
    ExplainConfig e;
    e.run = tc.out;
    e.out = (tmp / ("explain-" + std::to_string(d))).string();
    e.probes = 32;
    e.grids = 0;
    e.project = d;
    e.project_seed = 1;
    return e;
  };
  const Measured exact = explain_in_child(config(0));
  const at::Tensor a = load_npy(fs::path(config(0).out) / "attributions.npy");
  std::printf("  %-14s %9s %10s %14s %13s %11s\n", "route", "seconds", "peak MB", "max rel err a", "top-32 share",
              "sum error");
  auto sum_error = [](const std::string& out) {
    std::ifstream in(fs::path(out) / "summary.json");
    return nlohmann::json::parse(in).at("max_sum_error").get<double>();
  };
  std::printf("  %-14s %9.1f %10.0f %14s %13s %11.1e\n", "exact", exact.seconds, exact.peak_mb, "-", "-",
              sum_error(config(0).out));
  for (int64_t d : dims) {
    const Measured m = explain_in_child(config(d));
    const at::Tensor b = load_npy(fs::path(config(d).out) / "attributions.npy");
    double err = 0, overlap = 0;
    for (int64_t p = 0; p < a.size(0); ++p) {
      err = std::max(err, (b[p] - a[p]).abs().max().item<double>() / a[p].abs().max().item<double>());
      const std::set<int64_t> ta = top_of(a[p], 32), tb = top_of(b[p], 32);
      int64_t both = 0;
      for (int64_t i : ta) both += tb.count(i);
      overlap += static_cast<double>(both) / 32.0 / static_cast<double>(a.size(0));
    }
    std::printf("  %-14s %9.1f %10.0f %14.3f %13.2f %11.1e   (x%.1f faster, x%.1f less memory)\n",
                ("--project " + std::to_string(d)).c_str(), m.seconds, m.peak_mb, err, overlap,
                sum_error(config(d).out), exact.seconds / m.seconds, exact.peak_mb / m.peak_mb);
  }
  fs::remove_all(tmp);
  return 0;
}
