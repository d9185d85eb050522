"""Privacy auditing with one training run: the statistics (Steinke, Nasr & Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023; Algorithm 1, Theorems 3.1
and 5.2, the p-value of their Appendix D).

The experiment. m canaries; each is included in the training set by an independent
fair coin S_i in {-1, +1}, kept secret from the scorer. After ONE training run, every
canary gets a membership score (higher: looks included). The auditor guesses +1 for
the k+ highest scores, -1 for the k- lowest and abstains on the rest, then counts the
correct guesses v among r = k+ + k- (`guess`). k+ and k- are fixed BEFORE the scores
are seen: choosing them by looking at the outcome voids the confidence level.

The bound. If training is (eps, delta)-DP, the number of correct guesses is
stochastically dominated, up to a delta term, by Binomial(r, e^eps / (1 + e^eps)), the
accuracy of eps-randomised response (Theorem 3.1 for delta = 0, Theorem 5.2 for
delta > 0). `p_value` is the probability of v or more correct guesses under that null
hypothesis; `epsilon_lower_bound` is the largest eps whose p-value is at most
1 - confidence: every (eps', delta)-DP mechanism with eps' below it would have
produced this many correct guesses with probability below 1 - confidence. A lower
bound above the eps an accountant reports means the mechanism or its accounting is
broken.
"""

from __future__ import annotations

import numpy as np

from dpdm.errors import DPDMError


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise DPDMError(f"audit counts must satisfy 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] when training is (eps, delta)-DP, m canaries.

    beta = P[Binomial(r, q) >= v] with q = e^eps / (1 + e^eps) (Theorem 3.1); delta > 0
    adds 2 m delta max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i (Theorem 5.2,
    Appendix D)."""
    from scipy.special import expit
    from scipy.stats import binom

    _check_counts(m, r, v)
    if eps < 0 or not 0 <= delta <= 1:
        raise DPDMError(f"p_value needs eps >= 0 and 0 <= delta <= 1 (got eps = {eps}, delta = {delta})")
    q = float(expit(eps))
    beta = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    worst = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(beta + 2 * m * delta * worst, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95,
                        eps_max: float = 50.0, tol: float = 1e-9) -> float:
    """The largest eps in [0, eps_max] with p_value(m, r, v, eps, delta) <= 1 - confidence
    (0 when even eps = 0 explains the guesses). The p-value grows with eps, so bisection."""
    if not 0 < confidence < 1:
        raise DPDMError(f"audit confidence must lie in (0, 1), e.g. 0.95; got {confidence}")
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    if p_value(m, r, v, eps_max, delta) <= alpha:
        return float(eps_max)
    lo, hi = 0.0, float(eps_max)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def guess(scores, included, k_pos: int, k_neg: int) -> tuple[int, int]:
    """(r, v): guess 'included' for the k_pos highest scores and 'excluded' for the k_neg
    lowest (abstain on the rest); v counts the correct guesses among the r made."""
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise DPDMError(f"audit: one score per canary needed (scores {scores.shape}, coins {included.shape})")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > len(scores):
        raise DPDMError(f"audit: k+ = {k_pos} and k- = {k_neg} guesses must be >= 0 and together at most the "
                        f"{len(scores)} canaries")
    order = np.argsort(-scores, kind="stable")  # highest score first
    correct = int(included[order[:k_pos]].sum()) + int((~included[order[len(scores) - k_neg:]]).sum())
    return k_pos + k_neg, correct


# ----------------------------------------------------------------------------
# The membership score of a diffusion model.


def membership_scores(model, reference, images, labels=None, sigmas=(0.05, 0.1, 0.2, 0.5, 1.0),
                      draws: int = 4, seed: int = 0, batch_size: int = 256):
    """One score per canary: how much training lowered its denoising loss,

        score_i = mean over (sigma, draw) of [L_reference(x_i) - L_model(x_i)],

    with L the noise-multiplicity loss of dpdm.diffusion (the model's own weighting),
    evaluated at the fixed noise levels `sigmas`, `draws` noise draws each, the draws
    fixed by `seed` and the same for both models (the score's randomness is the
    auditor's, public). `reference` is the same network before training (its initial
    weights), which removes how hard each canary is to denoise anyway.
    images: float [m, C, H, W] in [-1, 1]; labels: long [m] or None."""
    import torch

    sig = torch.tensor([s for s in sigmas for _ in range(draws)], dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(seed))
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            y = images[start:start + batch_size].float()
            lab = None if labels is None else labels[start:start + batch_size]
            sigma = sig.expand(len(y), -1).contiguous()
            noise = torch.randn((len(y), len(sig), *y.shape[1:]), generator=gen)
            batch = (y, lab, sigma, noise)
            scores.append(_losses(reference, *batch) - _losses(model, *batch))
    return torch.cat(scores).numpy().astype(np.float64)


def _losses(net, y, labels, sigma, noise):
    """dpdm.diffusion's per-example losses of `net`, computed on its device, returned on CPU."""
    from dpdm.diffusion import batch_example_losses

    dev = next(net.parameters()).device
    return batch_example_losses(net, y.to(dev), None if labels is None else labels.to(dev), sigma.to(dev),
                                noise.to(dev)).cpu()
