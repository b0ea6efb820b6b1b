#!/usr/bin/env bash
# Build wgpy._native and wgpy._classify with AddressSanitizer + UndefinedBehaviorSanitizer
# into a temporary copy of the package and run the hostile corpus (tests/native/hostile.py)
# and the C intake's tests (tests/native/test_classify.py: hypothesis batches, a real
# socket drained) and the sending calls' (tests/native/test_send.py: super-packets cut and
# sealed, the longest segment there is; tests/native/test_route.py: the routing table;
# tests/native/test_writer.py: the TUN writer thread, buffers held until written;
# tests/native/test_udp_send.py: the UDP sends and their sender thread, buffers held until
# sent, but the one that needs a namespace of its own; tests/native/test_seal_send.py: a
# lone packet routed, sealed and sent in one call;
# tests/native/test_screen.py: initiations screened; tests/native/test_lone.py: a lone read
# opened in place, checked and written in one call; tests/native/test_reader.py: the UDP
# reader thread, its slots drained by the C intake, closed while busy, forked), the TUN
# reads into bytes of their own (a signal handler's read inside one included) and the
# checksum's largest sums through them.
# Usage: tests/native/sanitize.sh [seconds]   (exit status 0: clean)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SECONDS_TO_RUN=${1:-20}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r src/wgpy "$tmp/wgpy"
rm -f "$tmp"/wgpy/_native*.so "$tmp"/wgpy/_classify*.so
mkdir "$tmp/tests"
cp -r tests/__init__.py tests/namespaces.py tests/core tests/native tests/io "$tmp/tests/"
suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
gcc -shared -fPIC -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  -fno-omit-frame-pointer -Wall -Wextra -Werror -I"$include" \
  $(ls src/native/*.c | grep -vx -e src/native/classify.c -e src/native/reader.c) -lcrypto -o "$tmp/wgpy/_native$suffix"
gcc -shared -fPIC -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  -fno-omit-frame-pointer -ffp-contract=off -Wall -Wextra -Werror -I"$include" \
  src/native/classify.c src/native/reader.c -lcrypto -o "$tmp/wgpy/_classify$suffix"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$tmp" PYTHONMALLOC=malloc
"$PY" tests/native/hostile.py "$SECONDS_TO_RUN"
(cd "$tmp" && "$PY" -m pytest -q -x -p no:cacheprovider tests/native/test_classify.py \
  tests/native/test_reader.py tests/native/test_lone.py \
  tests/native/test_send.py tests/native/test_route.py tests/native/test_writer.py \
  tests/native/test_seal_send.py tests/native/test_udp_send.py --deselect \
  tests/native/test_udp_send.py::test_segments_above_the_path_mtu_go_one_by_one \
  tests/native/test_screen.py tests/native/test_offload_seal.py::test_read_packet \
  tests/native/test_offload_seal.py::test_a_signal_handler_reading_inside_read_packet_takes_its_own_buffer \
  tests/native/test_offload_seal.py::test_read_batch_with_read_packet_makes_the_same_items \
  tests/native/test_offload_seal.py::test_checksum_edges)
