"""Builds tokred_ext._C from csrc/ with torch.utils.cpp_extension.

Switches (environment):
  TOKRED_FORCE_CUDA=1   compile the CUDA kernels even if torch or nvcc says there is no GPU build
  TOKRED_FORCE_CPU=1    never compile the CUDA kernels
  TORCH_CUDA_ARCH_LIST  CUDA architectures (read by torch.utils.cpp_extension)
  MAX_JOBS              parallel compile jobs (read by torch.utils.cpp_extension)
  TOKRED_DEBUG=1        -O0 -g host code (device line info is in every build)
  TOKRED_SANITIZE=1     host code with AddressSanitizer and UBSan (.ci/asan_check.sh; run Python
                        with libasan and libstdc++ preloaded)
"""
import glob
import os
import re
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    """The one version string, tokred_ext.__version__ (CMakeLists.txt reads it too)."""
    with open(os.path.join(ROOT, "tokred_ext", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _use_cuda():
    if _flag("TOKRED_FORCE_CPU"):
        return False
    if _flag("TOKRED_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _write_build_config(with_cuda):
    """Records what this build compiled, for tokred_ext.build_info()."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    with open(os.path.join(ROOT, "tokred_ext", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py; not tracked.\n")
        f.write("WITH_CUDA = %r\nCUDA_ARCH_LIST = %r\n" % (with_cuda, archs))


def _extension():
    with_cuda = _use_cuda()
    _write_build_config(with_cuda)
    host = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    device = sorted(glob.glob("csrc/cuda/*.cu")) if with_cuda else []
    debug = _flag("TOKRED_DEBUG")
    # Python's own CFLAGS carry -g: debug info for torch's templates doubles every translation
    # unit's compile time (merge_args.cpp: 21 s with it, 12 s without) and the library's size.
    # Release builds drop it; TOKRED_DEBUG=1 (and TOKRED_SANITIZE=1) bring it back.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx += ["-std=c++20"]
    # at::parallel_for is a header template: compiled without torch's OpenMP flag, every CPU
    # kernel runs on one thread. (Linux GCC/Clang; elsewhere the kernels stay serial.)
    link = []
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    if _flag("TOKRED_SANITIZE"):
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-fno-omit-frame-pointer", "-g"]
        cxx += sanitize
        link += sanitize
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    if with_cuda:
        return CUDAExtension(
            "tokred_ext._C",
            host + device,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "tokred_ext._C",
        host,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    name="tokred",
    version=_version(),
    description="Fused, exact token-reduction kernels for vision transformers (Top-K, EViT, ToMe, BiFormer)",
    packages=find_packages(include=["tokred_ext", "tokred_ext.*"]),
    package_data={"tokred_ext": ["assets/*.png"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest", "hypothesis", "expecttest", "numpy"], "vis": ["pillow"]},
    entry_points={"console_scripts": ["tokred=tokred_ext.cli:main"]},
)
