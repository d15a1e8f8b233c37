"""Mutation check of the emulated CUDA suite: does it catch typical GPU bugs?

Injects each bug below into a copy of csrc/cuda (never the real files), builds the copy once with
AddressSanitizer (each bug is switched on at run time by SIMT_MUTANT=k), and runs the differential
suite against every mutant under the forward and reverse schedules. A mutant is caught when a run
fails. Prints a table and exits non-zero if a mutant survives, or if the unmutated build fails.

    python tests/simt/mutants.py [--build-dir build/simt-mutants] [--only K ...]

Takes 30 minutes or more on 2 cores (the unmutated run alone takes about 5). tokred_ext must be
importable from / (installed, or PYTHONPATH=$PWD with an in-place build). Not part of CI; the
latest result is in tests/simt/README.md.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import build  # noqa: E402

# (file, what the bug is, original text, mutated text with {on} for the run-time switch)
MUTANTS = [
    ("select.cu", "missing __syncthreads: topk ranks the row before every thread has loaded it",
     "row[i] = static_cast<acc_t>(src[i]);\n    __syncthreads();",
     "row[i] = static_cast<acc_t>(src[i]);\n    if (!{on}) __syncthreads();"),
    ("routing.cu", "missing __syncwarp: the attention forward reads P before the warp wrote it",
     "      P_w[lane] = p;\n      __syncwarp();",
     "      P_w[lane] = p;\n      if (!{on}) __syncwarp();"),
    ("select.cu", "a shuffle reduction that half of the warp skips (EViT's score gradient)",
     "      dot = cuda::warp_reduce_sum(dot);",
     "      if (!{on} || lane < 16) dot = cuda::warp_reduce_sum(dot);"),
    ("select.cu", "dynamic shared memory one element short (topk's row)",
     "const size_t smem = static_cast<size_t>(n) * sizeof(acc_t);",
     "const size_t smem = (static_cast<size_t>(n) - ({on} ? 1 : 0)) * sizeof(acc_t);"),
    ("select.cu", "__syncthreads in divergent code: only half of select_kept's block reaches it",
     "      rank[i] = rank_in_row(row, N, i, /*largest=*/true);\n    }\n    __syncthreads();",
     "      rank[i] = rank_in_row(row, N, i, /*largest=*/true);\n    }\n"
     "    if (!{on} || threadIdx.x < 128) __syncthreads();"),
    ("merge.cu", "missing __syncthreads: bipartite_match scores tiles before every thread has loaded them",
     "      __syncthreads();\n#pragma unroll\n      for (int jj = 0; jj < kTileJ; ++jj) {",
     "      if (!{on}) __syncthreads();\n#pragma unroll\n      for (int jj = 0; jj < kTileJ; ++jj) {"),
    ("launch.cuh", "off-by-one in the shared grid-stride bound (i <= total)",
     "threadIdx.x; i < (total); \\\n",
     "threadIdx.x; i < (total) + ({on} ? 1 : 0); \\\n"),
    ("merge.cu", "a plan check that covers only the first batch row (merge_by_plan trusts the rest)",
     "  TOKRED_GRID_STRIDE(i, B * nout) {\n    const int64_t b = i / nout, o = i % nout;\n    const PlanFault",
     "  TOKRED_GRID_STRIDE(i, {on} ? nout : B * nout) {\n    const int64_t b = i / nout, o = i % nout;\n"
     "    const PlanFault"),
    ("launch.cuh", "a shuffle reduction with the wrong lane offset (warp_sum starts at 8, not 16)",
     "for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_down_sync",
     "for (int o = {on} ? kWarp / 4 : kWarp / 2; o > 0; o /= 2) x += __shfl_down_sync"),
    ("merge.cu", "a block index that loses the chunk: every block of a row matches its first 128 A tokens",
     "a0 = (blockIdx.x % chunks) * kRows;",
     "a0 = ({on} ? 0 : blockIdx.x % chunks) * kRows;"),
    ("segment.cu", "missing __syncthreads: the segment plan advances a run before every thread has read its slot",
     "+ rank.before] = k;\n    __syncthreads();",
     "+ rank.before] = k;\n    if (!{on}) __syncthreads();"),
]


def write_mutated_sources(dst):
    """Copies csrc/cuda to dst with every mutant injected behind its switch."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "csrc", "cuda"), dst)
    for k, (name, what, old, new) in enumerate(MUTANTS, start=1):
        path = os.path.join(dst, name)
        text = open(path).read()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {k} ({what}): the text to mutate occurs {text.count(old)} times "
                             f"in csrc/cuda/{name}; update mutants.py to the kernels")
        with open(path, "w") as f:
            f.write(text.replace(old, new.replace("{on}", f"::simt::mutant({k})")))


def run_suite(library, mutant, schedule):
    """True if the suite passed (the mutant survived this run)."""
    env = dict(os.environ, TOKRED_SIMT_LIB=library, TOKRED_SIMT_ASAN="1", SIMT_MUTANT=str(mutant),
               SIMT_SCHEDULE=schedule, LD_PRELOAD=build.asan_preload(),
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1")
    # -s: AddressSanitizer's report goes to the real stderr (pytest's capture would lose it).
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider", "--no-header",
           os.path.join(HERE)]
    child = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True)
    return child.returncode == 0, (child.stdout + child.stderr)


def first_failure(log):
    """The line that says why the run failed: a sanitizer report, else pytest's first error."""
    lines = log.splitlines()
    for line in lines:
        if "ERROR: AddressSanitizer" in line:
            return line.split("ERROR: ", 1)[1].strip()[:160]
    for line in lines:
        if line.startswith(("E ", "FAILED", "ERROR")):
            return line.strip()[:160]
    return lines[-1][:160] if lines else "(no output)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default=os.path.join(ROOT, "build", "simt-mutants"))
    parser.add_argument("--only", type=int, nargs="*", help="run only these mutants (1-based)")
    args = parser.parse_args()
    src = os.path.join(args.build_dir, "src", "cuda")
    write_mutated_sources(src)
    library = build.build(os.path.join(args.build_dir, "lib"), asan=True, cuda_dir=src)
    ok, log = run_suite(library, 0, "forward")
    if not ok:
        print(log[-3000:])
        raise SystemExit("the suite fails without any mutant: fix that first")
    survivors = 0
    print("| # | bug | caught by | seconds |\n|---|---|---|---|")
    for k, (name, what, _, _) in enumerate(MUTANTS, start=1):
        if args.only and k not in args.only:
            continue
        start, caught = time.time(), None
        for schedule in ("forward", "reverse"):
            ok, log = run_suite(library, k, schedule)
            if not ok:
                caught = f"{schedule}: {first_failure(log)}"
                break
        survivors += caught is None
        print(f"| {k} | {name}: {what} | {caught or '**SURVIVED**'} | {time.time() - start:.0f} |", flush=True)
    print(f"\n{len(args.only or MUTANTS) - survivors} of {len(args.only or MUTANTS)} mutants caught")
    raise SystemExit(1 if survivors else 0)


if __name__ == "__main__":
    main()
