"""Builds tokred's CUDA kernels for the CPU under the simt emulator.

The result is one shared library holding the op libraries `tokred_simt` (every tokred schema,
with the CUDA kernels of csrc/cuda/*.cu registered as its CPU kernels) and `selftest_simt` (the
emulator's own test kernels). The .cu files are compiled unmodified, through cu2cpp.py.

    python tests/simt/build.py OUT_DIR [--asan] [--cuda-dir DIR]

prints the library's path. --asan adds AddressSanitizer (then run Python with libasan preloaded,
as .ci/simt_check.sh does). --cuda-dir takes the .cu files from another directory (mutants.py
builds mutated copies this way). Takes about a minute on 2 cores; it is a test target only and
never part of the installed package.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from cu2cpp import convert  # noqa: E402


def asan_preload():
    """LD_PRELOAD for a Python that loads the AddressSanitizer build: gcc's ASan runtime, and
    libstdc++ (Python does not link it; loaded later, ASan cannot intercept C++ throws)."""
    def lib(name):
        return subprocess.check_output(["g++", f"-print-file-name={name}"], text=True).strip()

    return f"{lib('libasan.so')} {lib('libstdc++.so.6')}"


def _write_if_changed(path, text):
    """Keeps the mtime of unchanged sources, so ninja rebuilds only what changed."""
    if os.path.exists(path) and open(path).read() == text:
        return
    with open(path, "w") as f:
        f.write(text)


def generate_sources(out, cuda_dir):
    """Writes the C++ sources of the emulated library into out/gen; returns their paths."""
    gen = os.path.join(out, "gen")
    os.makedirs(gen, exist_ok=True)
    csrc = os.path.join(ROOT, "csrc")
    registration = open(os.path.join(csrc, "registration.cpp")).read()
    if "TORCH_LIBRARY(tokred," not in registration:
        raise SystemExit("build.py: csrc/registration.cpp no longer declares TORCH_LIBRARY(tokred, m)")
    path = os.path.join(gen, "registration_simt.cpp")
    _write_if_changed(path, registration.replace("TORCH_LIBRARY(tokred,", "TORCH_LIBRARY(tokred_simt,"))
    sources = [path]
    cu_files = sorted(glob.glob(os.path.join(cuda_dir, "*.cu"))) + [os.path.join(HERE, "selftest.cu")]
    for cu in cu_files:
        shown = os.path.relpath(cu, ROOT) if cu.startswith(ROOT) else cu
        text, _ = convert(open(cu).read(), shown)
        path = os.path.join(gen, os.path.basename(cu)[:-3] + "_cu.cpp")
        _write_if_changed(path, text)
        sources.append(path)
    sources += sorted(glob.glob(os.path.join(csrc, "common", "*.cpp")))
    sources.append(os.path.join(HERE, "runtime.cpp"))
    return sources


def _asan_loaded():
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


def build(out, asan=False, cuda_dir=None, coverage=False, verbose=False):
    from torch.utils.cpp_extension import load

    if asan and not _asan_loaded():
        # torch's load() opens the library it built, which AddressSanitizer allows only in a
        # process that preloaded its runtime: build in such a child process.
        cmd = [sys.executable, os.path.abspath(__file__), out, "--asan"]
        cmd += ["--cuda-dir", cuda_dir] if cuda_dir else []
        cmd += ["--verbose"] if verbose else []
        env = dict(os.environ, LD_PRELOAD=asan_preload(), ASAN_OPTIONS="detect_leaks=0")
        return subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    os.environ.pop("LD_PRELOAD", None)  # the compilers need no sanitizer runtime
    out = os.path.abspath(out)
    cuda_dir = os.path.abspath(cuda_dir or os.path.join(ROOT, "csrc", "cuda"))
    os.makedirs(out, exist_ok=True)
    sources = generate_sources(out, cuda_dir)
    # The .cu files include "cuda/..." headers: a mutated copy must shadow csrc/cuda.
    includes = [os.path.join(HERE, "include"), os.path.dirname(cuda_dir), os.path.join(ROOT, "csrc")]
    cflags = ["-O1", "-g", "-std=c++20", "-Wno-unknown-pragmas"]
    ldflags = []
    if asan:
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    if coverage:  # gcov line and branch counts, mapped to the .cu lines by cu2cpp's #line
        cflags += ["--coverage", "-O0"]
        ldflags += ["--coverage"]
    print("simt: building %d sources into %s%s" % (len(sources), out, " (AddressSanitizer)" if asan else ""),
          file=sys.stderr, flush=True)
    start = time.time()
    load(name="tokred_simt", sources=sources, extra_include_paths=includes, extra_cflags=cflags,
         extra_ldflags=ldflags, build_directory=out, is_python_module=False, verbose=verbose)
    print("simt: built in %.0f s" % (time.time() - start), file=sys.stderr, flush=True)
    return os.path.join(out, "tokred_simt.so")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="build directory")
    parser.add_argument("--asan", action="store_true", help="build with AddressSanitizer")
    parser.add_argument("--cuda-dir", help="directory of the .cu files (default csrc/cuda)")
    parser.add_argument("--coverage", action="store_true", help="build with gcov counters (coverage.py)")
    parser.add_argument("--clean", action="store_true", help="remove the build directory first")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(args.out, ignore_errors=True)
    print(build(args.out, asan=args.asan, cuda_dir=args.cuda_dir, coverage=args.coverage,
                verbose=args.verbose))


if __name__ == "__main__":
    main()
