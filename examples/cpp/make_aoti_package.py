"""Writes what the C++ AOTInductor example (aoti.cpp) loads: a tiny ViT with ToMe merging,
compiled by tokred_ext.compile_aoti into <out>/vit_tome.pt2, and <out>/vit_tome_io.pt, a
torch.save'd dict of a batch of images and the eager model's logits for them (read in C++ by
torch::jit::pickle_load). The batch differs from the one the package was compiled with: its batch
axis is dynamic.

    python make_aoti_package.py <out folder>
"""
import os
import sys

import torch

import tokred_ext
from tokred_ext.models import VisionTransformer
from tokred_ext.nn import ToMe


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    # Three blocks merging 3 tokens each: 17 -> 14 -> 11 -> 8 tokens, through bipartite_match,
    # merge_plan and merge_by_plan.
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                              num_classes=10, reduction=ToMe(3)).eval()
    package = tokred_ext.compile_aoti(model, (torch.randn(2, 3, 32, 32),),
                                      os.path.join(out, "vit_tome.pt2"))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = model(images)
    torch.save({"images": images, "logits": logits}, os.path.join(out, "vit_tome_io.pt"))
    print(f"wrote {package} and vit_tome_io.pt (tokens per block {model.token_counts})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
