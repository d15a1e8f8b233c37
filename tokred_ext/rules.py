"""The production owner of tokred's counting rules: how many tokens each method keeps or merges.

Plain integer arithmetic, no tensors, no tokred imports: ``functional`` and ``nn`` call these, and
``reference.py`` keeps its own independent copies so the tests compare two implementations.

* :func:`topk_keep_count`: Haurum et al.'s Top-K, relative to the initial patch count.
* :func:`evit_keep_count`: EViT, relative to the current number of scored tokens.
* :func:`parse_r`: ToMe's per-layer merge schedule.
* :func:`tome_clamp_r`: ToMe's clamp, at most half of the unprotected tokens merge. The kernel
  (``tokred::bipartite_match``) applies the same clamp as its own contract.
* :func:`tome_partition_clamp_r`: dense ToMe's clamp over an explicit partition, as the kernel
  (``tokred::bipartite_match_plan``) applies it.

The annotations are TorchScript types, so a scripted model's policies compile these functions.
"""
import math
from typing import List, Tuple, Union

__all__ = ["topk_keep_count", "evit_keep_count", "parse_r", "tome_clamp_r",
           "tome_partition_clamp_r", "RSchedule"]

RSchedule = Union[int, List[int], Tuple[int, float]]


def topk_keep_count(keep_rate: float, n_initial: int) -> int:
    """Haurum et al.'s Top-K rule: ``int(keep_rate * N0)``, with N0 the initial patch count."""
    return int(keep_rate * n_initial)


def evit_keep_count(keep_rate: float, n_scored: int) -> int:
    """EViT's rule: ``ceil(keep_rate * (N - P))``, with N - P the current scored tokens."""
    return math.ceil(keep_rate * n_scored)


def parse_r(num_layers: int, r: RSchedule) -> List[int]:
    """Upstream ToMe's schedule: tokens merged in each of ``num_layers`` layers.

    An int is constant; a list is padded with zeros to ``num_layers``; ``(r, inflection)`` runs
    linearly from ``int(r * (1 - inflection))`` to ``2 r - that`` (inflection -1: decreasing,
    0: constant, 1: increasing), each value truncated with ``int``.
    """
    if isinstance(r, list):
        return r + [0] * (num_layers - len(r)) if len(r) < num_layers else list(r)
    if isinstance(r, tuple):
        base, inflection = r
    else:
        base, inflection = r, 0.0
    first = int(base * (1.0 - inflection))
    last = 2 * base - first
    step = (last - first) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(first + step * i) for i in range(num_layers)]


def tome_clamp_r(r: int, n: int, num_protected: int = 1) -> int:
    """The tokens one ToMe step merges among ``n``: ``r`` clamped to ``(n - protected) // 2``
    (at most half of the unprotected tokens), and 0 for ``r <= 0``."""
    return max(0, min(r, (n - num_protected) // 2))


def tome_partition_clamp_r(r: int, n: int, num_dst: int) -> int:
    """The tokens one dense ToMe step merges among ``n`` with ``num_dst`` destinations: ``r``
    clamped to the ``n - num_dst`` sources, 0 without destinations, and 0 for ``r <= 0``."""
    return max(0, min(r, n - num_dst if num_dst > 0 else 0))
