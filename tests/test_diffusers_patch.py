"""tokred_ext.patch.diffusers: dense ToMe (merge, compute, unmerge) on tiny diffusers models.

The patched models are compared with an oracle built here from ``tokred_ext.reference``
(``grid_destinations``, ``tomesd_match``, ``tomesd_block``: tomesd's algorithm in pure PyTorch
with tokred's tie rule), run on a copy of the same model. Tiny models with random weights come
from configs; nothing is downloaded. CI installs diffusers, and there these tests must not skip.
"""
import os

import pytest
import torch

from tokred_ext import functional, reference

if os.environ.get("CI"):
    import diffusers  # noqa: F401  (CI installs diffusers: a missing one must fail, not skip)
else:
    pytest.importorskip("diffusers")


# --------------------------------------------------------------------------- the partition

@pytest.mark.parametrize("h,w,sx,sy", [(4, 4, 2, 2), (5, 7, 2, 2), (7, 9, 3, 2), (6, 5, 1, 1),
                                       (3, 8, 4, 1), (1, 5, 2, 2)])
def test_grid_destinations_match_tomesd_partition(h, w, sx, sy):
    assert torch.equal(functional.grid_destinations(h, w, sx, sy),
                       reference.grid_destinations(h, w, sx, sy))
    for seed in range(3):
        choice = functional.grid_choice(h, w, sx, sy, torch.Generator().manual_seed(seed))
        # The same draw as tomesd's randint(sx*sy, (h//sy, w//sx, 1)) on a generator seeded alike.
        tomesd = torch.randint(sx * sy, (h // sy, w // sx, 1), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(choice, tomesd[..., 0])
        dst = functional.grid_destinations(h, w, sx, sy, choice)
        assert torch.equal(dst, reference.grid_destinations(h, w, sx, sy, choice))
        # One destination per whole cell, none in the leftover rows and columns.
        rows, cols = dst // w, dst % w
        assert dst.numel() == (h // sy) * (w // sx)
        assert bool((rows < (h // sy) * sy).all()) and bool((cols < (w // sx) * sx).all())
        cells = (rows // sy) * (w // sx) + cols // sx
        assert torch.equal(cells.sort().values, torch.arange(dst.numel()))


def test_grid_destinations_bad_choice():
    with pytest.raises(ValueError, match=r"choice must have shape \[2, 2\]"):
        functional.grid_destinations(4, 4, 2, 2, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"choice values must lie in \[0, 4\)"):
        functional.grid_destinations(4, 4, 2, 2, torch.full((2, 2), 4))
    with pytest.raises(ValueError, match="strides sx, sy must be positive"):
        functional.grid_destinations(4, 4, 0, 2)
