#!/usr/bin/env bash
# MLX's Linux CPU wheel multiplies float32 matrices with a reference BLAS; medtune binds the system
# OpenBLAS instead (20-25x faster). Install it when we can (root + apt-get); otherwise say how.
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
if ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing OpenBLAS (libopenblas0-pthread) for fast MLX on CPU"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq libopenblas0-pthread >/dev/null && exit 0
  echo "warning: apt-get could not install libopenblas0-pthread; training will be ~20x slower" >&2
  exit 0
fi
echo "note: OpenBLAS not found and not root: run 'sudo apt-get install libopenblas0-pthread'" \
     "(or your distribution's openblas package); 'medtune doctor' shows the state" >&2
exit 0
