"""tokred: fused, exact token-reduction kernels for vision transformers.

Importing this package registers every op as ``torch.ops.tokred.*``, their autograd formulas,
their FLOP formulas (``torch.utils.flop_counter``; docs/flops.md) and, for the legacy ONNX
exporter, a clear refusal (docs/export.md). ``compile_aoti`` and ``load_aoti`` build and load
AOTInductor packages of models that call the ops (docs/export.md).
"""
import importlib.util
import os

import torch  # noqa: F401  (torch first: _C links against its libraries)

try:
    from . import _C  # noqa: F401  (loads the kernels; registers torch.ops.tokred.*)
except ImportError:
    # A _C that exists but does not load (built against another torch, say) keeps its own error;
    # only a missing one gets this message, instead of "cannot import name '_C'".
    if importlib.util.find_spec(__name__ + "._C") is not None:
        raise
    raise ImportError(
        "tokred_ext is not built: its compiled extension _C is missing from "
        f"{os.path.dirname(os.path.abspath(__file__))}. Build it with `pip install "
        "--no-build-isolation .` (and run Python outside the source tree, where this unbuilt "
        "copy is imported first), or in place with `python setup.py build_ext --inplace`.") from None
from . import ops  # noqa: F401  (registers autograd)
from . import flop_formulas  # noqa: F401  (registers FLOP formulas, SDPA's CPU kernel included)
from . import onnx_legacy
from ._build_info import build_info
# AOTInductor packages call the ops by name: the loader lives where importing it loads them.
from .aoti import compile_aoti, load_aoti
# The function shadows its module's name on the package: tokred_ext.flops(model, x). Imported
# here, not lazily, so that importing the submodule first cannot leave the module in its place.
from .flops import flops

onnx_legacy.register()  # the legacy ONNX exporter names the exporter that works (docs/export.md)

__version__ = "0.1.0"
__all__ = ["build_info", "compile_aoti", "flops", "load_aoti", "ops", "__version__"]
