#!/usr/bin/env bash
# Build wgpy._native with AddressSanitizer + UndefinedBehaviorSanitizer into a temporary
# copy of the package and run the hostile corpus (tests/native/hostile.py) through it.
# Usage: tests/native/sanitize.sh [seconds]   (exit status 0: clean)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SECONDS_TO_RUN=${1:-20}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r src/wgpy "$tmp/wgpy"
rm -f "$tmp"/wgpy/_native*.so
suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
gcc -shared -fPIC -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  -fno-omit-frame-pointer -Wall -Wextra -Werror -I"$include" \
  src/wgpy/_native.c -lcrypto -o "$tmp/wgpy/_native$suffix"
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
PYTHONPATH="$tmp" PYTHONMALLOC=malloc \
  "$PY" tests/native/hostile.py "$SECONDS_TO_RUN"
