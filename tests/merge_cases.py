"""Inputs for the ToMe tests: metrics whose matching has no near-ties in any dtype."""
import torch


def separated_metric(b, n, num_protected=1, dtype=torch.float32, device="cpu", generator=None,
                     d=None):
    """metric [b, n, d] whose similarity maxima are far apart (tie-free even in bfloat16).

    B tokens are scaled axis vectors; A token a points at one B partner with cosine c_a (distinct
    values spaced >= 0.8 / (na + 1)) and is orthogonal to every other B token, so each A token's
    best partner and the ranking of A tokens survive any rounding. Channels are permuted per row.
    """
    na, nb = (n + 1) // 2, n // 2
    d = d or nb + 2
    m = torch.zeros(b, n, d, dtype=torch.float64)
    # Partners among the B tokens outside the prefix (where there are any).
    lo = num_protected // 2 if num_protected // 2 < nb else 0
    for row in range(b):
        for j in range(nb):
            m[row, 2 * j + 1, j] = 0.5 + torch.rand(1, generator=generator).item()
        cos = 0.1 + 0.8 * (torch.randperm(na, generator=generator).double() + 1) / (na + 1)
        for a in range(na):
            c = cos[a].item()
            if nb > 0:
                p = torch.randint(lo, nb, (1,), generator=generator).item()
                m[row, 2 * a, p] = c
            m[row, 2 * a, d - 1] = (1 - c * c) ** 0.5
        m[row] = m[row][:, torch.randperm(d, generator=generator)]
    return m.to(dtype=dtype, device=device)


def random_sizes(b, n, dtype=torch.float32, device="cpu", generator=None):
    """Integer token sizes in [1, 4], as ToMe's sizes are token counts."""
    return torch.randint(1, 5, (b, n, 1), generator=generator).to(dtype=dtype, device=device)
