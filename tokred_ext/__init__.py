"""tokred: fused, exact token-reduction kernels for vision transformers.

Importing this package registers every op as ``torch.ops.tokred.*`` and their autograd formulas.
"""
import torch  # noqa: F401  (torch first: _C links against its libraries)

from . import _C  # noqa: F401  (loads the kernels; registers torch.ops.tokred.*)
from . import ops  # noqa: F401  (registers autograd)
from ._build_info import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "ops", "__version__"]
