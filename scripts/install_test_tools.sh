#!/usr/bin/env bash
# Debian packages `make test` needs, installed when we can (root + apt-get) and missing:
#   chromium   the HTML report test opens report.html in a real headless browser;
#   golang-go  the Modelfile TEMPLATE tests render with Go's own text/template, as Ollama does;
#   cmake g++  scripts/build_llama_cpp.sh builds llama.cpp (llama-server, llama-perplexity, llama-quantize).
# Elsewhere (macOS, no root) it says what to install; the tests that need a missing tool fail and say so.
set -u
need=()
have_browser=0
for b in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$b" >/dev/null 2>&1 && have_browser=1
done
[ "$have_browser" = 1 ] || need+=(chromium)
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(uname -s)" = "Linux" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} (for the tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null && exit 0
  echo "warning: apt-get could not install ${need[*]}" >&2
  exit 0
fi
echo "note: the tests need ${need[*]}: install them (macOS: brew install go cmake; a browser: Chrome or Chromium)" >&2
exit 0
