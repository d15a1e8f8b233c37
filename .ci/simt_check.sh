#!/usr/bin/env bash
# Executes every CUDA kernel of csrc/cuda on the CPU under the simt emulator (tests/simt) and
# compares it with the CPU kernels: the differential suite (and the bad-input table of
# tests/test_bad_inputs.py, with the emulated kernels as a backend) under the forward, reverse and
# random thread schedules, then once more with the library built with AddressSanitizer, so an
# out-of-bounds global access in a kernel fails too. Needs tokred installed. Exits non-zero on any
# mismatch or emulator error.
#
#   bash .ci/simt_check.sh            (build dir: build/simt; SIMT_BUILD overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${SIMT_BUILD:-build/simt}
export SIMT_SEED=${SIMT_SEED:-12345} PYTHONUNBUFFERED=1
step() { echo; echo "--- simt: $* ($(date +%T))"; }

step "build the emulated library"
lib=$(python3 tests/simt/build.py "$out/plain")
step "build it again with AddressSanitizer"
asan_lib=$(python3 tests/simt/build.py "$out/asan" --asan)

# pytest, not python -m pytest: the installed tokred_ext must be imported, not the source tree.
for schedule in forward reverse random; do
  step "differential suite, schedule $schedule"
  SIMT_SCHEDULE=$schedule TOKRED_SIMT_LIB=$lib pytest -q -p no:cacheprovider tests/simt tests/test_bad_inputs.py
done

step "differential suite under AddressSanitizer, schedule random"
SIMT_SCHEDULE=random TOKRED_SIMT_LIB=$asan_lib TOKRED_SIMT_ASAN=1 \
  LD_PRELOAD=$(python3 -c "import sys; sys.path.insert(0, 'tests/simt'); import build; print(build.asan_preload())") \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
  pytest -q -s -p no:cacheprovider tests/simt tests/test_bad_inputs.py  # -s: keep a sanitizer report
