#!/usr/bin/env bash
# Installs pathkernel's dependencies from Debian's packages (bookworm; as root, or through sudo)
# and builds everything in build/ with Ninja and ccache. Arguments name extra packages to
# install. Safe to run again: it installs only what is missing and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  cmake g++ ninja-build ccache git
  libtorch-dev libspdlog-dev libcxxopts-dev libgtest-dev nlohmann-json3-dev zlib1g-dev
  libopenblas0-pthread          # LibTorch multiplies through libblas.so.3: ~14x faster than reference BLAS
  dataset-fashion-mnist         # /usr/share/datasets/fashion-mnist
  python3-torch python3-numpy   # scripts/check_*.py: checkpoints load with torch.load; independent checks
  gnuplot-nox                   # PNG figures of explain and report
)
packages+=("$@")  # extra packages a caller needs (scripts/test.sh: clang for the sanitizer stage)
# Without the packages they recommend: pandas recommends SciPy, Matplotlib, PyTables and more
# (about 80 packages through them), none of which pathkernel uses.
lean=(
  python3-pandas                # optional for users (python/pathkernel_read.py's DataFrames); its test needs it
)
missing_of() {  # the packages named that are not installed
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
  done
}
mapfile -t missing < <(missing_of "${packages[@]}")
mapfile -t missing_lean < <(missing_of "${lean[@]}")
if ((${#missing[@]} + ${#missing_lean[@]})); then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  echo "setup: installing ${missing[*]} ${missing_lean[*]}" >&2
  $sudo apt-get update -qq
  if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ((${#missing_lean[@]})); then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing_lean[@]}" >/dev/null
  fi
fi

# Build progress goes to stderr: stdout is for the results of the commands that follow.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >&2
cmake --build build -j 2 >&2

# Puts `pathkernel` on PATH: PREFIX/bin/pathkernel, with the recorder, examples and checks in
# PREFIX/share/pathkernel. PATHKERNEL_PREFIX chooses the prefix (default /usr/local, which needs
# root or sudo; $HOME/.local needs neither); PATHKERNEL_PREFIX=none skips the installation.
prefix="${PATHKERNEL_PREFIX:-/usr/local}"
if [ "$prefix" != none ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ] && ! [ -w "$prefix" ]; then sudo=sudo; fi
  if [ -n "$sudo" ] && ! command -v sudo >/dev/null; then
    echo "setup: cannot write $prefix (no sudo): pathkernel stays in build/apps; PATHKERNEL_PREFIX=\$HOME/.local installs it" >&2
  else
    $sudo cmake --install build --prefix "$prefix" >/dev/null
    case ":$PATH:" in
      *":$prefix/bin:"*) ;;
      *) echo "setup: installed $prefix/bin/pathkernel; add $prefix/bin to PATH" >&2 ;;
    esac
  fi
fi
