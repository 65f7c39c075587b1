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

/// Sets LibTorch's intra-op threads and, when the loaded BLAS is OpenBLAS, its thread count,
/// to `threads` (>= 1). Returns what is in force afterwards.
ThreadInfo pin_threads(int threads);

}  // namespace pathkernel
