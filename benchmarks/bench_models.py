"""End-to-end throughput of DeiT-S and DeiT-B with each policy, tokred against the reference.

Uses the machinery of ``tokred bench`` (tokred_ext.bench). Examples:

    python benchmarks/bench_models.py                       # best device, its defaults
    python benchmarks/bench_models.py --device cpu --iters 3 --markdown
    python benchmarks/bench_models.py --device cuda --dtype float16 --batch-size 256 --json out.json
"""
import sys

from tokred_ext.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--models") for a in argv):
        argv = ["--models", "deit_small,deit_base"] + argv
    sys.exit(main(["bench"] + argv))
