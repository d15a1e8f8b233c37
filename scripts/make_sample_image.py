"""Draws tokred_ext/assets/sample.png: a procedural landscape (sky, sun, clouds, mountains, lake,
meadow) at 224x224, so ``tokred visualize`` has an image with regions worth merging."""
import os
import sys

import torch
from PIL import Image

S = 224


def smooth_noise(h, w, scale, gen):
    """Value noise: random values on a coarse grid, bilinearly upsampled."""
    coarse = torch.rand(1, 1, h // scale + 2, w // scale + 2, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic",
                                           align_corners=False)[0, 0]


def fractal(h, w, gen, octaves=((32, 0.5), (16, 0.25), (8, 0.15), (4, 0.1))):
    return sum(a * smooth_noise(h, w, s, gen) for s, a in octaves)


def main(path):
    gen = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32),
                            torch.arange(S, dtype=torch.float32), indexing="ij")
    t = yy / S
    img = torch.stack([0.35 + 0.4 * t, 0.55 + 0.3 * t, 0.95 - 0.1 * t])          # sky
    sun = torch.exp(-((xx - 165) ** 2 + (yy - 48) ** 2) / (2 * 14 ** 2))
    img = img + sun * torch.tensor([0.6, 0.45, 0.1]).view(3, 1, 1)
    clouds = (fractal(S, S, gen) - 0.55).clamp(min=0) * 2.5 * (1 - t * 1.6).clamp(min=0)
    img = img * (1 - clouds) + clouds
    ridge = 95 + 30 * fractal(1, S, gen, ((24, 1.0), (8, 0.3)))[0] - 15             # mountains
    far = (yy > ridge).float()
    rock = fractal(S, S, gen, ((8, 0.6), (4, 0.4)))
    mountain = torch.stack([0.35 + 0.2 * rock, 0.33 + 0.15 * rock, 0.40 + 0.15 * rock])
    snow = ((yy < ridge + 10) & (rock > 0.45)).float()
    mountain = mountain * (1 - snow) + 0.95 * snow
    img = img * (1 - far) + mountain * far
    lake_top = 150
    lake = ((yy > lake_top) & (yy < 185) & ((xx - 90).abs() < 80 - (yy - 150))).float()
    ripple = 0.05 * torch.sin(yy * 1.7 + 3 * fractal(S, S, gen, ((4, 1.0),)))
    mirror = img[:, (2 * lake_top - yy).clamp(0, S - 1).long(), xx.long()]
    water = mirror * 0.6 + torch.tensor([0.05, 0.15, 0.3]).view(3, 1, 1) + ripple
    meadow_line = 160 + 10 * fractal(1, S, gen, ((32, 1.0),))[0]
    grass_mask = ((yy > meadow_line) & (lake == 0)).float()
    g = fractal(S, S, gen, ((4, 0.5), (2, 0.5)))
    grass = torch.stack([0.25 + 0.25 * g, 0.5 + 0.3 * g, 0.15 + 0.1 * g]) * (0.7 + 0.4 * t)
    img = img * (1 - lake) + water * lake
    img = img * (1 - grass_mask) + grass * grass_mask
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    Image.frombytes("RGB", (S, S), bytes(img.flatten().tolist())).save(path, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else
         os.path.join(os.path.dirname(__file__), "..", "tokred_ext", "assets", "sample.png"))
