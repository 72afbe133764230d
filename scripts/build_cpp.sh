#!/usr/bin/env bash
# Build the C++ runner (runtime/cpp) into build/cpp/mesa_generate and the custom-op library
# (runtime/ops) into build/cpp/libmesa_ops.so, fetching what it needs from Debian's packages:
#   cmake, g++, nlohmann-json3-dev  the system's apt (installed when missing; needs root, as in CI)
#   ONNX Runtime headers            Debian 13 "trixie" libonnxruntime-dev, downloaded with apt pointed at a trixie
#                                   list in a private apt directory under build/ (the system's apt is not changed)
#                                   and unpacked with dpkg-deb -x; older-API headers work with the newer library
#   ONNX Runtime library            the onnxruntime wheel in the virtualenv (capi/libonnxruntime.so.<version>),
#                                   linked through a libonnxruntime.so.1 symlink (its SONAME)
# What it fetched stays in build/cpp-deps/, so a rerun only rebuilds what changed.
# Exit 3 (one line on stderr): the build tools cannot be had on this machine; any other failure is the build's.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DEPS=$ROOT/build/cpp-deps
OUT=$ROOT/build/cpp
cannot() { echo "build_cpp: $*" >&2; exit 3; }

# 1. compiler, cmake and nlohmann/json from the system's apt
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
[ -f /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || cannot "missing ${missing[*]}; install them with: apt-get install -y ${missing[*]} (as root)"
  command -v apt-get >/dev/null || cannot "missing ${missing[*]} and no apt-get to install them"
  echo "build_cpp: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q "${missing[@]}" || { apt-get update -q && apt-get install -y -q "${missing[@]}"; }; } >&2 \
    || cannot "apt-get install ${missing[*]} failed"
fi

# 2. the ONNX Runtime shared library of the virtualenv's onnxruntime wheel (found without importing it)
LIB=$("$PYTHON" - <<'EOF' 2>/dev/null
import glob, importlib.util, os
spec = importlib.util.find_spec("onnxruntime")
found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "capi", "libonnxruntime.so.*")))
print(found[0])
EOF
) || cannot "no onnxruntime wheel with libonnxruntime.so.* in $PYTHON's environment"
mkdir -p "$DEPS/lib"
ln -sfn "$LIB" "$DEPS/lib/libonnxruntime.so.1"

# 3. the ONNX Runtime C/C++ headers: trixie's libonnxruntime-dev through a private apt directory
INC=$DEPS/onnxruntime-dev/usr/include/onnxruntime
if [ ! -f "$INC/onnxruntime_cxx_api.h" ]; then
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || cannot "apt-get and dpkg-deb are needed to fetch libonnxruntime-dev"
  # the Debian mirror the system's apt already uses (its main suite), with trixie in place of its suite
  . /etc/os-release
  targets=$(apt-get indextargets --format '$(SITE) $(RELEASE)' "Identifier: Packages")
  SITE=$(awk -v r="${VERSION_CODENAME:-}" '$2 == r {print $1; exit}' <<<"$targets")
  [ -n "$SITE" ] || SITE=$(awk '$2 !~ /-/ {print $1; exit}' <<<"$targets")
  [ -n "$SITE" ] || cannot "the system's apt has no Debian source to take the trixie list from"
  KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -f "$KEYRING" ] || cannot "no $KEYRING (package debian-archive-keyring) to check the trixie list with"
  APT=$DEPS/apt
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/sourceparts"
  echo "deb [signed-by=$KEYRING] $SITE trixie main" > "$APT/sources.list"
  opts=(-o Dir::Etc::sourcelist="$APT/sources.list" -o Dir::Etc::sourceparts="$APT/sourceparts"
        -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" -o Dir::State::status=/dev/null
        -o Acquire::Languages=none -o APT::Sandbox::User=root -q)
  apt-get "${opts[@]}" update >&2 || cannot "apt-get update of the trixie list ($SITE) failed"
  rm -f "$APT"/libonnxruntime-dev_*.deb
  (cd "$APT" && apt-get "${opts[@]}" download libonnxruntime-dev) >&2 \
    || cannot "apt-get download libonnxruntime-dev failed"
  rm -rf "$DEPS/onnxruntime-dev"
  dpkg-deb -x "$APT"/libonnxruntime-dev_*.deb "$DEPS/onnxruntime-dev"
  rm -rf "$APT/lists"  # the trixie index (~10 MB) is not needed once the headers are unpacked; the .deb stays
  [ -f "$INC/onnxruntime_cxx_api.h" ] || cannot "libonnxruntime-dev holds no onnxruntime_cxx_api.h"
fi

# 4. configure and build
cmake -S runtime/cpp -B "$OUT" -DCMAKE_BUILD_TYPE=Release \
  -DONNXRUNTIME_INCLUDE_DIR="$INC" -DONNXRUNTIME_LIBRARY="$DEPS/lib/libonnxruntime.so.1" >&2
cmake --build "$OUT" -j "$(nproc)" >&2
echo "$OUT/mesa_generate"
