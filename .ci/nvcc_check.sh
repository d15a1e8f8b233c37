#!/usr/bin/env bash
# Compiles every csrc/**/*.cu to an object file with nvcc against the installed torch's headers.
# The CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h, so a stub goes into a
# temporary include dir. Usage: .ci/nvcc_check.sh [arch, default sm_90]
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-sm_90}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/include/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$tmp/include/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t incs < <(python3 -c "
import torch.utils.cpp_extension as c
for p in c.include_paths(): print(p)")
abi=$(python3 -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
flags=(-diag-suppress 3306,3357 -std=c++20 -O1 "-arch=$arch" --expt-relaxed-constexpr
       "-D_GLIBCXX_USE_CXX11_ABI=$abi" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -Icsrc "-I$tmp/include")
for i in "${incs[@]}"; do flags+=("-I$i"); done
status=0
shopt -s globstar nullglob
files=(csrc/**/*.cu)
[ ${#files[@]} -gt 0 ] || { echo "nvcc check: no .cu files"; exit 1; }
for f in "${files[@]}"; do
  echo "nvcc $f"
  if ! "$NVCC" "${flags[@]}" -c "$f" -o "$tmp/$(basename "$f").o"; then
    echo "nvcc check: FAILED $f"; status=1
  fi
done
[ $status -eq 0 ] && echo "nvcc check: ${#files[@]} files compiled for $arch"
exit $status
