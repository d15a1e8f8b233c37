"""tokred: fused, exact token-reduction kernels for vision transformers.

Importing this package registers every op as ``torch.ops.tokred.*`` and their autograd formulas.
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
from ._build_info import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "ops", "__version__"]
