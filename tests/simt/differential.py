"""Runs an op as CUDA code under the emulator (torch.ops.tokred_simt) and as the CPU kernel
(torch.ops.tokred), and compares the results.

Indices and other integer outputs must be equal. Float outputs that are copies of the input (a
gather, a top-k value) must be bitwise equal. Float outputs that are sums compare within
`tolerance(dtype)`:

Both backends accumulate in the op-math type (float32 for float16, bfloat16 and float32; float64
for float64) and round once to the output dtype. They may add the terms in a different order (the
CPU kernels use SIMD blocks, CUDA a warp tree; a real GPU also fuses multiply-adds). For the sizes
here (at most a few thousand terms of magnitude about 1) the op-math results differ by well under
1e-5 relative in float32 and 1e-12 in float64; rounding that to float16 or bfloat16 moves the
output by at most one unit in the last place (2^-10 and 2^-7 relative). So the bound is one
output ulp plus the accumulation slack, relative to the output's magnitude and to the scale of its
terms (`scale`, for outputs that cancel to near zero). Measured maxima are far below it
(tests/simt/README.md).
"""
import re

import pytest
import torch

CPU = torch.ops.tokred
EMU = torch.ops.tokred_simt

# Ops run by the suite, for test_kernel_coverage.py.
TESTED_OPS = set()
# (op, dtype) -> the largest |CPU - emulated CUDA| / bound seen, for the run's summary.
WORST_ERROR = {}

_ACCUMULATION = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
_ULP = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def tolerance(dtype, scale=1.0):
    """(rtol, atol) for a summed output of `dtype` whose terms have magnitude about `scale`."""
    rtol = 2 * _ULP[dtype] + _ACCUMULATION[dtype]
    return rtol, rtol * scale


def run_both(name, *args):
    """(CPU result, emulated CUDA result) of op `name`, each a tuple of tensors."""
    TESTED_OPS.add(name)
    cpu = getattr(CPU, name)(*args)
    emu = getattr(EMU, name)(*args)
    as_tuple = lambda r: tuple(r) if isinstance(r, (tuple, list)) else (r,)  # noqa: E731
    return as_tuple(cpu), as_tuple(emu)


def assert_bitwise(cpu, emu, what):
    assert cpu.dtype == emu.dtype and cpu.shape == emu.shape, \
        f"{what}: CPU {cpu.dtype}{list(cpu.shape)} vs emulated CUDA {emu.dtype}{list(emu.shape)}"
    if cpu.is_floating_point():
        same = (cpu == emu) | (cpu.isnan() & emu.isnan())
    else:
        same = cpu == emu
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} of {cpu.numel()} elements differ, first at "
                             f"{bad}: CPU {[cpu[tuple(i)].item() for i in bad]} vs emulated CUDA "
                             f"{[emu[tuple(i)].item() for i in bad]}")


def assert_close(cpu, emu, what, scale=1.0):
    assert cpu.dtype == emu.dtype and cpu.shape == emu.shape, \
        f"{what}: CPU {cpu.dtype}{list(cpu.shape)} vs emulated CUDA {emu.dtype}{list(emu.shape)}"
    rtol, atol = tolerance(cpu.dtype, scale)
    a, b = cpu.double(), emu.double()
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN in different places"
    finite = a.isfinite() & b.isfinite()
    assert torch.equal(a[~finite].nan_to_num(0.0), b[~finite].nan_to_num(0.0)), f"{what}: inf differs"
    err = (a - b).abs()[finite]
    bound = (atol + rtol * a.abs())[finite]
    key = (what.split()[0], str(cpu.dtype).replace("torch.", ""))
    if err.numel():
        WORST_ERROR[key] = max(WORST_ERROR.get(key, 0.0), (err / bound).max().item())
    if err.numel() and bool((err > bound).any()):
        worst = int((err - bound).argmax())
        raise AssertionError(f"{what}: max |CPU - emulated CUDA| = {err.max().item():.3g} "
                             f"(bound {bound[worst].item():.3g}: rtol {rtol:.2g}, atol {atol:.2g})")


def compare(name, *args, exact=(), scale=1.0):
    """Runs op `name` on both backends and compares every output: integer outputs and those whose
    positions are in `exact` bitwise, other float outputs within the tolerance. Returns the CPU
    outputs."""
    cpu, emu = run_both(name, *args)
    assert len(cpu) == len(emu)
    for i, (a, b) in enumerate(zip(cpu, emu)):
        what = f"{name} output {i}"
        if i in exact or not a.is_floating_point():
            assert_bitwise(a, b, what)
        else:
            assert_close(a, b, what, scale)
    return cpu


def assert_both_raise(name, *args, match):
    """The CPU kernel and the emulated CUDA kernel both reject the input with a clear message
    (`match`, a regex, must occur in the emulated error)."""
    TESTED_OPS.add(name)
    with pytest.raises(RuntimeError):
        getattr(CPU, name)(*args)
    with pytest.raises(RuntimeError) as info:
        getattr(EMU, name)(*args)
    assert re.search(match, str(info.value)), f"{name}: unclear error: {info.value}"
    return str(info.value)
