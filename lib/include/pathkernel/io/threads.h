#pragma once
/// \file threads.h
/// Pinning of compute threads. Debian's LibTorch multiplies through the system BLAS; OpenBLAS
/// ignores torch::set_num_threads and its results differ bit-wise between thread counts, so
/// both are pinned and recorded for a run to be reproducible.

#include <ATen/core/Tensor.h>

#include <string>

namespace pathkernel {

/// What the process computes with after pin_threads().
struct ThreadInfo {
  int torch_threads = 1;
  /// OpenBLAS threads, or -1 when the BLAS is not OpenBLAS.
  int blas_threads = -1;
  /// "openblas: <config>" or "reference (or unknown) BLAS".
  std::string blas;
  /// OpenBLAS's kernel set in force (openblas_get_corename: "Haswell", "Prescott", ...), or "".
  std::string blas_core;
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

/// The start-up self-check of the BLAS kernels: a 128x136 by 136x120 float64 product by `product`
/// (by default at::mm, through the BLAS in force) against a plain loop, as the largest
/// difference over the rounding scale sum_k |a_ik b_kj| of its entry. Rounding leaves ~1e-16;
/// kernels that compute wrong give far more (pathkernel-core then falls back, blas_core.h).
double blas_product_error(at::Tensor (*product)(const at::Tensor&, const at::Tensor&) = nullptr);

/// Pins OpenBLAS to `threads` for the life of the object and then restores the count in force
/// before: a replay runs a run's steps with the BLAS threads it was trained with (OpenBLAS
/// rounds differently with another count), while the analysis around it uses its own.
class ScopedThreads {
 public:
  explicit ScopedThreads(int threads);
  ~ScopedThreads();
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int blas_before_ = -1;
  bool changed_ = false;
};

}  // namespace pathkernel
