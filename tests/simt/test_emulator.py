"""The emulator itself (selftest.cu): correct CUDA gives CUDA's answer under every schedule, and
each kind of GPU bug that the differential suite relies on it to expose is reported."""
import os
import subprocess
import sys

import pytest
import torch

RUN = torch.ops.selftest_simt.run
ASAN = os.environ.get("TOKRED_SIMT_ASAN") == "1"


def _expected_shuffle(op, lane, param, width):
    """CUDA's source lane for a shuffle (CUDA C++ Programming Guide, warp shuffle functions)."""
    base = lane - lane % width
    if op == "idx":
        return base + param % width
    if op == "down":
        return lane + param if lane - base + param < width else lane
    if op == "up":
        return lane - param if lane - base >= param else lane
    src = lane ^ param  # xor: a later segment is out of reach
    return src if src - src % width <= base else lane


def test_barrier_orders_shared_memory():
    x = torch.arange(256.0)
    assert torch.equal(RUN("reverse", x), x.flip(0))


def test_missing_barrier_changes_the_result():
    # Whatever the schedule, some thread reads its partner's slot before it is written and sees
    # the poison: this is how a missing __syncthreads shows in the differential suite.
    x = torch.arange(64.0)
    out = RUN("reverse_no_barrier", x)
    assert not torch.equal(out, x.flip(0))
    assert out.isnan().any()


@pytest.mark.parametrize("param", [0, 1, 3, 5, 16, 31])
def test_shuffles_follow_cuda_rules(param):
    x = torch.arange(32.0) * 10
    out = RUN(f"shuffle_{param}", x).reshape(4, 3, 32)
    for o, op in enumerate(["idx", "down", "up", "xor"]):
        for w, width in enumerate([32, 16, 8]):
            expected = [x[_expected_shuffle(op, lane, param, width)].item() for lane in range(32)]
            assert out[o, w].tolist() == expected, (op, width, param)


def test_butterfly_sum_over_many_blocks():
    x = torch.randint(-8, 8, (64 * 5,)).float()
    out = RUN("warp_sum", x).reshape(-1, 32)
    assert torch.equal(out, x.reshape(-1, 32).sum(1, keepdim=True).expand(-1, 32))


def test_half_warps_sync_with_their_own_masks():
    x = torch.arange(32.0)
    assert RUN("half_warp_sync", x).tolist() == [0.0] * 16 + [16.0] * 16


@pytest.mark.parametrize("kernel, message", [
    ("barrier_in_branch", r"deadlock: 32 threads wait at __syncthreads.*32 have exited"),
    ("two_barriers", r"divergent __syncthreads: thread 0 waits at tests/simt/selftest.cu:\d+, thread 32 at"),
    ("shuffle_after_exit", r"__shfl_down_sync in warp 0: the mask names lane 16, which has exited"),
    ("shuffle_in_branch", r"__shfl_down_sync in warp 0 while lane 16 waits at __syncthreads"),
    ("mask_past_block", r"the mask names lane 16, which does not exist in a block of 16 threads"),
    ("shuffle_outside_mask", r"__shfl_sync in warp 0: lane 0 reads lane 20, which is not in the mask"),
    ("smem_write_past_end", r"a write past the 256 B of dynamic shared memory \(byte 256\) in block \(0,0,0\)"),
    ("smem_write_before_start", r"a write 4 B before the start of dynamic shared memory"),
    ("smem_over_default_limit", r"dynamic shared memory of 65536 B is over the 49152 B allowed"),
    ("static_plus_dynamic_over_default",
     r"static shared memory of 32768 B plus dynamic of 20480 B is over the 49152 B a block has "
     r"without cudaFuncSetAttribute"),
    ("opt_in_past_device_limit", r"cudaFuncSetAttribute allowed 204800 B of dynamic shared memory "
                                 r"beside 32768 B of static: over the 232448 B"),
    ("block_too_large", r"invalid block \(2048,1,1\)"),
    # Threads 0-2 see negative inputs; the schedule decides which of them fails first.
    ("assert", r"device-side assert triggered: tests/simt/selftest.cu:\d+: block \(0,0,0\) thread \([012],0,0\): "
               r"Assertion .*selftest: negative input"),
    ("launch_bounds", r"bounded_kernel launched with 256 threads per block, over its __launch_bounds__ of 128"),
])
def test_gpu_bugs_are_reported(kernel, message):
    if ASAN and kernel.startswith("smem_write"):
        pytest.skip("AddressSanitizer stops the process at the write (test_asan_reports)")
    x = torch.arange(64.0) - (3 if kernel == "assert" else 0)
    with pytest.raises(RuntimeError, match=message):
        RUN(kernel, x)
    # The failed launch leaves the emulator usable, and a later launch correct.
    assert torch.equal(RUN("reverse", x), x.flip(0))


def test_static_and_dynamic_shared_memory_fit_together_after_the_opt_in():
    assert torch.equal(RUN("static_plus_dynamic_opted_in", torch.zeros(64)), torch.full((64,), 3.0))


def test_static_shared_memory_is_poisoned_in_every_block():
    # Block 0 writes the array, blocks 1..3 only read it: on a GPU they read garbage; here NaN.
    out = RUN("stale_static_smem", torch.zeros(256)).reshape(4, 64)
    assert torch.equal(out[0], torch.ones(64))
    assert out[1:].isnan().all()


def test_unknown_kernel_is_an_error():
    with pytest.raises(RuntimeError, match="no kernel named nope"):
        RUN("nope", torch.zeros(1))


@pytest.mark.skipif(not ASAN, reason="needs the AddressSanitizer build")
@pytest.mark.parametrize("kernel, report", [
    ("global_overread", "heap-buffer-overflow"),  # one element past a tensor
    ("smem_write_past_end", "use-after-poison"),  # into the guard after dynamic shared memory
    ("smem_write_before_start", "use-after-poison"),
])
def test_asan_reports(kernel, report):
    # In a child process: AddressSanitizer stops the process that made the access.
    code = ("import torch, os; torch.ops.load_library(os.environ['TOKRED_SIMT_LIB']); "
            f"torch.ops.selftest_simt.run('{kernel}', torch.zeros(64))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode != 0
    assert report in child.stderr and "selftest.cu" in child.stderr, child.stderr[-3000:]
