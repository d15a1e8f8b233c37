"""tokred modules."""
from .routing import BiLevelRoutingAttention

__all__ = ["BiLevelRoutingAttention"]
