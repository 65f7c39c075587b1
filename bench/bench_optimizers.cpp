// The cost of the kernel-machine view through an optimizer (issue 7), measured in one process:
// `analyze` per step of an Adam run against an SGD run (64 probes x 10 logits), and `explain`
// per step of momentum and Adam runs (the backward recursion over the whole momentum series)
// against plain SGD (step-by-step attribution), on the same model, data, probes and number of
// steps. The runs alternate, and each ratio is the median over the repeats. Peak resident memory
// is that of the whole process (every analysis and explanation above, at most).
//
// usage: bench_optimizers [--data DIR] [--steps N] [--repeats R]
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/threads.h"
#include "pathkernel/train/trainer.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace pathkernel;

namespace {

double seconds(const std::function<void()>& fn) {
  const auto t0 = Clock::now();
  fn();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  std::string data = "/usr/share/datasets/fashion-mnist";
  int64_t steps = 60, repeats = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--data") data = argv[i + 1];
    if (std::string(argv[i]) == "--steps") steps = std::stoll(argv[i + 1]);
    if (std::string(argv[i]) == "--repeats") repeats = std::stoll(argv[i + 1]);
  }
  tune_allocator();
  spdlog::set_level(spdlog::level::warn);
  const ThreadInfo threads = pin_threads(1);
  const fs::path tmp = fs::temp_directory_path() / ("pathkernel-bench-optimizers-" + std::to_string(::getpid()));
  std::map<std::string, std::string> runs;
  for (const auto& [name, opt, lr, momentum] :
       std::vector<std::tuple<std::string, std::string, double, double>>{
           {"sgd", "sgd", 0.1, 0.0}, {"momentum", "sgd", 0.01, 0.9}, {"adam", "adam", 1e-3, 0.0}}) {
    TrainConfig tc;
    tc.data_dir = data;
    tc.train_limit = 5000;
    tc.steps = steps;
    tc.optimizer = opt;
    tc.lr = lr;
    tc.momentum = momentum;
    tc.out = runs[name] = (tmp / name).string();
    train(tc, "bench_optimizers");
  }

  auto analyze_run = [&](const std::string& name, int r) {
    AnalyzeConfig a;
    a.run = runs[name];
    a.out = (tmp / ("a-" + name + std::to_string(r))).string();
    a.probes = 64;
    return seconds([&] { analyze(a); });
  };
  auto explain_run = [&](const std::string& name, int r) {
    ExplainConfig e;
    e.run = runs[name];
    e.out = (tmp / ("e-" + name + std::to_string(r))).string();
    e.probes = 16;
    return seconds([&] { explain(e); });
  };
  std::map<std::string, std::vector<double>> t;
  std::vector<double> analyze_ratio, explain_mom_ratio, explain_adam_ratio;
  for (int r = 0; r < repeats; ++r) {
    const double as = analyze_run("sgd", r), aa = analyze_run("adam", r);
    const double es = explain_run("sgd", r), em = explain_run("momentum", r), ea = explain_run("adam", r);
    t["analyze sgd"].push_back(as);
    t["analyze adam"].push_back(aa);
    t["explain sgd"].push_back(es);
    t["explain momentum"].push_back(em);
    t["explain adam"].push_back(ea);
    analyze_ratio.push_back(aa / as);
    explain_mom_ratio.push_back(em / es);
    explain_adam_ratio.push_back(ea / es);
  }
  fs::remove_all(tmp);
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);

  std::printf("bench_optimizers: mlp:128:tanh, %lld steps of batch 64 on 5000 Fashion-MNIST images, %lld repeats, "
              "%d thread(s), %s\n",
              static_cast<long long>(steps), static_cast<long long>(repeats), threads.torch_threads,
              threads.blas.c_str());
  for (const auto& [name, v] : t) {
    std::printf("  %-18s %8.1f ms/step (median)\n", name.c_str(), median(v) * 1e3 / static_cast<double>(steps));
  }
  std::printf("  analyze, 64 probes x 10 logits: adam / sgd      x%.2f (median of per-repeat ratios; target <= 1.5)\n",
              median(analyze_ratio));
  std::printf("  explain, 16 probes: momentum / plain sgd       x%.2f (target <= 4)\n", median(explain_mom_ratio));
  std::printf("  explain, 16 probes: adam / plain sgd           x%.2f (target <= 4)\n", median(explain_adam_ratio));
  std::printf("  peak resident memory of the process: %.0f MB (target < 2 GB)\n",
              static_cast<double>(ru.ru_maxrss) / 1024.0);
  return 0;
}
