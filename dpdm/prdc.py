"""Precision / recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models") and density / coverage (Naeem et al. 2020, "Reliable
Fidelity and Diversity Metrics for Generative Models"), on feature vectors (the FID's
Inception features).

Each real feature r_i has a ball B(r_i, NND_k(r_i)) whose radius is the distance to its
k-th nearest OTHER real feature; likewise each fake f_j. Then

    precision = 1/M sum_j 1[f_j in some real ball]                  (fidelity)
    recall    = 1/N sum_i 1[r_i in some fake ball]                  (diversity)
    density   = 1/(kM) sum_j #{i : f_j in B(r_i, NND_k(r_i))}      (Naeem eq. 1)
    coverage  = 1/N sum_i 1[the nearest fake to r_i lies in r_i's ball]  (Naeem eq. 2)

with N real and M fake features; `prdc` (PyPI, Naeem et al.'s code) computes the same
with a full distance matrix, here in chunks so 60,000 x 60,000 fits in memory.
"""

from __future__ import annotations

import numpy as np

from dpdm.errors import DPDMError

PRDC_METRICS = ("precision", "recall", "density", "coverage")
DEFAULT_K = 5  # Naeem et al.'s default (Kynkaanniemi et al. use k = 3)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _kth_nn_radii(x, k: int, chunk: int):
    """Distance of each row of x to its k-th nearest other row (the row itself excluded)."""
    import torch

    out = torch.empty(len(x), dtype=torch.float64)
    for s in _chunks(len(x), chunk):
        d = torch.cdist(x[s], x)
        # the row itself is at distance 0: the (k+1)-th smallest overall is the k-th other
        out[s] = d.kthvalue(k + 1, dim=1).values.double()
    return out


def prdc(real: np.ndarray, fake: np.ndarray, k: int = DEFAULT_K, chunk: int = 2048) -> dict:
    """{"precision", "recall", "density", "coverage", "k", "num_real", "num_fake"} of
    feature arrays [N, D] and [M, D] (float64 distances, computed in float64)."""
    import torch

    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DPDMError(f"precision/recall need two feature arrays [N, D] of equal D; got {tuple(real.shape)} and "
                        f"{tuple(fake.shape)}")
    if not 1 <= k < min(len(real), len(fake)):
        raise DPDMError(f"precision/recall with k = {k} need more than k real and fake features (have "
                        f"{len(real)} real, {len(fake)} fake); lower the k or use more images")
    r_real = _kth_nn_radii(real, k, chunk)
    r_fake = _kth_nn_radii(fake, k, chunk)
    in_real_ball = torch.zeros(len(fake), dtype=torch.bool)  # precision
    real_balls_hit = torch.zeros(len(fake), dtype=torch.float64)  # density
    nearest_fake = torch.full((len(real),), float("inf"), dtype=torch.float64)  # coverage
    in_fake_ball = torch.zeros(len(real), dtype=torch.bool)  # recall
    for s in _chunks(len(real), chunk):
        d = torch.cdist(real[s], fake)  # [n_chunk, M]
        inside_real = d < r_real[s, None]  # strict, as Naeem et al.'s code
        in_real_ball |= inside_real.any(dim=0)
        real_balls_hit += inside_real.sum(dim=0)
        nearest_fake[s] = d.min(dim=1).values
        in_fake_ball[s] = (d < r_fake[None, :]).any(dim=1)
    return {
        "precision": float(in_real_ball.double().mean()),
        "recall": float(in_fake_ball.double().mean()),
        "density": float(real_balls_hit.mean() / k),
        "coverage": float((nearest_fake < r_real).double().mean()),
        "k": int(k),
        "num_real": len(real),
        "num_fake": len(fake),
    }
