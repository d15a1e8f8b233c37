"""Count a model's FLOPs, in total and per block, with ``torch.utils.flop_counter``.

``flops(model, images)`` runs the model once under ``FlopCounterMode`` and reports the total and,
for each block, its FLOPs and the tokens entering and leaving it, so a reduction schedule shows
up as the FLOPs it saves. tokred's ops and SDPA's CPU kernel are counted by the formulas of
:mod:`tokred_ext.flop_formulas` (rules: docs/flops.md).

The package re-exports :func:`flops` at import, so this module imports only torch and the
formulas: importing ``nn`` or ``models`` from here would be an import cycle. Models are found by
shape instead: timm-style ViTs (tokred's and timm's) by ``model.blocks``, BiFormer by
``model.stages`` (every block of every stage).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from . import flop_formulas  # noqa: F401  (the formulas must be registered before counting)

__all__ = ["flops", "FlopReport", "BlockFlops"]


@dataclass(frozen=True)
class BlockFlops:
    """One block: its name in the model (``blocks.3``, ``stages.2.5``), the tokens entering and
    leaving it (None where its input is not ``[B, N, C]`` or ``[B, C, H, W]``) and its FLOPs."""

    name: str
    tokens_in: Optional[int]
    tokens_out: Optional[int]
    flops: int

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one forward pass of ``batch`` images. A multiply-add counts 2 FLOPs, as in
    torch's counter; ``gmacs`` is half of ``gflops`` (papers that say "FLOPs" usually mean MACs:
    DeiT-S's "4.6 GFLOPs" is 4.6 GMACs). ``blocks`` is empty when counted with
    ``per_block=False``."""

    flops: int
    batch: int
    blocks: Tuple[BlockFlops, ...]
    by_op: Dict[str, int]

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9

    @property
    def outside_blocks(self) -> int:
        """The FLOPs not in any block (patch embedding, downsampling, head)."""
        return self.flops - sum(b.flops for b in self.blocks)

    def as_dict(self) -> dict:
        """Plain values, for JSON."""
        return {"flops": self.flops, "gflops": self.gflops, "gmacs": self.gmacs,
                "batch": self.batch, "outside_blocks": self.outside_blocks,
                "blocks": [{"name": b.name, "tokens_in": b.tokens_in, "tokens_out": b.tokens_out,
                            "flops": b.flops, "gflops": b.gflops} for b in self.blocks],
                "by_op": dict(self.by_op)}


def _blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    stages = getattr(model, "stages", None)
    if isinstance(stages, (nn.ModuleList, nn.Sequential)):
        return [(f"stages.{s}.{j}", b) for s, stage in enumerate(stages)
                for j, b in enumerate(stage)]
    raise ValueError(f"flops: cannot find the blocks of {type(model).__name__} (no 'blocks' or "
                     "'stages' module list); count the total only with per_block=False")


def _tokens(value) -> Optional[int]:
    """Tokens in a block's input or output: ``[B, N, C]`` (ViT) holds N, ``[B, C, H, W]``
    (BiFormer) H·W. A tuple (tokred's ViT block returns ``(x, size, source)``) counts its first
    element."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, Tensor):
        return None
    if value.dim() == 3:
        return value.shape[1]
    if value.dim() == 4:
        return value.shape[2] * value.shape[3]
    return None


class _BlockProbe:
    """Forward hooks on one block: the counter's total before and after each call of it."""

    def __init__(self, counter: FlopCounterMode, block: nn.Module):
        self.counter = counter
        self.flops = 0
        self.tokens_in: Optional[int] = None
        self.tokens_out: Optional[int] = None
        self._start = 0
        self.handles = [block.register_forward_pre_hook(self._pre),
                        block.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self._start = self.counter.get_total_flops()
        if self.tokens_in is None:  # a block run twice keeps its first input's count
            self.tokens_in = _tokens(args[0] if args else None)

    def _post(self, module, args, output):
        self.flops += self.counter.get_total_flops() - self._start
        self.tokens_out = _tokens(output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def flops(model: nn.Module, input: Tensor, per_block: bool = True) -> FlopReport:
    """FLOPs of ``model(input)``: one forward pass in eval mode without autograd (every module's
    training flag is restored afterwards). ``per_block`` also splits them by block (ViT:
    ``model.blocks``; BiFormer: ``model.stages``) with the tokens entering and leaving each.

    The count depends on shapes only, not on weights or pixel values: the policies' token
    counts are fixed by their schedules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"flops: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(input, Tensor):
        raise TypeError(f"flops: input must be a Tensor of images, got {type(input).__name__}")
    if input.dim() == 0:
        raise ValueError("flops: input must have a batch dimension, got a 0-d tensor")
    blocks = _blocks(model) if per_block else []
    counter = FlopCounterMode(display=False)
    probes = [(name, _BlockProbe(counter, blk)) for name, blk in blocks]
    modes = [(m, m.training) for m in model.modules()]  # restored one by one: they may differ
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(input)
    finally:
        for m, mode in modes:
            m.training = mode
        for _, probe in probes:
            probe.remove()
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return FlopReport(flops=counter.get_total_flops(), batch=input.shape[0],
                      blocks=tuple(BlockFlops(name, p.tokens_in, p.tokens_out, p.flops)
                                   for name, p in probes),
                      by_op=by_op)
