#pragma once
/// \file threads.h
/// Pinning of compute threads. Debian's LibTorch multiplies through the system BLAS; OpenBLAS
/// ignores torch::set_num_threads and its results differ bit-wise between thread counts, so
/// both are pinned and recorded for a run to be reproducible.

#include <string>

namespace pathkernel {

/// What the process computes with after pin_threads().
struct ThreadInfo {
  int torch_threads = 1;
  /// OpenBLAS threads, or -1 when the BLAS is not OpenBLAS.
  int blas_threads = -1;
  /// "openblas: <config>" or "reference (or unknown) BLAS".
  std::string blas;
};

/// Keeps large allocations on the heap for the life of the process. LibTorch allocates each
/// step's activations and gradients (hundreds of KB) afresh; with glibc's default, adaptive
/// thresholds these are often mmapped or trimmed and page-faulted in again at every step, which
/// was measured to slow a training step by up to 30% (bench/bench_step.cpp). Call once at the
/// start of main(), before any tensor exists; the library never calls it itself.
void tune_allocator();

/// Sets LibTorch's intra-op threads and, when the loaded BLAS is OpenBLAS, its thread count,
/// to `threads` (>= 1). Returns what is in force afterwards.
ThreadInfo pin_threads(int threads);

}  // namespace pathkernel
