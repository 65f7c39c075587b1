#pragma once
/// \file blas_core.h
/// Which OpenBLAS kernel set ("core type") a command computes with. OpenBLAS 0.3.21 (Debian's)
/// may not know a newer CPU and fall back to its SSE3 "Prescott" kernels, 1.6-2x slower here;
/// kernel sets also differ bit-wise, so a run's replay must use the core it was trained with.
/// OpenBLAS reads OPENBLAS_CORETYPE when it loads, so the `pathkernel` launcher decides before
/// it starts pathkernel-core (free of LibTorch). The rules, in order:
///   1. OPENBLAS_CORETYPE set in the environment: kept, always (some machines set it because an
///      older OpenBLAS computes wrong results or crashes on their processor).
///   2. PATHKERNEL_BLAS_CORE=keep: nothing is chosen (OpenBLAS detects as it would).
///   3. The command reads a run whose manifest records a core (train --resume, replay, analyze,
///      explain): that core, so that replay stays bit-identical.
///   4. OpenBLAS detected a generic core on a CPU whose flags support a better one: the better
///      one (SkylakeX: AVX-512 F/DQ/BW/VL; Haswell: AVX2 and FMA; SandyBridge: AVX).
/// pathkernel-core then checks a small product against a plain loop and, on any difference
/// beyond rounding, starts again with the detected core (blas_self_check).

#include <string>

namespace pathkernel {

/// What to put in OPENBLAS_CORETYPE before OpenBLAS loads ("" for nothing), and why.
struct BlasCoreChoice {
  std::string core;
  std::string reason;  ///< for the log: "environment", "keep", "run", "cpu", "detected"
};

/// The best kernel set for a CPU with these /proc/cpuinfo flags ("" when none beats generic).
std::string best_core_for_flags(const std::string& cpu_flags);

/// True for OpenBLAS's generic x86-64 kernel sets (SSE2/SSE3 only: Prescott, Core2, ...).
bool is_generic_core(const std::string& core);

/// The rules above. `env_core`: OPENBLAS_CORETYPE's value (nullptr when unset); `keep`:
/// PATHKERNEL_BLAS_CORE=keep; `run_core`: the core a run's manifest records ("" if none);
/// `detected`: what OpenBLAS picks by itself ("" when the BLAS is not OpenBLAS).
BlasCoreChoice choose_blas_core(const char* env_core, bool keep, const std::string& run_core,
                                const std::string& detected, const std::string& cpu_flags);

/// The "flags" line of /proc/cpuinfo ("" when it cannot be read).
std::string read_cpu_flags();

}  // namespace pathkernel
