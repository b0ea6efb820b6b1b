#!/usr/bin/env bash
# Build wgpy._native and wgpy._classify with ThreadSanitizer into a temporary copy of the
# package and run the stress run (tests/native/stress.py) through it: two harnesses on two
# Python threads, each sealing and opening on the module's crypto workers, its server's TUN
# writes on a writer thread (TunWriter), its UDP sends on a sender thread (UdpSender) and
# its UDP reads on a reader thread (UdpReader, drained by the C intake); then
# tests/native/test_lone.py (lone reads written beside a TunWriter's thread).
# Usage: tests/native/tsan.sh [seconds]   (exit status 0: clean)
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_TO_RUN=${1:-20}
tsan="$(gcc -print-file-name=libtsan.so)"
# Not every python3 starts with TSan preloaded (pyenv's shims, shell scripts, crash): take
# the first that does and has wgpy's cryptography, of $TSAN_PYTHON, $PYTHON, the binary
# behind python3, python3 and the system's (exit 77, "skipped", if none).
probe='from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey as K
K.generate().public_key().public_bytes_raw()'
PY=
real=$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || true)  # behind a shim
for candidate in "${TSAN_PYTHON:-}" "${PYTHON:-}" "$real" python3 /usr/bin/python3; do
  if [ -n "$candidate" ] && LD_PRELOAD="$tsan" "$candidate" -c "$probe" 2>/dev/null; then
    PY=$candidate
    break
  fi
done
echo "tsan: $PY"
if [ -z "$PY" ]; then
  echo "no Python here runs under ThreadSanitizer"
  exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r src/wgpy "$tmp/wgpy"
rm -f "$tmp"/wgpy/_native*.so "$tmp"/wgpy/_classify*.so
suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
gcc -shared -fPIC -O1 -g -fsanitize=thread -fno-omit-frame-pointer -Wall -Wextra -Werror \
  -I"$include" $(ls src/native/*.c | grep -vx -e src/native/classify.c -e src/native/reader.c) -lcrypto -o "$tmp/wgpy/_native$suffix"
gcc -shared -fPIC -O1 -g -fsanitize=thread -fno-omit-frame-pointer -ffp-contract=off -Wall \
  -Wextra -Werror -I"$include" src/native/classify.c src/native/reader.c -lcrypto \
  -o "$tmp/wgpy/_classify$suffix"
# Python and OpenSSL are not instrumented: TSan sees the module's own memory accesses and
# every lock and thread (it intercepts pthreads), which is what the crypto threads use.
LD_PRELOAD="$tsan" \
TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0" \
PYTHONPATH="$tmp" "$PY" tests/native/stress.py "$SECONDS_TO_RUN" native 2
# a lone read written by the loop's thread beside a TunWriter's (open_lone's idle test)
mkdir "$tmp/tests"
cp -r tests/__init__.py tests/namespaces.py tests/native "$tmp/tests/"
(cd "$tmp" && LD_PRELOAD="$tsan" \
  TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0" \
  PYTHONPATH="$tmp" "$PY" -m pytest -q -x -p no:cacheprovider tests/native/test_lone.py)
