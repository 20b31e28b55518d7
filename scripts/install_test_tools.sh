#!/usr/bin/env bash
# The HTML report test opens report.html in a real headless browser. Install Debian's chromium when
# we can (root + apt-get) and none is on PATH; otherwise the test skips and says why.
set -u
for b in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$b" >/dev/null 2>&1 && exit 0
done
[ "$(uname -s)" = "Linux" ] || exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (headless browser for the HTML report test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null && exit 0
  echo "warning: apt-get could not install chromium; the HTML report test will be skipped" >&2
  exit 0
fi
echo "note: no Chromium/Chrome found and not root: the HTML report test will be skipped" >&2
exit 0
