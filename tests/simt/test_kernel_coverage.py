"""Runs last (conftest.py): every CUDA op and every __global__ kernel in csrc/cuda must have run
in the differential suite, so a new kernel without a differential test fails here."""
import ctypes
import glob
import os

import torch

import cu2cpp
import differential
from conftest import LIBRARY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ops_with_kernel(namespace, key):
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
            if name.startswith(namespace + "::")}


def test_every_op_has_a_cuda_kernel_and_a_differential_test():
    schemas = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("tokred::")}
    cuda_kernels = _ops_with_kernel("tokred_simt", "CPU")  # the CUDA kernels, emulated
    assert schemas, "no tokred ops registered"
    assert schemas == cuda_kernels, f"ops without a CUDA kernel: {sorted(schemas - cuda_kernels)}"
    untested = cuda_kernels - differential.TESTED_OPS
    assert not untested, f"CUDA ops without a differential test: {sorted(untested)}"


def test_every_kernel_ran():
    defined = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        _, names = cu2cpp.convert(open(path).read(), path)
        defined |= {f"{os.path.basename(path)}:{name}" for name in names}
    lib = ctypes.CDLL(LIBRARY)
    lib.simt_kernel_runs.restype = ctypes.c_char_p
    # By file name: mutants.py builds copies of csrc/cuda from another folder.
    ran = {os.path.basename(line.split()[0]) for line in lib.simt_kernel_runs().decode().splitlines()}
    assert len(defined) >= 29, sorted(defined)
    never = defined - ran
    assert not never, f"CUDA kernels that no differential test ran: {sorted(never)}"
