"""Privacy auditing with one training run (Steinke, Nasr & Jagielski, "Privacy Auditing
with One (1) Training Run", NeurIPS 2023; Algorithm 1, Theorems 3.1 and 5.2, the
p-value of their Appendix D): the statistics, the audit of a cell's DP-SGD mechanism
with gradient canaries (`audit_cell`, the workflow's audit stage), and an input-space
membership score for a trained diffusion model (`membership_scores`).

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

import math

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


# ----------------------------------------------------------------------------
# The audit of a cell's mechanism with gradient (Dirac) canaries.
#
# Input-space canaries (mislabelled or out-of-distribution images in the training set,
# scored by `membership_scores`) have almost no power at the sizes we can train: on the
# smoke's digits cell (25 epochs, 300 canaries, fair coins) even a model trained with
# sigma = 0 and NO clipping gave 50-66 correct guesses of 100, a lower bound <= 0.3.
# The white-box audit of Steinke et al. (Sec. 7, "Dirac canaries") instead gives each
# canary a gradient of its own: canary i's loss is s C theta_i on a parameter vector
# theta with one coordinate per canary, so its gradient is s C e_i (norm s C > C, so the
# clip acts), and no other example touches theta_i. The included canaries are the
# training set of dpdm.privacy.DPSGD run with the cell's own sigma, C, q and number of
# steps; every noisy update is released (as DP-SGD's accounting assumes), so canary i's
# coordinate at step t, in units of C, is x_t ~ N(1, sigma^2) when it was sampled and
# N(0, sigma^2) when not (or excluded). Its score is the log-likelihood ratio of
# 'included' vs 'excluded' over the steps (`dirac_scores`): summing the x_t instead
# would add sigma^2 T of noise to about q T of signal, and see almost nothing when a
# canary is sampled only a few times (measured on the laptop MNIST eps = 10 cell, q T =
# 2: 112 of 200 guesses correct, no bound; the ratio's: docs/results.md).
# This audits the implementation of the mechanism the cell trains with (Poisson
# sampling, clipping, noise and its scale, the accountant's epsilon), end to end through
# the same class; a leak outside the mechanism (something of the data that bypasses
# DPSGD) is not in its scope.

CANARY_GRADIENT_SCALE = 10.0  # a canary's gradient norm before clipping, in units of C
TEST_ONLY_BREAKS = {
    "no-noise": "sigma = 0: no noise at all",
    "no-clip": "no clipping (canary gradients of norm 10 C pass whole), noise still sigma C",
}


def check_audit_sizes(canaries: int, k_pos: int, k_neg: int, num_examples: int) -> None:
    """The bad inputs of an audit, each named with its fix."""
    if canaries < 2:
        raise DPDMError(f"audit.canaries = {canaries}: an audit needs at least 2 canaries (e.g. 1000)")
    if canaries > num_examples:
        raise DPDMError(f"audit.canaries = {canaries} exceeds the {num_examples} training examples of the audited "
                        "cell; use at most as many canaries as examples (the audit models the addition of a few)")
    for name, k in (("k_pos", k_pos), ("k_neg", k_neg)):
        if not 0 <= k < canaries / 2:
            raise DPDMError(f"audit.{name} = {k}: each side may guess fewer than half of the {canaries} canaries "
                            "(k+ and k- < m/2; e.g. m/10)")
    if k_pos + k_neg == 0:
        raise DPDMError("audit.k_pos and audit.k_neg are both 0: the audit makes no guess")


def dirac_scores(included, *, noise_multiplier: float, clip: float, sample_rate: float, steps: int,
                 dp_seed: int | None = None, test_only_break: str | None = None) -> dict:
    """Scores of m gradient canaries (see above): the included canaries are the training set
    of a dpdm.privacy.DPSGD with these parameters, and every step's noisy update of their
    coordinates, x_t in units of C, is observed. Returns float64 [m] arrays:

        "llr"   sum_t log((1 - q) + q exp((x_t - 1/2) / sigma^2)), the log-likelihood ratio
                of 'included' (x_t ~ (1 - q) N(0, sigma^2) + q N(1, sigma^2)) against
                'excluded' (x_t ~ N(0, sigma^2)): the most powerful score for the
                mechanism the accountant assumes (sigma = `noise_multiplier`, even when
                `test_only_break` runs another), the audit's score;
        "sums"  sum_t x_t: (times sampled) + N(0, sigma^2 T) included, N(0, sigma^2 T) excluded.
    """
    import torch

    from dpdm.privacy import DPSGD

    included = np.asarray(included, dtype=bool)
    m, members = len(included), np.flatnonzero(included)
    claimed = float(noise_multiplier)
    if not claimed > 0:
        raise DPDMError(f"the audited mechanism's noise multiplier is {claimed}: an audit needs sigma > 0")
    sigma, bound = claimed, float(clip)
    if test_only_break == "no-noise":
        sigma = 0.0
    elif test_only_break == "no-clip":  # never clips; the noise's std sigma' C' = sigma C stays
        bound, sigma = 2 * CANARY_GRADIENT_SCALE * clip, sigma * clip / (2 * CANARY_GRADIENT_SCALE * clip)
    elif test_only_break is not None:
        raise DPDMError(f"audit.test_only_break = {test_only_break!r}; choose one of {sorted(TEST_ONLY_BREAKS)} "
                        "(or null: the real mechanism)")
    theta = torch.nn.Module()
    theta.coords = torch.nn.Parameter(torch.zeros(m, dtype=torch.float64))
    scale = CANARY_GRADIENT_SCALE * float(clip)

    def canary_loss(model, onehot):  # one canary: s C theta_i, gradient s C e_i
        return scale * (model.coords * onehot).sum()

    dp = DPSGD(canary_loss, noise_multiplier=sigma, max_grad_norm=bound, num_examples=max(1, len(members)),
               sample_rate=sample_rate, dp_seed=dp_seed)
    eye = torch.eye(m, dtype=torch.float64)
    sums, llr = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    log_out, log_in = math.log1p(-sample_rate) if sample_rate < 1 else -math.inf, math.log(sample_rate)
    for _ in range(int(steps)):
        idx = dp.poisson_batch()
        dp.step(theta, (eye[torch.as_tensor(members)[idx]],) if len(members) else (eye[:0],))
        x = theta.coords.grad * dp.expected_batch_size / float(clip)  # this step's update, units of C
        sums += x
        llr += torch.logaddexp(torch.full_like(x, log_out), log_in + (x - 0.5) / claimed ** 2)
    return {"llr": llr.numpy(), "sums": sums.numpy()}


def audit_cell(settings: dict, num_examples: int, *, canaries: int, k_pos: int, k_neg: int,
               confidence: float = 0.95, seed: int | None = None, test_only_break: str | None = None) -> dict:
    """The one-run audit of a cell's mechanism: its plan (dpdm.train.plan: q, steps, sigma
    for its training set of `num_examples`) and clip, m = `canaries` fair coins, the
    guesses, and the lower bound against the accountant's epsilon for that plan. `seed`
    fixes the coins and the mechanism's randomness (tests); None draws both secretly."""
    from dpdm import privacy
    from dpdm.privacy.randomness import derive_seed, secret_seed
    from dpdm.train import plan as cell_plan

    check_audit_sizes(canaries, k_pos, k_neg, num_examples)
    p, pr = cell_plan(settings, num_examples), settings["privacy"]
    base = secret_seed() if seed is None else int(seed)
    included = np.random.default_rng(derive_seed(base, "audit-coins")).random(canaries) < 0.5
    scores = dirac_scores(included, noise_multiplier=p["noise_multiplier"], clip=float(pr["clip"]),
                          sample_rate=p["sample_rate"], steps=p["planned_steps"],
                          dp_seed=derive_seed(base, "audit-mechanism"), test_only_break=test_only_break)["llr"]
    del base
    r, v = guess(scores, included, k_pos, k_neg)
    bound = epsilon_lower_bound(canaries, r, v, p["delta"], confidence)
    claimed = privacy.spent_epsilon(p["noise_multiplier"], p["sample_rate"], p["planned_steps"], p["delta"],
                                    pr["accountant"])
    return {
        "method": "one-run audit (Steinke, Nasr & Jagielski 2023), white-box gradient (Dirac) canaries through "
                  "dpdm.privacy.DPSGD with the cell's sigma, C, q and steps",
        "cell": settings["cell"],
        "canaries": int(canaries), "included": int(included.sum()), "k_pos": int(k_pos), "k_neg": int(k_neg),
        "guesses": int(r), "correct": int(v), "confidence": float(confidence), "delta": p["delta"],
        "eps_lower_bound": float(bound), "eps_accountant": float(claimed), "accountant": pr["accountant"],
        "mechanism": {"noise_multiplier": p["noise_multiplier"], "clip": float(pr["clip"]),
                      "sample_rate": p["sample_rate"], "steps": p["planned_steps"], "num_examples": int(num_examples)},
        "test_only_break": test_only_break,
        "passed": bool(bound <= claimed),
        "scores": scores.tolist(), "included_coins": included.astype(int).tolist(),
    }


def check_audit(result: dict) -> None:
    """The hard failure: an empirical lower bound above the accountant's epsilon."""
    if not result["passed"]:
        broken = result.get("test_only_break")
        raise DPDMError(
            f"privacy audit FAILED for cell {result['cell']}: {result['correct']} of {result['guesses']} membership "
            f"guesses correct gives an empirical epsilon >= {result['eps_lower_bound']:.3f} at "
            f"{100 * result['confidence']:g}% confidence, above the accountant's {result['eps_accountant']:.3f}. "
            + (f"Expected: the mechanism was broken on purpose (audit.test_only_break = {broken})."
               if broken else "Something is wrong with the mechanism (clipping, noise, sampling) or its "
               "accounting: do not release models trained with it."))
