"""tokred models."""
from .biformer import biformer_base, biformer_small, biformer_tiny

__all__ = ["biformer_tiny", "biformer_small", "biformer_base"]
