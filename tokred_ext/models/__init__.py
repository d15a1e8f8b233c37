"""Models built from tokred_ext.nn: ViT/DeiT with reduction policies, and BiFormer."""
from .checkpoint import load_checkpoint  # noqa: F401
from .biformer import biformer_base, biformer_small, biformer_tiny  # noqa: F401
from .vit import MODELS, VisionTransformer, create_model  # noqa: F401
from .vit import (deit_base_distilled_patch16_224, deit_base_patch16_224,  # noqa: F401
                  deit_small_distilled_patch16_224, deit_small_patch16_224,
                  deit_tiny_distilled_patch16_224, deit_tiny_patch16_224,
                  vit_base_patch16_224, vit_base_patch16_384, vit_large_patch16_224,
                  vit_base_patch16_gap_224, vit_base_patch16_siglip_224, vit_large_patch16_384,
                  vit_small_patch14_reg4_dinov2)
