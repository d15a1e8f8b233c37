"""Line coverage of csrc/cuda/*.cu by the emulated suite: which kernel and host lines never ran.

Builds the emulated library with gcov counters, runs the suite once (forward schedule), and
prints, per .cu file, the executed share of its lines and every line that never ran. A line that
never ran is a path the differential suite does not test.

    python tests/simt/coverage.py [--build-dir build/simt-coverage]

Not part of CI (about 5 minutes); the latest result is in tests/simt/README.md.
"""
import argparse
import glob
import gzip
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import build  # noqa: E402


def line_counts(build_dir):
    """{path of a .cu file: {line: times run}} from the gcov data of every emulated .cu object."""
    counts = {}
    for gcda in glob.glob(os.path.join(build_dir, "*_cu.gcda")):
        out = subprocess.run(["gcov", "--json-format", "--stdout", "-o", build_dir, gcda],
                             cwd=build_dir, capture_output=True, check=True).stdout
        text = gzip.decompress(out).decode() if out[:2] == b"\x1f\x8b" else out.decode()
        for doc in text.splitlines():
            if not doc.strip():
                continue
            for f in json.loads(doc)["files"]:
                if not f["file"].endswith(".cu") or "selftest" in f["file"]:
                    continue
                mine = counts.setdefault(f["file"], {})
                for line in f["lines"]:
                    mine[line["line_number"]] = mine.get(line["line_number"], 0) + line["count"]
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default=os.path.join(ROOT, "build", "simt-coverage"))
    args = parser.parse_args()
    library = build.build(args.build_dir, coverage=True)
    for stale in glob.glob(os.path.join(args.build_dir, "*.gcda")):
        os.remove(stale)
    env = dict(os.environ, TOKRED_SIMT_LIB=library, SIMT_SCHEDULE="forward")
    suite = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HERE],
                           env=env, cwd="/")
    if suite.returncode != 0:
        raise SystemExit("the suite failed; coverage is only meaningful on a passing run")
    print("\n| file | lines run | never run |\n|---|---|---|")
    missed_any = False
    for path, lines in sorted(line_counts(args.build_dir).items()):
        source = open(os.path.join(ROOT, path)).read().splitlines()
        never = sorted(n for n, c in lines.items() if c == 0)
        missed_any |= bool(never)
        shown = ", ".join(str(n) for n in never) or "none"
        print(f"| {path} | {len(lines) - len(never)} of {len(lines)} | {shown} |")
        for n in never:
            print(f"    {path}:{n}: {source[n - 1].strip()}", file=sys.stderr)
    raise SystemExit(1 if missed_any else 0)


if __name__ == "__main__":
    main()
