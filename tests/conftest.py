"""Shared test parameters: every test runs on the CPU, and on CUDA where kernels and a GPU exist."""
import os
import tempfile
from pathlib import Path

import pytest
import torch

import tokred_ext

# A compile cache of this session's own: Inductor's on-disk cache (/tmp/torchinductor_<user>)
# served graphs compiled against another tokred build, which called an op with its old schema.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tokred-tests-inductor-"))
# Deterministic-mode tests run nn.Linear on CUDA too, and cuBLAS is deterministic only with a fixed
# workspace: without this, torch.use_deterministic_algorithms(True) makes those matmuls raise. Read
# when the first cuBLAS handle is made, so it is set before any CUDA work.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

CUDA = torch.cuda.is_available() and tokred_ext.build_info()["cuda_kernels"]
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Random cases per fuzz test; gpu_check.sh lowers it under compute-sanitizer.
FUZZ_CASES = int(os.environ.get("TOKRED_FUZZ_CASES", "1000"))
# Tolerances for results that sum in a different order from the reference.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
}


def pytest_ignore_collect(collection_path, config):
    """tests/simt runs the CUDA kernels under the emulator, against a library it builds first:
    .ci/simt_check.sh runs it, and so does naming it (`pytest tests/simt`); `pytest tests` skips it."""
    simt = Path(__file__).parent / "simt"
    if collection_path != simt:
        return None
    named = [Path(str(a).split("::")[0]).resolve() for a in config.args]
    return None if any(p == simt or simt in p.parents for p in named) else True


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).split(".")[-1])
def dtype(request):
    return request.param


def tie_free(shape, dtype=torch.float32, device="cpu", generator=None):
    """Distinct values (a random permutation), exactly representable in every dtype."""
    n = 1
    for s in shape:
        n *= s
    perm = torch.randperm(n, generator=generator).reshape(shape)
    # 256 distinct levels are exact even in bfloat16; larger tensors repeat levels across rows.
    vals = (perm % 256).to(torch.float64) / 256.0 if n > 256 else perm.to(torch.float64) / max(n, 1)
    return vals.to(dtype=dtype, device=device)


def rows_tie_free(rows, n, dtype=torch.float32, device="cpu", generator=None):
    """[rows, n] whose every row holds distinct values (n <= 256 stays exact in bfloat16)."""
    keys = torch.rand(rows, n, generator=generator).argsort(dim=-1).to(torch.float64)
    return (keys / max(n, 1)).to(dtype=dtype, device=device)
