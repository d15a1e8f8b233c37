"""Draws which patches a policy merged or pruned, layer by layer, over the image.

The model runs with a policy object built with ``trace_source=True`` (the command line builds
it with ``tokred_ext.nn.policy_from_spec``); each panel shows, after one block, every patch's
group (the token now holding it): a patch still alone keeps its pixels, every group of two or
more patches (ToMe merges, EViT's fused token) is filled with one colour (the group's mean,
made unique within the panel) and outlined, and pruned patches are dark. A legend under the
panels names each panel's largest groups by the token they were merged into (``t12: 7`` is
token 12, holding 7 patches), says what the colours mean, which prefix tokens the model has
(class, distillation, register tokens: never reduced, not drawn) and whether the weights are
random. Works with random weights (the groups then follow random features, and the picture says
so); load timm weights with ``checkpoint``.

``visualize_dense`` draws dense ToMe (``tokred_ext.patch.diffusers``) on a diffusers model's
first full-resolution block: which token merged into which destination, on the token grid.
"""
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import functional, rules
from .models import create_model, load_checkpoint
from .nn import ReductionPolicy, ToMe

__all__ = ["DEFAULT_IMAGE", "PRUNED", "LABEL_HEIGHT", "LEGEND_HEIGHT", "load_image", "trace",
           "patch_groups", "prefix_words", "render", "visualize", "tiny_unet", "image_latent",
           "dense_trace", "render_dense", "visualize_dense"]

DEFAULT_IMAGE = os.path.join(os.path.dirname(__file__), "assets", "sample.png")
PRUNED = (24, 24, 24)
EDGE = (255, 255, 255)
LABEL_HEIGHT = 14
LEGEND_LINE = 12
LEGEND_HEIGHT = 5 * LEGEND_LINE  # weights, prefix, colour key, two lines of groups per panel
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _pil():
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise RuntimeError("visualize needs Pillow: pip install pillow") from None
    return Image, ImageDraw


def load_image(path: str, size: int) -> Tensor:
    """The image resized (shorter side) and centre-cropped to ``size``: uint8 ``[S, S, 3]``."""
    Image, _ = _pil()
    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)




def _check_traced(policy: ReductionPolicy) -> None:
    if not isinstance(policy, ReductionPolicy) or not policy.trace_source:
        raise ValueError("visualize needs a tokred_ext.nn policy built with trace_source=True, "
                         f"got {policy!r}")


def trace(pixels: Tensor, policy: ReductionPolicy, model_name: str = "deit_small",
          checkpoint: Optional[str] = None, seed: int = 0):
    """Runs the model with ``policy`` (built with ``trace_source=True``) on ``pixels``
    ``[S, S, 3]``; returns ``(model, panels)`` with ``panels`` a list of
    ``(block, tokens, source [N0])`` after the blocks worth showing."""
    _check_traced(policy)
    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, model_name)
    model.reduction = policy
    x = pixels.permute(2, 0, 1).unsqueeze(0).float() / 255
    with torch.no_grad():
        model((x - _MEAN) / _STD)
    depth = len(model.blocks)
    if isinstance(policy, ToMe):
        blocks = sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)})
    else:
        blocks = list(policy.locs)
    panels = [(b, model.token_counts[b], model.sources[b][0]) for b in blocks]
    return model, panels


def patch_groups(source: Tensor, num_prefix: int) -> Tensor:
    """The group (current token index, -1 if pruned) of every patch, row-major."""
    return source[num_prefix:]


def _group_colours(pixels: Tensor, groups: Tensor, grid: int, patch: int) -> Dict[int, Tuple]:
    """Mean colour of every group of two or more patches, unique within the panel."""
    ids, counts = torch.unique(groups, return_counts=True)
    means = pixels.view(grid, patch, grid, patch, 3).float().mean(dim=(1, 3)).view(-1, 3)
    used = {PRUNED, EDGE}
    colours: Dict[int, Tuple] = {}
    for g, c in zip(ids.tolist(), counts.tolist()):
        if g < 0 or c < 2:
            continue
        rgb = [int(v) for v in means[groups == g].mean(dim=0).round().tolist()]
        k = 0
        while tuple(rgb) in used:       # nudge until unique
            rgb[k % 3] = (rgb[k % 3] + 7) % 256
            k += 1
        colours[g] = tuple(rgb)
        used.add(tuple(rgb))
    return colours


def prefix_words(model) -> str:
    """The model's prefix tokens in words, e.g. ``1 class + 4 register tokens``."""
    parts = []
    if getattr(model, "cls_token", None) is not None:
        parts.append("1 class")
    if getattr(model, "dist_token", None) is not None:
        parts.append("1 distillation")
    reg = getattr(model, "reg_token", None)
    if reg is not None:
        parts.append(f"{reg.shape[1]} register")
    if not parts:
        return "none"
    return " + ".join(parts) + (" token" if parts == ["1 class"] else " tokens")


def _draw_legend(draw, top: int, width: int, notes: Sequence[str],
                 groups_of_panels: List[List[Tuple[int, int, Tuple]]], panel: int) -> None:
    """The legend under the panels: the notes, the colour key, and per panel its largest groups
    (colour swatch, ``t<token>: <patches>``)."""
    y = top
    for note in notes:
        draw.text((2, y), note, fill=(0, 0, 0))
        y += LEGEND_LINE
    x = 2
    for fill, words in (((160, 160, 160), "patch alone: its pixels"), (PRUNED, "pruned"),
                        ((200, 120, 40), "one colour, outlined: patches merged into one token")):
        draw.rectangle((x, y + 2, x + 8, y + 10), fill=fill, outline=(0, 0, 0))
        draw.text((x + 12, y), words, fill=(0, 0, 0))
        x += 12 + 6 * len(words) + 14
    y += LEGEND_LINE
    for i, groups in enumerate(groups_of_panels):
        x0 = panel * (i + 1)
        labels = [f"t{token}:{count}" for token, count, _ in groups]
        step = 11 + 6 * max([len(t) for t in labels] + [1]) + 6  # the default font: 6 px a letter
        per_line = max(1, panel // step)
        for j, ((_, _, colour), label) in enumerate(zip(groups[:2 * per_line], labels)):
            gx, gy = x0 + 2 + step * (j % per_line), y + LEGEND_LINE * (j // per_line)
            draw.rectangle((gx, gy + 2, gx + 8, gy + 10), fill=colour, outline=(0, 0, 0))
            draw.text((gx + 11, gy), label, fill=(0, 0, 0))
    draw.text((2, y), "largest groups:", fill=(0, 0, 0))


def render(pixels: Tensor, panels: List[Tuple[int, int, Tensor]], num_prefix: int,
           patch: int, method: str, notes: Sequence[str] = ()):
    """The input and one panel per entry of ``panels``, side by side, each labelled, above a
    legend (``notes``: up to two lines of text, then the colour key and each panel's largest
    groups)."""
    Image, ImageDraw = _pil()
    if len(notes) > 2:
        raise ValueError(f"render takes at most 2 notes, got {len(notes)}")
    s = pixels.shape[0]
    grid = s // patch
    base = Image.frombytes("RGB", (s, s), bytes(pixels.flatten().tolist()))
    out = Image.new("RGB", (s * (1 + len(panels)), s + LABEL_HEIGHT + LEGEND_HEIGHT),
                    (255, 255, 255))
    legend_groups: List[List[Tuple[int, int, Tuple]]] = []
    draw = ImageDraw.Draw(out)
    out.paste(base, (0, LABEL_HEIGHT))
    draw.text((2, 1), "input", fill=(0, 0, 0))
    for i, (block, tokens, source) in enumerate(panels):
        x0 = s * (i + 1)
        groups = patch_groups(source, num_prefix)
        colours = _group_colours(pixels, groups, grid, patch)
        counts = {g: int((groups == g).sum()) for g in colours}
        legend_groups.append(sorted(((g, counts[g], c) for g, c in colours.items()),
                                    key=lambda t: (-t[1], t[0])))
        out.paste(base, (x0, LABEL_HEIGHT))
        g2 = groups.view(grid, grid).tolist()
        for row in range(grid):
            for col in range(grid):
                g = g2[row][col]
                box = (x0 + col * patch, LABEL_HEIGHT + row * patch,
                       x0 + (col + 1) * patch - 1, LABEL_HEIGHT + (row + 1) * patch - 1)
                if g < 0:
                    draw.rectangle(box, fill=PRUNED)
                elif g in colours:
                    draw.rectangle(box, fill=colours[g])
                    # Outline the group: an edge where the neighbour belongs elsewhere.
                    if col + 1 < grid and g2[row][col + 1] != g:
                        draw.line([(box[2], box[1]), (box[2], box[3])], fill=EDGE)
                    if row + 1 < grid and g2[row + 1][col] != g:
                        draw.line([(box[0], box[3]), (box[2], box[3])], fill=EDGE)
        draw.text((x0 + 2, 1), f"{method} block {block + 1}: {tokens} tokens", fill=(0, 0, 0))
    _draw_legend(draw, s + LABEL_HEIGHT, out.width, notes, legend_groups, s)
    return out


def visualize(image: Optional[str], output: str, policy: ReductionPolicy,
              model_name: str = "deit_small", checkpoint: Optional[str] = None, seed: int = 0):
    """Writes the visualisation of ``policy`` (built with ``trace_source=True``) in the format
    of ``output``'s suffix (PNG, JPEG, WebP, ...); returns ``(image, panels)``."""
    _check_traced(policy)
    model_probe = create_model(model_name)  # validates the name; gives the geometry
    size, patch = model_probe.patch_embed.img_size, model_probe.patch_embed.patch_size
    del model_probe
    pixels = load_image(image or DEFAULT_IMAGE, size)
    model, panels = trace(pixels, policy, model_name, checkpoint, seed)
    weights = (f"weights: RANDOM (seed {seed}), not trained: the groups follow random features"
               if checkpoint is None else f"weights: {os.path.basename(checkpoint)}")
    notes = [weights, f"{model_name}; prefix: {prefix_words(model)} (never reduced, not drawn)"]
    img = render(pixels, panels, model.num_prefix_tokens, patch, policy.name, notes)
    fmt = image_format(output)
    (img.convert("RGB") if fmt == "JPEG" else img).save(output, format=fmt)
    return img, panels


def image_format(path: str) -> str:
    """PIL's format for ``path``'s suffix; a ValueError for a suffix PIL cannot write."""
    from PIL import Image

    Image.init()
    suffix = os.path.splitext(path)[1].lower()
    fmt = Image.EXTENSION.get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"output {path!r}: cannot write images with suffix {suffix or '(none)'!r}; "
                         "use .png, .jpg or .webp")
    return fmt


# --------------------------------------------------------------------------- dense ToMe (ToMe-SD)

DENSE_LATENT_FACTOR = 8  # Stable Diffusion's VAE: one latent pixel per 8x8 image pixels
_UNMERGED_NOTE = "image pixels: token not merged"


class _StopForward(Exception):
    pass


def tiny_unet(seed: int = 0):
    """A tiny diffusers ``UNet2DConditionModel`` with random weights (seeded); needs diffusers."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        raise RuntimeError("the dense visualisation needs diffusers: pip install "
                           "diffusers==0.42.1") from None
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8).eval()


def image_latent(pixels: Tensor, channels: int = 4) -> Tensor:
    """A stand-in latent ``[1, channels, S/8, S/8]`` of ``pixels`` ``[S, S, 3]`` (no VAE): the
    image area-downsampled 8x, normalised, RGB then their mean, repeated to ``channels``."""
    x = pixels.permute(2, 0, 1).unsqueeze(0).float() / 255
    x = torch.nn.functional.avg_pool2d((x - _MEAN) / _STD, DENSE_LATENT_FACTOR)
    x = torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)
    return x.repeat(1, (channels + 3) // 4, 1, 1)[:, :channels]


def dense_trace(model, latent: Tensor, ratio: float = 0.5, sx: int = 2, sy: int = 2,
                seed: Optional[int] = None) -> Dict:
    """The dense merge of ``model``'s first diffusers ``BasicTransformerBlock`` (a UNet's or a
    DiT's, the first at full resolution) on ``latent``, as ``tokred_ext.patch.diffusers`` builds
    it: metric = the block's input, ``r = int(N * ratio)``, destinations one per ``sx × sy`` cell
    (top-left, or the first draw of a CPU generator seeded with ``seed``). Returns
    ``dict(grid=(h, w), r=r, destinations=[Nb], dest=[N])`` (``dest``: each token's output)."""
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no diffusers BasicTransformerBlock")
    seen: Dict[str, Tensor] = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    cfg = model.config
    t = torch.tensor([500])
    try:
        with torch.no_grad():
            if getattr(cfg, "cross_attention_dim", None) and not getattr(cfg, "patch_size", None):
                model(latent, t, encoder_hidden_states=torch.zeros(1, 1, cfg.cross_attention_dim))
            else:
                model(latent, t, class_labels=torch.zeros(1, dtype=torch.long))
    except _StopForward:
        pass
    finally:
        handle.remove()
    x = seen["x"]
    p = getattr(cfg, "patch_size", None) or 1
    h, w = latent.shape[-2] // p, latent.shape[-1] // p
    if x.shape[1] != h * w:
        raise ValueError(f"the first block has {x.shape[1]} tokens, not the {h}x{w} latent grid")
    choice = None
    if seed is not None:
        choice = functional.grid_choice(h, w, sx, sy, torch.Generator().manual_seed(seed))
    dst = functional.grid_destinations(h, w, sx, sy, choice)
    r = int(x.shape[1] * ratio)
    plan = functional.dense_merge_plan(x, dst, r)
    return dict(grid=(h, w), r=rules.tome_partition_clamp_r(r, h * w, dst.numel()), destinations=dst,
                dest=plan.dest[0])


def _palette(i: int) -> Tuple[int, int, int]:
    """Distinct saturated colours (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95 - 0.3 * (i % 2))
    return int(r * 255), int(g * 255), int(b * 255)


def render_dense(pixels: Tensor, trace_: Dict, title: str, notes: List[str], panel: int = 384):
    """The input image, and the token grid: every merged group filled with its colour, a line
    from each merged token to its destination (a black dot), unmerged tokens keep their pixels;
    a legend and ``notes`` below. Both panels are drawn ``panel`` pixels wide (or more)."""
    Image, ImageDraw = _pil()
    s0 = pixels.shape[0]
    s = max(s0, panel)
    h, w = trace_["grid"]
    ch, cw = s / h, s / w
    dest = trace_["dest"].tolist()
    counts: Dict[int, int] = {}
    for o in dest:
        counts[o] = counts.get(o, 0) + 1
    dsts = set(trace_["destinations"].tolist())
    owner = {dest[t]: t for t in dsts}  # output of a destination -> its token
    colours = {o: _palette(i) for i, o in enumerate(sorted(o for o, c in counts.items() if c > 1))}
    legend_h = LABEL_HEIGHT * (3 + len(notes))
    base = Image.frombytes("RGB", (s0, s0), bytes(pixels.flatten().tolist()))
    base = base.resize((s, s), Image.BICUBIC)
    out = Image.new("RGB", (2 * s, s + LABEL_HEIGHT + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    out.paste(base, (0, LABEL_HEIGHT))
    out.paste(base, (s, LABEL_HEIGHT))
    draw.text((2, 1), "input", fill=(0, 0, 0))
    draw.text((s + 2, 1), title, fill=(0, 0, 0))

    def box(t: int):
        row, col = divmod(t, w)
        return (s + col * cw, LABEL_HEIGHT + row * ch, s + (col + 1) * cw - 1,
                LABEL_HEIGHT + (row + 1) * ch - 1)

    def centre(t: int):
        x0, y0, x1, y1 = box(t)
        return (x0 + x1) / 2, (y0 + y1) / 2

    for t, o in enumerate(dest):
        if o in colours:
            draw.rectangle(box(t), fill=colours[o])
    for t, o in enumerate(dest):
        if o in colours and t not in dsts:
            draw.line([centre(t), centre(owner[o])], fill=(0, 0, 0))
    dot = max(1.0, min(cw, ch) / 5)
    for t in dsts:
        x, y = centre(t)
        draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=(0, 0, 0))
    # The legend.
    y = s + LABEL_HEIGHT + 2
    sw = LABEL_HEIGHT - 4
    draw.rectangle((2, y, 2 + sw, y + sw), fill=_palette(0))
    draw.text((6 + sw, y), "merged group: one colour per destination, line = source -> "
              "destination", fill=(0, 0, 0))
    y += LABEL_HEIGHT
    draw.ellipse((2 + sw / 4, y + sw / 4, 2 + 3 * sw / 4, y + 3 * sw / 4), fill=(0, 0, 0))
    draw.text((6 + sw, y), "destination (one per cell; none in leftover rows/columns)",
              fill=(0, 0, 0))
    y += LABEL_HEIGHT
    draw.text((6 + sw, y), _UNMERGED_NOTE, fill=(0, 0, 0))
    for note in notes:
        y += LABEL_HEIGHT
        draw.text((2, y), note, fill=(160, 0, 0) if note.startswith("RANDOM") else (0, 0, 0))
    return out


def visualize_dense(image: Optional[str], output: str, ratio: float = 0.5, sx: int = 2,
                    sy: int = 2, seed: Optional[int] = None, model=None, weights_seed: int = 0,
                    size: int = 128):
    """Writes the dense ToMe merge of ``model``'s first full-resolution block (default: a tiny
    UNet with random weights, said on the picture) on ``image``; returns ``(image, trace)``."""
    random_weights = model is None
    if model is None:
        model = tiny_unet(weights_seed)
    p = getattr(model.config, "patch_size", None) or 1
    cell = DENSE_LATENT_FACTOR * p * max(sx, sy)  # image pixels per merge cell
    if not 1 <= cell <= size:
        raise ValueError(f"sx and sy must be in [1, {size // (DENSE_LATENT_FACTOR * p)}] for a "
                         f"{size}-pixel picture, got {sx} and {sy}")
    size = size // cell * cell
    pixels = load_image(image or DEFAULT_IMAGE, size)
    latent = image_latent(pixels, model.config.in_channels)
    tr = dense_trace(model, latent, ratio, sx, sy, seed)
    h, w = tr["grid"]
    notes = [f"r = {tr['r']} of {h * w} tokens merged (ratio {ratio}), {sx}x{sy} cells, "
             f"destinations {'top-left' if seed is None else f'drawn (seed {seed})'}",
             f"latent: the image downsampled {DENSE_LATENT_FACTOR}x (no VAE)"]
    if random_weights:
        notes.append(f"RANDOM WEIGHTS (untrained tiny UNet, seed {weights_seed}): groups follow "
                     "random features")
    img = render_dense(pixels, tr, f"{type(model).__name__} block 1: {h}x{w} tokens", notes)
    fmt = image_format(output)
    (img.convert("RGB") if fmt == "JPEG" else img).save(output, format=fmt)
    return img, tr
