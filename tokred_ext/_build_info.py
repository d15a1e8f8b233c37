"""What this installation of tokred was built with."""
import torch

from . import _C

try:
    from . import _build_config
except ImportError:  # built by an older setup.py or copied by hand
    _build_config = None


def registered_ops():
    """Names of the ops in the ``tokred`` namespace, e.g. ``tokred::topk``."""
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tokred::"))


def build_info():
    """A dict: torch version, whether CUDA kernels are compiled, their archs, how many threads the
    CPU kernels run on (torch.get_num_threads() where built with torch's OpenMP, else 1), whether
    the CPU routing kernels fuse their multiply-adds (a CPU with FMA; ``TOKRED_CPU_FMA=0`` turns it
    off), and the op names."""
    ops = registered_ops()
    with_cuda = any(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA") for n in ops)
    return {
        "torch_version": torch.__version__,
        "cuda_kernels": with_cuda,
        "cuda_arch_list": getattr(_build_config, "CUDA_ARCH_LIST", "") if with_cuda else "",
        "cpu_kernel_threads": _C._parallel_threads(),
        "cpu_fused_multiply_add": _C._cpu_fused_multiply_add(),
        "ops": ops,
    }
