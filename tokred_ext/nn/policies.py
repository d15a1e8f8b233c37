"""Token-reduction policies: where in the network to reduce, by how much, and with which method.

A policy is handed to a model (``VisionTransformer(reduction=...)``) or to
``tokred_ext.patch.timm``. For every forward pass a :class:`ReductionState` (the one driver of the
reduction loop, used by both) asks the policy for a per-layer ``plan`` (one entry per block,
``None`` where the block does not reduce); each block then calls ``reduce`` after its attention
residual and before its MLP, as EViT, Haurum et al. and ToMe do.

A plan entry is the policy's own per-block setting, which only the policy reads: TopK's token
count (``plan`` turns its keep rates into counts, from the initial tokens), EViT's keep rate (its
count depends on the tokens present then), ToMe's requested ``r``. ``reduce`` turns EViT's and
ToMe's entries into integer counts once, with the rules of :mod:`tokred_ext.rules`, and passes
every count to ``tokred_ext.functional``, which owns the "keep everything" check.

:func:`policy_from_spec` is the one parser of the command line's policy strings (``tome:13``).

The policies hold no parameters. They call only ``tokred_ext.functional`` and ``tokred_ext.rules``.

TorchScript: ``torch.jit.script(model)`` compiles the driver as a TorchScript class and the
policy the model holds. The driver and the blocks call a policy only through
:class:`PolicyInterface` (a ``torch.jit.interface``), so every policy marks the methods it
names ``@torch.jit.export`` (TorchScript compiles only ``forward`` otherwise); the driver calls
a block through :class:`ReducingBlock`. Each policy's ``reduce`` repeats the full annotated
signature because TorchScript reads annotations per function.
"""
import abc
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import functional
from ..rules import RSchedule, evit_keep_count, parse_r, tome_clamp_r, topk_keep_count

__all__ = ["ReductionPolicy", "TopK", "EViT", "ToMe", "ReductionState", "update_source",
           "policy_from_spec", "check_policy", "POLICY_NAMES", "PolicyInterface", "ReducingBlock"]

Rates = Union[float, Sequence[float]]
Amount = Union[int, float]  # a plan entry: TopK's count, EViT's rate, ToMe's r
# One name for "a plan entry or None": TorchScript reads ``Optional[Amount]`` written in a function
# body as a different type from the same annotation in a signature, so bodies use this alias.
PlanEntry = Optional[Amount]


@torch.jit.interface
class PolicyInterface(nn.Module):
    """A reduction policy as TorchScript sees it: what the driver and the blocks call."""

    def plan(self, depth: int, num_patches: int) -> List[Optional[Amount]]:
        pass

    def reduce(self, x: Tensor, amount: Amount, scores: Optional[Tensor],
               metric: Optional[Tensor], size: Optional[Tensor], source: Optional[Tensor],
               num_prefix: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        pass

    def uses_size(self) -> bool:
        pass

    def attention_needs(self) -> Tuple[bool, bool]:
        pass

    def traces_source(self) -> bool:
        pass


@torch.jit.interface
class ReducingBlock(nn.Module):
    """A block as :meth:`ReductionState.step` calls it under TorchScript."""

    def forward(self, x: Tensor, amount: Optional[Amount], policy: Optional[PolicyInterface],
                size: Optional[Tensor], source: Optional[Tensor], num_prefix: int,
                class_token: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        pass


def _no_plan(depth: int) -> List[PlanEntry]:
    """``[None] * depth`` with the plan's type (TorchScript types ``[None] * n`` as List[None])."""
    out: List[PlanEntry] = []
    for _ in range(depth):
        out.append(None)
    return out


def _count(amount: Amount) -> int:
    """A plan entry that is a token count (TopK's count, ToMe's r)."""
    if isinstance(amount, int):
        return amount
    raise TypeError(f"expected a plan entry that is a token count (int), got {amount}")


def _rate(amount: Amount) -> float:
    """A plan entry that is a keep rate (EViT)."""
    if isinstance(amount, float):
        return amount
    return float(amount)


def update_source(source: Tensor, index: Tensor, num_protected: int, n_old: int,
                  fused: bool) -> Tensor:
    """Follows each original token through a prune: ``source[b, t]`` is the current index of
    original token ``t`` (-1 once dropped). ``index`` ``[B, k]`` are the kept positions among the
    scored tokens, in output order; with ``fused`` the dropped tokens go to the fused token."""
    b, k = index.shape
    p = num_protected
    dropped = p + k if fused else -1
    new_of_old = torch.full((b, n_old), dropped, dtype=torch.long, device=source.device)
    new_of_old[:, :p] = torch.arange(p, device=source.device)
    new_of_old.scatter_(1, index.long() + p,
                        torch.arange(p, p + k, device=source.device).expand(b, k))
    moved = new_of_old.gather(1, source.clamp_min(0))
    return torch.where(source >= 0, moved, source)


def _is_count(value) -> bool:
    """A whole number of tokens or blocks: a Python or NumPy integer, not a bool (nor a float
    that looks whole)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _locations(locs: Sequence[int], what: str) -> Tuple[int, ...]:
    if isinstance(locs, (str, bytes)) or not all(_is_count(loc) for loc in locs):
        raise ValueError(f"{what}: locs must be block indices (ints), got {locs!r}")
    return tuple(int(loc) for loc in locs)


def _is_real(value) -> bool:
    """A keep rate or an inflection: any real number but a bool (which Python counts as one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _per_location(rates: Rates, locs: Sequence[int], what: str) -> List[float]:
    if _is_real(rates):
        return [float(rates)] * len(locs)
    if isinstance(rates, (str, bytes, bool)) or not all(_is_real(r) for r in rates):
        raise ValueError(f"{what}: keep_rate must be a number or one number per location, "
                         f"got {rates!r}")
    rates = [float(r) for r in rates]
    if len(rates) != len(locs):
        raise ValueError(f"{what}: got {len(rates)} keep rates for {len(locs)} locations")
    return rates


def _check_rate(rate: float, what: str) -> None:
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"{what}: keep rate must be in (0, 1], got {rate}")


def _schedule(r) -> RSchedule:
    """ToMe's r as parse_r reads it: a token count >= 0, a list of them (one per block), or
    (r, inflection) with a finite inflection (a float, one type for TorchScript whether it was
    written 0 or 0.0)."""
    if _is_count(r) and r >= 0:
        return int(r)
    if isinstance(r, list) and all(_is_count(v) and v >= 0 for v in r):
        return [int(v) for v in r]
    if (isinstance(r, tuple) and len(r) == 2 and _is_count(r[0]) and r[0] >= 0
            and _is_real(r[1]) and math.isfinite(r[1])):
        return (int(r[0]), float(r[1]))
    raise ValueError("ToMe: r must be a token count >= 0, a list of counts (one per block) or "
                     f"(r, inflection) with a finite inflection, got {r!r}")


class ReductionPolicy(nn.Module, abc.ABC):
    """Base class. Subclasses set what the attention must return and implement plan/reduce
    (both ``@torch.jit.export``, as :class:`PolicyInterface` needs)."""

    # Class attributes are invisible to TorchScript unless declared constants.
    __constants__ = ["name", "needs_scores", "needs_metric"]
    name = "none"
    needs_scores = False
    needs_metric = False

    def __init__(self, trace_source: bool = False):
        super().__init__()
        self.trace_source = trace_source

    @torch.jit.export
    def uses_size(self) -> bool:
        """Whether the attention takes proportional (``log(size)``) attention."""
        return False

    @torch.jit.export
    def attention_needs(self) -> Tuple[bool, bool]:
        """What a reducing block's attention must return: ``(scores, metric)``."""
        return self.needs_scores, self.needs_metric

    @torch.jit.export
    def traces_source(self) -> bool:
        """Whether the driver keeps the source map (``trace_source``)."""
        return self.trace_source

    @abc.abstractmethod
    def plan(self, depth: int, num_patches: int) -> List[Optional[Amount]]:
        """This policy's setting for each of ``depth`` blocks (None: no reduction there)."""

    @abc.abstractmethod
    def reduce(self, x: Tensor, amount: Amount, scores: Optional[Tensor],
               metric: Optional[Tensor], size: Optional[Tensor], source: Optional[Tensor],
               num_prefix: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """One reduction step: the reduced tokens, their sizes and the source map."""

    def _check_locs(self, depth: int) -> None:
        for loc in self.locs:
            if not 0 <= loc < depth:
                raise ValueError(f"{self.name}: location {loc} is outside the {depth} blocks")


class TopK(ReductionPolicy):
    """Top-K pruning (Haurum et al.): after block ``locs[i]`` keep the
    ``int(keep_rate**(i+1) * num_patches)`` patches the class token attends to most (without a
    class token: the patches that receive the most attention, mean over queries and heads).

    ``keep_rate`` is a base rate (powered per location, as upstream) or one absolute rate per
    location. The prefix (class, distillation and register tokens) is always kept.
    """

    name = "topk"
    needs_scores = True

    def __init__(self, keep_rate: Rates = 0.7, locs: Sequence[int] = (3, 6, 9),
                 trace_source: bool = False):
        super().__init__(trace_source)
        self.locs = _locations(locs, "TopK")
        if _is_real(keep_rate):
            _check_rate(float(keep_rate), "TopK")
            self.rates = [float(keep_rate) ** (i + 1) for i in range(len(self.locs))]
        else:
            self.rates = _per_location(keep_rate, self.locs, "TopK")
        for r in self.rates:
            _check_rate(r, "TopK")
        self.keep_rate = keep_rate

    @torch.jit.export
    def plan(self, depth: int, num_patches: int) -> List[Optional[Amount]]:
        """Tokens to keep after each location, counted from the initial patches."""
        self._check_locs(depth)
        out = _no_plan(depth)
        for i, loc in enumerate(self.locs):  # locs is a tuple: TorchScript unrolls this loop
            out[loc] = topk_keep_count(self.rates[i], num_patches)
        return out

    @torch.jit.export
    def reduce(self, x: Tensor, amount: Amount, scores: Optional[Tensor],
               metric: Optional[Tensor], size: Optional[Tensor], source: Optional[Tensor],
               num_prefix: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        if scores is None:
            raise ValueError("TopK needs the attention scores")
        out, index = functional.topk_prune(x, scores, _count(amount), num_protected=num_prefix)
        if source is not None and out is not x:
            source = update_source(source, index, num_prefix, x.shape[1], fused=False)
        return out, size, source

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, locs={self.locs}"


class EViT(ReductionPolicy):
    """EViT: after block ``locs[i]`` keep ``ceil(keep_rate * (N - P))`` of the current tokens the
    class token attends to most (without a class token: that receive the most attention, mean
    over queries and heads) and (``fuse``) add one token, the others' score-weighted sum.

    Upstream EViT protects only the class token; here the whole prefix (distillation and
    register tokens too) is protected, so every prefix token is kept.
    """

    name = "evit"
    needs_scores = True

    def __init__(self, keep_rate: Rates = 0.7, locs: Sequence[int] = (3, 6, 9), fuse: bool = True,
                 trace_source: bool = False):
        super().__init__(trace_source)
        self.locs = _locations(locs, "EViT")
        self.rates = _per_location(keep_rate, self.locs, "EViT")
        for r in self.rates:
            _check_rate(r, "EViT")
        self.keep_rate = keep_rate
        self.fuse = fuse

    @torch.jit.export
    def plan(self, depth: int, num_patches: int) -> List[Optional[Amount]]:
        """The keep rate at each location: the count depends on the tokens present then."""
        self._check_locs(depth)
        out = _no_plan(depth)
        for i, loc in enumerate(self.locs):
            out[loc] = self.rates[i]
        return out

    @torch.jit.export
    def reduce(self, x: Tensor, amount: Amount, scores: Optional[Tensor],
               metric: Optional[Tensor], size: Optional[Tensor], source: Optional[Tensor],
               num_prefix: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        if scores is None:
            raise ValueError("EViT needs the attention scores")
        k = evit_keep_count(_rate(amount), x.shape[1] - num_prefix)
        out, index = functional.evit_prune(x, scores, k, num_protected=num_prefix, fuse=self.fuse)
        if source is not None and out is not x:
            source = update_source(source, index, num_prefix, x.shape[1], fused=self.fuse)
        return out, size, source

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, locs={self.locs}, fuse={self.fuse}"


class ToMe(ReductionPolicy):
    """Token Merging: in every block merge ``r`` tokens by bipartite soft matching on the keys
    (averaged over heads), size-weighted; ``r`` follows ToMe's ``parse_r`` schedule (an int, a
    list per layer, or ``(r, inflection)``) and is clamped to half the unprotected tokens.

    ``prop_attn`` adds ``log(size)`` to the attention logits. ``trace_source`` keeps the map from
    every original token to the token it was merged into (``model.sources``, one map per block).
    """

    name = "tome"
    needs_metric = True

    def __init__(self, r: RSchedule = 13,
                 prop_attn: bool = True, trace_source: bool = False):
        super().__init__(trace_source)
        self.r = _schedule(r)
        self.prop_attn = prop_attn

    @torch.jit.export
    def uses_size(self) -> bool:
        return self.prop_attn

    @torch.jit.export
    def plan(self, depth: int, num_patches: int) -> List[Optional[Amount]]:
        """The requested ``r`` of each block (``parse_r``); ``reduce`` clamps it."""
        out: List[PlanEntry] = []
        for r in parse_r(depth, self.r):
            out.append(r if r > 0 else None)
        return out

    @torch.jit.export
    def reduce(self, x: Tensor, amount: Amount, scores: Optional[Tensor],
               metric: Optional[Tensor], size: Optional[Tensor], source: Optional[Tensor],
               num_prefix: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        r = tome_clamp_r(_count(amount), x.shape[1], num_prefix)
        if r == 0:  # as upstream's blocks: no merge, the tokens pass unchanged
            return x, size, source
        if metric is None:
            raise ValueError("ToMe needs the attention's metric (the keys averaged over heads)")
        return functional.tome_merge(x, metric, r, size=size, num_protected=num_prefix,
                                     source=source)

    def extra_repr(self) -> str:
        return f"r={self.r}, prop_attn={self.prop_attn}, trace_source={self.trace_source}"


class ReductionState:
    """Drives the reduction loop through one forward pass: the policy's per-block plan, the
    tokens' sizes (ToMe) and source map (``trace_source``), and the tokens left after each block.

    tokred's ``VisionTransformer`` and the timm patch both build one per forward pass and call
    :meth:`step` for every block in order; ``policy`` None runs the blocks unreduced. It is
    also a TorchScript class: a scripted model builds and drives it the same way.
    """

    def __init__(self, policy: Optional[PolicyInterface], depth: int, num_patches: int,
                 num_prefix: int, class_token: bool = True):
        """``num_prefix`` tokens (class, distillation, register tokens) lead the sequence and
        are never reduced; ``class_token`` says whether the first is a class token."""
        self.policy = policy
        self.num_prefix = num_prefix
        self.class_token = class_token
        plan = _no_plan(depth)
        trace = False
        merges = False
        if policy is not None:
            plan = policy.plan(depth, num_patches)
            trace = policy.traces_source()
            merges = policy.attention_needs()[1]
        self.plan = plan
        self.trace = trace
        self.merges = merges
        self.size = torch.jit.annotate(Optional[Tensor], None)
        self.source = torch.jit.annotate(Optional[Tensor], None)
        self.token_counts: List[int] = []
        self.sources: List[Tensor] = []
        self.n_start = 0

    def _start(self, x: Tensor) -> None:
        b, n = x.shape[0], x.shape[1]
        self.n_start = n
        self.size = x.new_ones(b, n, 1) if self.merges else None
        self.source = torch.arange(n, device=x.device).expand(b, n).contiguous() if self.trace else None
        counts: List[int] = []
        sources: List[Tensor] = []
        self.token_counts, self.sources = counts, sources

    def step(self, layer: int, x: Tensor, block: ReducingBlock) -> Tensor:
        """Runs block ``layer`` (layer 0 starts the pass) as ``block(x, amount, policy, size,
        source, num_prefix, class_token) -> (x, size, source)``; ``block`` is any such callable
        (the timm patch passes a function)."""
        if layer == 0:
            self._start(x)
        amount = self.plan[layer]
        if torch.jit.is_scripting():
            # TorchScript calls a module interface by its method name (and runs no hooks).
            x, size, source = block.forward(x, amount, self.policy, self.size, self.source,
                                            self.num_prefix, self.class_token)
        else:
            x, size, source = block(x, amount, self.policy, self.size, self.source,
                                    self.num_prefix, self.class_token)
        self.size, self.source = size, source
        self.token_counts.append(x.shape[1])
        if self.trace and source is not None:
            self.sources.append(source)
        return x

    def pool_size(self) -> Optional[Tensor]:
        """The sizes an average-pooling head weights the final tokens by: None when the pass
        merged nothing (every size is 1), so that head computes the unreduced model's plain
        mean, bitwise."""
        size = self.size
        if size is None or size.shape[1] == self.n_start:
            return None
        return size


def check_policy(policy: Optional[ReductionPolicy], where: str, optional: bool = True) -> None:
    """What a model or patch accepts as its reduction: a ReductionPolicy (or None when
    ``optional``); anything else is a TypeError now rather than an AttributeError mid-forward."""
    if policy is None and optional:
        return
    if not isinstance(policy, ReductionPolicy):
        allowed = " or None" if optional else ""
        raise TypeError(f"{where}: the policy must be a tokred_ext.nn.ReductionPolicy (TopK, EViT "
                        f"or ToMe){allowed}, got {type(policy).__name__}")


POLICY_NAMES = ("none", "topk", "evit", "tome")


def policy_from_spec(spec: str, keep_rate: float = 0.7, r: int = 13,
                     trace_source: bool = False) -> Optional[ReductionPolicy]:
    """The policy a command-line spec names: ``none`` (None), ``topk``, ``evit`` or ``tome``,
    optionally with a value after a colon: ``topk:0.5`` and ``evit:0.7`` (keep rate),
    ``tome:13`` (tokens merged per layer). Without a value, ``keep_rate`` or ``r`` is used.
    A bad spec is a ValueError that names it.
    """
    name, _, value = spec.partition(":")
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    if name == "none":
        return None
    if name == "tome":
        try:
            rr = int(value) if value else r
        except ValueError:
            raise ValueError(f"policy {spec!r}: r must be a whole number of tokens, got {value!r}") from None
        if rr < 0:
            raise ValueError(f"policy {spec!r}: r must be >= 0")
        return ToMe(rr, trace_source=trace_source)
    try:
        kr = float(value) if value else keep_rate
    except ValueError:
        raise ValueError(f"policy {spec!r}: {value!r} is not a number") from None
    cls = TopK if name == "topk" else EViT
    return cls(kr, trace_source=trace_source)
