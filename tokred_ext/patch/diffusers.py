"""Dense ToMe (ToMe for Stable Diffusion, Bolya & Hoffman) on diffusers models, in place.

``apply(model, ratio=0.5, sx=2, sy=2, seed=0, ...)`` patches a ``UNet2DConditionModel``, a DiT
(``DiTTransformer2DModel``, or a ``Transformer2DModel`` with patched input) or a pipeline holding
one (``.unet`` or ``.transformer``). Every diffusers ``BasicTransformerBlock`` gets a subclass whose
``forward`` is diffusers 0.42.1's, with tomesd's merge before and unmerge after the chosen
sub-layers; the residual stream keeps all N tokens, and weights and ``state_dict`` are unchanged.

Per block call, as tomesd: the metric is the block's input hidden states; the block's token grid
is the model's input grid (the latent size; for a DiT the latent size over ``patch_size``) divided
by ``downsample = ceil(sqrt(N0 // N))``, and blocks with ``downsample > max_downsample`` run
unchanged; ``r = int(N * ratio)`` tokens merge (mean) into one destination per ``sx × sy`` cell
(:func:`tokred_ext.functional.grid_destinations`); one plan serves every merge and unmerge of the
call. ``seed=None`` takes each cell's top-left token (tomesd's ``use_rand=False``); a seed draws the
cells' choice from a CPU ``torch.Generator`` seeded at patch time, one draw per merging block call
in call order (so the same on every device, and the same sequence again after ``apply`` anew).
Unlike tomesd, an odd batch does not switch the draw off.
"""
import logging
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import functional, ops

__all__ = ["apply", "remove", "owns"]

_BLOCK = ("diffusers.models.attention", "BasicTransformerBlock")
_NORMS = ("layer_norm", "ada_norm_zero")
_NAME = "tokred_ext.patch.diffusers"


class _DensePatch:
    """The settings a patched model shares with its blocks, the grid of the forward under way
    (set by the model's forward pre-hook) and the generator of the destination draw."""

    def __init__(self, ratio: float, sx: int, sy: int, seed: Optional[int], attn: bool,
                 cross_attn: bool, mlp: bool, max_downsample: int, patch_size: int):
        self.ratio, self.sx, self.sy = ratio, sx, sy
        self.seed = seed
        self.attn, self.cross_attn, self.mlp = attn, cross_attn, mlp
        self.max_downsample, self.patch_size = max_downsample, patch_size
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.size: Optional[Tuple[int, int]] = None
        self.hook = None
        # The last plan and its destinations, for tokred_ext.visualize.
        self.last: Optional[Dict[str, Any]] = None

    def record_input(self, module: nn.Module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if x is None or x.dim() != 4:
            raise ValueError(f"{_NAME}: the patched model's input must be a latent [B, C, H, W]")
        p = self.patch_size
        self.size = (x.shape[-2] // p, x.shape[-1] // p)

    def plan(self, x: Tensor) -> Optional[ops.MergePlan]:
        """This block call's merge plan, or None when the block runs unmerged."""
        if self.size is None:
            raise RuntimeError(f"a block patched by {_NAME} ran outside its model's forward, so "
                               "its token grid is unknown")
        h0, w0 = self.size
        n = x.shape[1]
        # max(1, ...): more tokens than the input grid fails the grid check below, not here.
        downsample = max(1, int(math.ceil(math.sqrt((h0 * w0) // n))))
        if downsample > self.max_downsample:
            return None
        h, w = int(math.ceil(h0 / downsample)), int(math.ceil(w0 / downsample))
        if h * w != n:
            raise ValueError(f"{_NAME}: a block has {n} tokens, not the {h}x{w} grid of its "
                             f"downsampling ({downsample}) of the {h0}x{w0} input grid")
        r = int(n * self.ratio)
        if r <= 0 or h < self.sy or w < self.sx:
            return None
        choice = None
        if self.generator is not None:
            choice = functional.grid_choice(h, w, self.sx, self.sy, self.generator)
        dst = functional.grid_destinations(h, w, self.sx, self.sy, choice, device=x.device)
        plan = functional.dense_merge_plan(x, dst, r)
        self.last = dict(plan=plan, destinations=dst, grid=(h, w), r=r)
        return plan


def _keep(x: Tensor) -> Tensor:
    return x


def _merge_pair(plan: Optional[ops.MergePlan], on: bool):
    if plan is None or not on:
        return _keep, _keep
    return (lambda x: ops.merge_by_plan(x, None, plan, "mean")[0],
            lambda x: ops.unmerge_by_plan(x, plan))


_log = logging.getLogger(_BLOCK[0])


class _DenseBlock:
    """Mixed in front of diffusers' BasicTransformerBlock: its forward with the merges."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None,
                encoder_attention_mask: Optional[Tensor] = None, timestep=None,
                cross_attention_kwargs: Optional[Dict[str, Any]] = None, class_labels=None,
                added_cond_kwargs: Optional[Dict[str, Tensor]] = None) -> Tensor:
        patch: _DensePatch = self._tokred_dense
        if cross_attention_kwargs is not None and cross_attention_kwargs.get("scale") is not None:
            _log.warning("Passing `scale` to `cross_attention_kwargs` is deprecated. `scale` will be "
                         "ignored.")
        # No match (and no draw) where no sub-layer merges: the plan would go unused.
        plan = patch.plan(hidden_states) if patch.attn or patch.cross_attn or patch.mlp else None
        m_a, u_a = _merge_pair(plan, patch.attn)
        m_c, u_c = _merge_pair(plan, patch.cross_attn)
        m_m, u_m = _merge_pair(plan, patch.mlp)
        if attention_mask is not None and m_a is not _keep:
            raise ValueError(f"{_NAME}: merged self-attention takes no attention_mask (it refers "
                             "to the unmerged tokens)")
        if self._chunk_size is not None and m_m is not _keep:
            raise ValueError(f"{_NAME}: a merged feed-forward cannot be chunked "
                             "(set_chunk_feed_forward)")
        zero = self.norm_type == "ada_norm_zero"

        # 0. Self-attention
        if zero:
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
                hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
        else:
            norm_hidden_states = self.norm1(hidden_states)
        kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
        if kwargs.pop("gligen", None) is not None:
            raise ValueError(f"{_NAME} does not reproduce GLIGEN control (cross_attention_kwargs"
                             "['gligen'])")
        attn_output = self.attn1(
            m_a(norm_hidden_states),
            encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
            attention_mask=attention_mask, **kwargs)
        if zero:
            attn_output = gate_msa.unsqueeze(1) * attn_output
        hidden_states = u_a(attn_output) + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)

        # 1. Cross-attention
        if self.attn2 is not None:
            attn_output = self.attn2(m_c(self.norm2(hidden_states)),
                                     encoder_hidden_states=encoder_hidden_states,
                                     attention_mask=encoder_attention_mask, **kwargs)
            hidden_states = u_c(attn_output) + hidden_states

        # 2. Feed-forward
        norm_hidden_states = self.norm3(hidden_states)
        if zero:
            norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        norm_hidden_states = m_m(norm_hidden_states)
        if self._chunk_size is not None:
            ff_output = _chunked(self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size)
        else:
            ff_output = self.ff(norm_hidden_states)
        if zero:
            ff_output = gate_mlp.unsqueeze(1) * ff_output
        hidden_states = u_m(ff_output) + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states


def _chunked(ff: nn.Module, x: Tensor, dim: int, size: int) -> Tensor:
    """diffusers' ``_chunked_feed_forward`` (unmerged tokens only)."""
    if x.shape[dim] % size != 0:
        raise ValueError(f"`hidden_states` dimension to be chunked: {x.shape[dim]} has to be "
                         f"divisible by chunk size: {size}. Make sure to set an appropriate "
                         "`chunk_size` when calling `unet.enable_forward_chunking`.")
    return torch.cat([ff(c) for c in x.chunk(x.shape[dim] // size, dim=dim)], dim=dim)


def _class_key(obj) -> Tuple[str, str]:
    cls = getattr(type(obj), "_tokred_base", type(obj))
    return cls.__module__, cls.__name__


def _check_block(name: str, blk: nn.Module) -> None:
    if blk.norm_type not in _NORMS:
        raise ValueError(f"{_NAME} reproduces BasicTransformerBlock only with norm_type "
                         f"{' or '.join(repr(n) for n in _NORMS)}; block {name!r} has "
                         f"{blk.norm_type!r}, which is not supported")
    if blk.pos_embed is not None:
        raise ValueError(f"{_NAME} does not support positional embeddings inside a block "
                         f"(positional_embeddings={blk.positional_embeddings!r} in {name!r})")
    if hasattr(blk, "fuser"):
        raise ValueError(f"{_NAME} does not support gated attention (GLIGEN fuser) in {name!r}")


def _denoiser(model) -> nn.Module:
    """The UNet or transformer of a pipeline, or the model itself."""
    for attr in ("unet", "transformer"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_NAME}: expected a diffusers model or a pipeline with .unet or "
                        f".transformer, got {type(model).__name__}")
    return model


def owns(model) -> bool:
    """Whether ``model`` (or its pipeline's denoiser) carries this patch."""
    try:
        return hasattr(_denoiser(model), "_tokred_dense")
    except TypeError:
        return False


def apply(model, ratio: float = 0.5, sx: int = 2, sy: int = 2, seed: Optional[int] = 0,
          attn: bool = True, cross_attn: bool = False, mlp: bool = False,
          max_downsample: int = 1):
    """Patches ``model`` in place with dense ToMe and returns it; ``remove`` undoes it, and
    applying again replaces the settings (and restarts the draw). See the module docstring."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"{_NAME}: ratio must be a number in [0, 1], got {ratio!r}")
    for arg, v in (("sx", sx), ("sy", sy), ("max_downsample", max_downsample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{_NAME}: {arg} must be a positive int, got {v!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{_NAME}: seed must be an int or None, got {seed!r}")
    net = _denoiser(model)
    blocks = [(n, m) for n, m in net.named_modules() if _class_key(m) == _BLOCK]
    if not blocks:
        raise ValueError(f"{_NAME}: {type(net).__name__} has no diffusers BasicTransformerBlock")
    for name, blk in blocks:
        _check_block(name, blk)
    remove(model)
    patch_size = getattr(getattr(net, "config", None), "patch_size", None) or 1
    patch = _DensePatch(ratio, sx, sy, seed, attn, cross_attn, mlp, max_downsample, patch_size)
    patch.hook = net.register_forward_pre_hook(patch.record_input, with_kwargs=True)
    net._tokred_dense = patch
    for _, blk in blocks:
        blk._tokred_dense = patch
        cls = type(blk)
        blk.__class__ = type(f"TokredDense{cls.__name__}", (_DenseBlock, cls), {"_tokred_base": cls})
    return model


def remove(model):
    """Undoes ``apply``: the blocks' classes and the model's hook are restored. Returns ``model``."""
    net = _denoiser(model)
    patch = getattr(net, "_tokred_dense", None)
    if patch is None:
        return model
    patch.hook.remove()
    del net._tokred_dense
    for blk in net.modules():
        if isinstance(blk, _DenseBlock):
            blk.__class__ = blk._tokred_base
            del blk._tokred_dense
    return model
