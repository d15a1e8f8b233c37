#!/usr/bin/env bash
# The GPU truth in one call: build the CUDA kernels, run the whole test suite with its CUDA cases,
# run compute-sanitizer over the CUDA tests, and run the benchmarks. Results go to $OUT (the
# device tool's output folder) or ./gpu-results.
#
#   bash benchmarks/gpu_check.sh [build|test|sanitize|bench|all]   (default: all)
#
# `all` takes longer than the device tool's 10 minutes per command: run `build`, `test`,
# `sanitize` and `bench` as separate calls on the same warm machine. The exit status is 1 if any
# step failed, and each stage refuses to run without a GPU and tokred's CUDA kernels (without them
# the tests would pass on their CPU cases alone).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-gpu-results}"
out=$(cd "${OUT:-gpu-results}" && pwd)  # absolute: the bench stage changes folder
what=${1:-all}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
run() { echo "=== $* ($(date +%T))"; "$@" || { echo "=== FAILED: $*"; status=1; }; }
require_cuda_kernels() {
  python3 -c "import torch, tokred_ext, sys; sys.exit(not (torch.cuda.is_available() and tokred_ext.build_info()['cuda_kernels']))" \
    || { echo "=== FAILED: no GPU, or tokred was built without its CUDA kernels (see $out/build.log)"; exit 1; }
}

if [[ $what == build || $what == all ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"
  run env TOKRED_FORCE_CUDA=1 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1
  python3 -c "import tokred_ext, json; print(json.dumps(tokred_ext.build_info()))" | tee -a "$out/device.txt"
fi
require_cuda_kernels
if [[ $what == test || $what == all ]]; then
  run python3 -m pytest -q tests > "$out/tests.log" 2>&1
  tail -30 "$out/tests.log"
fi
if [[ $what == sanitize || $what == all ]]; then
  # Small fuzz counts keep the sanitizers (10-100x slower) inside the time limit. Without the
  # caching allocator every tensor is its own allocation, so memcheck and initcheck see accesses
  # past a tensor's end and reads of bytes never written, which a pooled block would hide.
  # compute-sanitizer needs a machine that supports it (KINDS.md: not on gVisor).
  for tool in memcheck racecheck initcheck synccheck; do
    run env TOKRED_FUZZ_CASES=30 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python3 -m pytest -q -x -k "cuda and not compile and not jit" \
      tests/test_select.py tests/test_select_fuzz.py tests/test_merge_fuzz.py tests/test_routing.py \
      > "$out/sanitize-$tool.log" 2>&1
    tail -3 "$out/sanitize-$tool.log"
  done
fi
if [[ $what == bench || $what == all ]]; then
  cd benchmarks
  for dtype in float16 bfloat16; do
    run python3 bench_ops.py --device cuda --dtype "$dtype" --json "$out/ops-$dtype.json" > "$out/ops-$dtype.md"
  done
  run python3 bench_merge.py --device cuda --json "$out/merge.json" > "$out/merge.md"
  [[ -f bench_routing.py ]] && run python3 bench_routing.py --json "$out/routing.json" > "$out/routing.md"
  for dtype in float16 bfloat16; do
    run python3 bench_models.py --device cuda --dtype "$dtype" --batch-size 256 --markdown \
      --no-progress --json "$out/models-$dtype.json" > "$out/models-$dtype.md"
  done
  cd ..
fi
exit $status
