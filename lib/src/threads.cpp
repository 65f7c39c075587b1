#include "pathkernel/threads.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <malloc.h>

#include <stdexcept>

namespace pathkernel {

void tune_allocator() {
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

ThreadInfo pin_threads(int threads) {
  if (threads < 1) throw std::invalid_argument("--threads must be at least 1");
  at::set_num_threads(threads);
  ThreadInfo info;
  info.torch_threads = at::get_num_threads();
  // OpenBLAS reads OPENBLAS_NUM_THREADS when it loads, before main(); the only reliable way to
  // pin it afterwards is its own setter, looked up at run time so that any libblas.so.3 works.
  using SetFn = void (*)(int);
  using GetFn = int (*)();
  using ConfigFn = char* (*)();
  auto set = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  auto get = reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  auto config = reinterpret_cast<ConfigFn>(dlsym(RTLD_DEFAULT, "openblas_get_config"));
  if (set && get) {
    set(threads);
    info.blas_threads = get();
    info.blas = std::string("openblas") + (config ? std::string(": ") + config() : "");
  } else {
    info.blas = "reference (or unknown) BLAS";
  }
  return info;
}

}  // namespace pathkernel
