#!/usr/bin/env bash
# The op tests under AddressSanitizer and UBSan: builds tokred_ext._C with TOKRED_SANITIZE=1 in a
# copy of the checkout (the installed package stays as it is) and runs the op, fuzz and bad-input
# tests against it with the sanitizer runtimes preloaded. Any out-of-bounds access, use after
# free or undefined behaviour in a CPU kernel or a check fails the run.
#
#   bash .ci/asan_check.sh            (build dir: build/asan; ASAN_BUILD overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${ASAN_BUILD:-build/asan}
step() { echo; echo "--- asan: $* ($(date +%T))"; }

step "build tokred_ext._C with -fsanitize=address,undefined"
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/src"
git ls-files -z | (mkdir -p "$out/src" && xargs -0 cp --parents -t "$out/src")
(cd "$out/src" && TOKRED_SANITIZE=1 TOKRED_FORCE_CPU=1 python3 setup.py -q build_ext --inplace > "$out/build.log" 2>&1) \
  || { tail -40 "$out/build.log"; exit 1; }

step "op tests under the sanitizers"
preload="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)"
# From the copy's tests, with the copy first on the path: the sanitized build is the one imported.
# -s: a sanitizer report goes to the real stderr (pytest's capture would lose it on the abort).
cd "$out/src"
PYTHONPATH="$out/src" LD_PRELOAD="$preload" \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  TOKRED_FUZZ_CASES=${TOKRED_FUZZ_CASES:-200} \
  python3 -m pytest -q -s -p no:cacheprovider tests/test_select.py tests/test_select_fuzz.py tests/test_merge.py \
    tests/test_merge_fuzz.py tests/test_routing.py tests/test_bad_inputs.py
cd "$root"
