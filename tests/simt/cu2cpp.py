"""Turns a .cu file into C++ that the simt emulator compiles. Three rewrites, nothing else:

- a launch `kernel<<<grid, block, smem, stream>>>(args)` becomes
  `::simt::launch(kernel, grid, block, smem, stream)(args)`;
- `extern __shared__ T name[];` becomes a pointer to the launch's dynamic shared memory;
- every `__global__` function starts with `SIMT_KERNEL_RAN`, which counts its runs (so the test
  suite can prove that each kernel executed) and enforces its `__launch_bounds__`;
- every static `__shared__` array is followed by a statement that poisons it once per block.

Line numbers are kept (rewrites never add or drop a newline), so the emulator's messages and
the compiler's point at the real .cu lines through the `#line` directive.
"""
import re
import sys

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:\s*<[^<>;{}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")
KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\(([^)]*)\)\s*)?(\w+)\s*\(")
# A static __shared__ array (not extern): poisoned by the first thread of each block to reach it.
STATIC_SHARED = re.compile(r"(?<![\w\s])(\s*)__shared__\s+[^;(){}]*?(\w+)\s*(?:\[[^\]]+\]\s*)+;")
# Counted independently of KERNEL, so a definition that KERNEL fails to parse is noticed.
GLOBAL_KEYWORD = re.compile(r"\b__global__\b")


def _end_of_parens(src, open_at):
    depth = 0
    for i in range(open_at, len(src)):
        if src[i] == "(":
            depth += 1
        elif src[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses")


def _instrument_kernels(src, path):
    """Inserts the run counter after the opening brace of every __global__ definition."""
    names, out, pos = [], [], 0
    for m in KERNEL.finditer(src):
        close = _end_of_parens(src, m.end() - 1)
        brace = src.find("{", close)
        if brace < 0 or src[close + 1:brace].strip():
            continue  # a declaration, not a definition
        bound, name = m.group(1), m.group(2)
        names.append(name)
        out.append(src[pos:brace + 1])
        out.append(' SIMT_KERNEL_RAN("%s", "%s", %s);' % (name, path, bound.split(",")[0] if bound else 1024))
        pos = brace + 1
    out.append(src[pos:])
    found = len(GLOBAL_KEYWORD.findall(src))
    if found != len(names):
        raise SystemExit("cu2cpp: %s has %d __global__ functions but %d were parsed (%s)"
                         % (path, found, len(names), ", ".join(names)))
    return "".join(out), names


def convert(src, path):
    """Returns (C++ source, kernel names). `path` is the name used in messages."""
    src, kernels = _instrument_kernels(src, path)
    src = STATIC_SHARED.sub(
        lambda m: m.group(0) + " ::simt::poison_static_smem(%s, sizeof(%s));" % (m.group(2), m.group(2)), src)
    src = LAUNCH.sub(
        lambda m: "::simt::launch(%s, %s)(" % (m.group(1), m.group(2)) + "\n" * m.group(0).count("\n"),
        src)
    src = EXTERN_SHARED.sub(
        lambda m: "%s* %s = static_cast<%s*>(::simt::dynamic_smem());" % (m.group(1), m.group(2), m.group(1)),
        src)
    if "<<<" in src:
        raise SystemExit("cu2cpp: %s: a launch was not rewritten" % path)
    if re.search(r"\bextern\s+__shared__", src):
        raise SystemExit("cu2cpp: %s: an extern __shared__ declaration was not rewritten" % path)
    return '#include "simt/simt.h"\n#line 1 "%s"\n%s' % (path, src), kernels


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        text, names = convert(f.read(), sys.argv[1])
    with open(sys.argv[2], "w") as f:
        f.write(text)
    print("%s: %d kernels: %s" % (sys.argv[1], len(names), ", ".join(names)))
