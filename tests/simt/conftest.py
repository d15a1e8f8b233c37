"""The emulated CUDA suite: loads the library that build.py made (TOKRED_SIMT_LIB), or builds it
into build/simt first, and runs the coverage test after every other test."""
import os
import sys

import pytest
import torch

import tokred_ext  # noqa: F401  (torch.ops.tokred: the CPU kernels to compare with)

HERE = os.path.dirname(os.path.abspath(__file__))


def _library():
    path = os.environ.get("TOKRED_SIMT_LIB")
    if path:
        if not os.path.exists(path):
            raise pytest.UsageError(f"TOKRED_SIMT_LIB={path} does not exist: build it with "
                                    "python tests/simt/build.py DIR")
        return path
    sys.path.insert(0, HERE)
    import build

    return build.build(os.path.join(os.path.dirname(os.path.dirname(HERE)), "build", "simt"))


LIBRARY = _library()
torch.ops.load_library(LIBRARY)


def pytest_report_header(config):
    return [f"simt: {LIBRARY}, schedule {os.environ.get('SIMT_SCHEDULE', 'forward')}"]


def pytest_collection_modifyitems(session, config, items):
    # The coverage test reads what the others ran: it goes last, and only judges a whole run.
    items.sort(key=lambda item: item.fspath.basename == "test_kernel_coverage.py")
    files = {str(item.fspath) for item in items}
    whole = {os.path.join(HERE, f) for f in os.listdir(HERE) if f.startswith("test_") and f.endswith(".py")} <= files
    if not whole or config.option.keyword or config.option.markexpr:
        skip = pytest.mark.skip(reason="coverage is judged on a run of the whole suite")
        for item in items:
            if item.fspath.basename == "test_kernel_coverage.py":
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    import differential

    if differential.WORST_ERROR:
        by_dtype = {}
        for (op, dtype), ratio in differential.WORST_ERROR.items():
            by_dtype[dtype] = max(by_dtype.get(dtype, 0.0), ratio)
        terminalreporter.write_line("simt: largest |CPU - emulated CUDA| as a fraction of its bound: " +
                                    ", ".join(f"{d} {r:.3f}" for d, r in sorted(by_dtype.items())))
