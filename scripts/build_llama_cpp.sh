#!/usr/bin/env bash
# One llama.cpp build for both GGUF runtimes medtune tests with:
#   - llama.cpp's tools (llama-server, llama-perplexity, llama-quantize), and
#   - llama-cpp-python, installed without its own build and given this build's libllama.
# The source is the llama.cpp tree inside llama-cpp-python's PyPI sdist, so the in-process runtime and
# the server run the very same llama.cpp. The build is cached under $MEDTUNE_CACHE (~/.cache/medtune):
# a second run, or a second checkout on the same machine, only copies the libraries.
#
#   bash scripts/build_llama_cpp.sh [PYTHON]                 PYTHON: the venv's python that gets llama-cpp-python
#   bash scripts/build_llama_cpp.sh --background [PYTHON]    `make all`: when nothing is built yet, build at idle
#        priority in the background (holding the build lock, which `medtune eval` waits on) and return at once
#
# On a Mac, `brew install llama.cpp` gives the tools as well; this script builds with Metal there.
set -euo pipefail

BACKGROUND=0
if [ "${1:-}" = "--background" ]; then BACKGROUND=1; shift; fi
PY=${1:-}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}   # llama-cpp-python release; its tree is llama.cpp@COMMIT
COMMIT=${LLAMA_CPP_COMMIT:-0c1e57098}         # from that release's CHANGELOG, shown by `llama-server --version`
CACHE=${MEDTUNE_CACHE:-$HOME/.cache/medtune}
JOBS=${JOBS:-$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)}

FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON "-DCMAKE_BUILD_RPATH=\$ORIGIN"
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
       -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF
       -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMIT="$COMMIT")
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  # -march=native builds die with SIGILL on quantized GGUFs on x86 VMs that advertise AMX: stay portable.
  FLAGS+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
fi
KEY=$(printf '%s ' "$VERSION" "$COMMIT" "${FLAGS[@]}" "$(uname -sm)" \
      | python3 -c "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:12])")
HOME_DIR="$CACHE/llama.cpp/$VERSION-$KEY"
SRC="$HOME_DIR/src"
BUILD="$HOME_DIR/build"
SDIST_DIR="$CACHE/llama.cpp/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
TOOLS=(llama-server llama-perplexity llama-quantize)

fetch_sdist() {
  [ -f "$SDIST" ] && return
  mkdir -p "$SDIST_DIR"
  echo "llama.cpp: downloading the llama-cpp-python $VERSION sdist (its llama.cpp tree, 77 MB)"
  python3 -m pip download -q --no-deps --no-binary llama-cpp-python -d "$SDIST_DIR" "llama-cpp-python==$VERSION"
}

build() {
  if [ -f "$HOME_DIR/build-info.json" ]; then
    echo "llama.cpp: cached build in $BUILD/bin"
    return
  fi
  fetch_sdist
  rm -rf "$SRC" "$BUILD"
  mkdir -p "$SRC"
  tar -xzf "$SDIST" -C "$SRC" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
  echo "llama.cpp: building ${TOOLS[*]} and libllama with $JOBS jobs (about 7 minutes on 2 free cores, once)"
  cmake -S "$SRC" -B "$BUILD" "${FLAGS[@]}" > "$HOME_DIR/configure.log" 2>&1 \
    || { tail -30 "$HOME_DIR/configure.log"; exit 1; }
  cmake --build "$BUILD" --target llama ggml "${TOOLS[@]}" -j "$JOBS" > "$HOME_DIR/build.log" 2>&1 \
    || { tail -40 "$HOME_DIR/build.log"; exit 1; }
  for t in "${TOOLS[@]}"; do "$BUILD/bin/$t" --help > /dev/null 2>&1 || [ $? -le 1 ] || { echo "$t does not run"; exit 1; }; done
  printf '{"source": "llama-cpp-python %s sdist", "commit": "%s", "flags": "%s", "built": "%s"}\n' \
    "$VERSION" "$COMMIT" "${FLAGS[*]}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$HOME_DIR/build-info.json.tmp"
  mv "$HOME_DIR/build-info.json.tmp" "$HOME_DIR/build-info.json"
}

install_python_binding() {
  [ -n "$PY" ] || return 0
  local site lib
  if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    fetch_sdist
    # The binding alone (ctypes code): the library comes from the build above, not a second compile.
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install -q --no-cache-dir "$SDIST"
  fi
  site=$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llama_cpp').origin))")
  lib="$site/lib"
  mkdir -p "$lib"
  cp -f "$BUILD"/bin/lib*.so* "$BUILD"/bin/lib*.dylib "$lib/" 2>/dev/null || true
  "$PY" -c "import llama_cpp; llama_cpp.llama_backend_init(); print('llama-cpp-python', llama_cpp.__version__, 'on', '$BUILD')"
}

link_tools() {
  # A stable place for `medtune doctor` and the tests to find the tools: $CACHE/llama.cpp/current.
  ln -sfn "$HOME_DIR" "$CACHE/llama.cpp/current.tmp" && mv -Tf "$CACHE/llama.cpp/current.tmp" "$CACHE/llama.cpp/current" 2>/dev/null \
    || { rm -f "$CACHE/llama.cpp/current"; ln -s "$HOME_DIR" "$CACHE/llama.cpp/current"; }
}

mkdir -p "$CACHE/llama.cpp"
if [ "${MEDTUNE_LLAMA_LOCK_HELD:-}" != 1 ]; then
  exec 9> "$CACHE/llama.cpp/.build.lock"
  flock 9 2>/dev/null || true   # two checkouts building at once wait for each other
fi
if [ "$BACKGROUND" = 1 ] && [ ! -f "$HOME_DIR/build-info.json" ]; then
  LOG="$CACHE/llama.cpp/build.log"
  echo "llama.cpp: building in the background at idle priority (log: $LOG); export and eval wait for it"
  # The child inherits fd 9 and with it the lock: `medtune eval` sees the build running until the child ends.
  # Idle priority where the OS has it (Linux SCHED_IDLE: only cycles training leaves free), else the lowest nice.
  low=(nice -n 19)
  command -v chrt > /dev/null 2>&1 && chrt -i 0 true 2> /dev/null && low=(chrt -i 0 nice -n 19)
  MEDTUNE_LLAMA_LOCK_HELD=1 nohup "${low[@]}" bash "$0" "$PY" > "$LOG" 2>&1 < /dev/null &
  exit 0
fi
build
link_tools
install_python_binding
