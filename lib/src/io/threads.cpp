#include "pathkernel/io/threads.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace pathkernel {

void tune_allocator() {
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1024 << 20);
}

namespace {

using SetFn = void (*)(int);
using GetFn = int (*)();

SetFn blas_setter() { return reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")); }
GetFn blas_getter() { return reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads")); }

}  // namespace

ScopedThreads::ScopedThreads(int threads) {
  // Only OpenBLAS's count: at::set_num_threads rebuilds LibTorch's thread pool (measured: 2
  // thread switches per step made a 2-thread analysis slower than 1 thread), and LibTorch's own
  // kernels on a step's tensors give the same bits with any count (their reductions stay below
  // the parallel grain); the replay tests check it bit for bit.
  static const SetFn set = blas_setter();
  static const GetFn get = blas_getter();
  if (!set || !get) return;
  blas_before_ = get();
  if (blas_before_ == threads) return;
  changed_ = true;
  set(threads);
}

ScopedThreads::~ScopedThreads() {
  static const SetFn set = blas_setter();
  if (changed_ && set) set(blas_before_);
}

double blas_product_error(at::Tensor (*product)(const at::Tensor&, const at::Tensor&)) {
  // Above OpenBLAS's small-matrix path (M N K <= 100^3 on AVX-512 cores): the main kernels are checked.
  const int64_t m = 128, k = 136, n = 120;
  at::Tensor a = at::empty({m, k}, at::kDouble), b = at::empty({k, n}, at::kDouble);
  double* pa = a.data_ptr<double>();
  double* pb = b.data_ptr<double>();
  for (int64_t i = 0; i < m * k; ++i) pa[i] = std::sin(0.37 * static_cast<double>(i) + 0.1);
  for (int64_t i = 0; i < k * n; ++i) pb[i] = std::cos(0.23 * static_cast<double>(i) - 0.4);
  const at::Tensor c = (product ? product(a, b) : at::mm(a, b)).contiguous();
  const double* pc = c.data_ptr<double>();
  double worst = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      long double sum = 0, scale = 0;
      for (int64_t t = 0; t < k; ++t) {
        sum += static_cast<long double>(pa[i * k + t]) * pb[t * n + j];
        scale += std::fabs(static_cast<long double>(pa[i * k + t]) * pb[t * n + j]);
      }
      const double e = static_cast<double>(std::fabs(pc[i * n + j] - sum) / scale);
      worst = std::isnan(e) ? INFINITY : std::max(worst, e);
    }
  }
  return worst;
}

ThreadInfo pin_threads(int threads) {
  if (threads < 1) throw std::invalid_argument("--threads must be at least 1");
  at::set_num_threads(threads);
  ThreadInfo info;
  info.torch_threads = at::get_num_threads();
  // OpenBLAS reads OPENBLAS_NUM_THREADS when it loads, before main(); the only reliable way to
  // pin it afterwards is its own setter, looked up at run time so that any libblas.so.3 works.
  using ConfigFn = char* (*)();
  const SetFn set = blas_setter();
  const GetFn get = blas_getter();
  auto config = reinterpret_cast<ConfigFn>(dlsym(RTLD_DEFAULT, "openblas_get_config"));
  if (set && get) {
    set(threads);
    info.blas_threads = get();
    info.blas = std::string("openblas") + (config ? std::string(": ") + config() : "");
    using CoreFn = char* (*)();
    if (auto core = reinterpret_cast<CoreFn>(dlsym(RTLD_DEFAULT, "openblas_get_corename"))) info.blas_core = core();
  } else {
    info.blas = "reference (or unknown) BLAS";
  }
  return info;
}

}  // namespace pathkernel
