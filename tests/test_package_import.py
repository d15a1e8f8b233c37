"""Importing a copy of the package whose kernels are not built: one clear ImportError."""
import importlib.machinery
import os
import shutil
import subprocess
import sys

import tokred_ext

PACKAGE = os.path.dirname(os.path.abspath(tokred_ext.__file__))


def _import_copy(tmp_path, so_bytes=None):
    """Imports a copy of tokred_ext's Python files in a fresh interpreter (without _C, or with a
    _C file holding ``so_bytes``); returns that interpreter's stderr."""
    copy = tmp_path / "tokred_ext"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    if so_bytes is not None:
        (copy / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(so_bytes)
    res = subprocess.run([sys.executable, "-c", "import tokred_ext"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert res.returncode != 0
    return res.stderr


def test_unbuilt_package_says_how_to_build(tmp_path):
    err = _import_copy(tmp_path)
    last = err.strip().splitlines()[-1]
    assert last.startswith("ImportError: tokred_ext is not built: its compiled extension _C is "
                           f"missing from {tmp_path / 'tokred_ext'}"), err
    assert "pip install --no-build-isolation ." in last
    assert "python setup.py build_ext --inplace" in last
    assert "cannot import name" not in err  # the bare error is not chained on


def test_a_broken_build_keeps_its_own_error(tmp_path):
    # A _C that is there but does not load (here: not a library at all) is another fault, with
    # its own message; "not built" would send the reader the wrong way.
    err = _import_copy(tmp_path, so_bytes=b"not a shared library")
    assert "not built" not in err and "_C" in err.strip().splitlines()[-1], err
