#!/usr/bin/env bash
# Prints the OpenBLAS kernel sets (OPENBLAS_CORETYPE values) that the unit tests run under besides
# this machine's own, one per line: Prescott (generic SSE3), Haswell (AVX2), and SkylakeX where
# the CPU has AVX-512; SandyBridge (AVX) stands in when one of them is the native set, so that
# there are always at least two others. Kernel sets round differently, so a test whose tolerance
# is tuned to one machine's rounding fails here rather than on a user's machine (issue 22).
# Prints nothing when libblas.so.3 is not OpenBLAS.
set -euo pipefail
native=""
if [ -x /usr/bin/python3 ]; then
  # The set OpenBLAS picks by itself: Debian's python3 with ctypes, no third-party module.
  native=$(env -u OPENBLAS_CORETYPE OPENBLAS_NUM_THREADS=1 /usr/bin/python3 - <<'PY' 2>/dev/null || true
import ctypes
try:
    f = ctypes.CDLL("libblas.so.3").openblas_get_corename
    f.restype = ctypes.c_char_p
    print(f().decode())
except (OSError, AttributeError):
    pass
PY
)
fi
[ -n "$native" ] || exit 0  # not OpenBLAS: the kernel set cannot be chosen
candidates=(Prescott Haswell)
grep -qw avx512f /proc/cpuinfo && candidates+=(SkylakeX)
candidates+=(SandyBridge)
picked=0
for c in "${candidates[@]}"; do
  [ "${c,,}" = "${native,,}" ] && continue
  if [ "$c" = SandyBridge ] && [ "$picked" -ge 2 ]; then continue; fi
  echo "$c"
  picked=$((picked + 1))
done
