"""dpdm.audit, the statistics of the one-run audit (Steinke, Nasr & Jagielski 2023):
closed forms, an independent recomputation of the delta term, and a simulation of an
eps-DP mechanism (randomised response) whose lower bound must stay below its eps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from dpdm import audit
from dpdm.artifacts import DPDMError


def _logit(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_guesses_correct_without_delta_has_a_closed_form(r):
    """delta = 0 and v = r: p = q^r, so the bound is logit(alpha^(1/r))."""
    expected = _logit(0.05 ** (1 / r))
    assert audit.epsilon_lower_bound(m=2 * r, r=r, v=r, delta=0.0) == pytest.approx(expected, abs=1e-6)
    assert audit.epsilon_lower_bound(m=2 * r, r=r, v=r, delta=0.0, confidence=0.99) < expected


def test_the_bound_is_the_largest_eps_the_test_rejects():
    m, r, v, delta = 1000, 200, 170, 1e-5
    eps = audit.epsilon_lower_bound(m, r, v, delta)
    assert 0 < eps < 10
    assert audit.p_value(m, r, v, eps, delta) <= 0.05 < audit.p_value(m, r, v, eps + 1e-3, delta)


def test_the_delta_term_matches_a_direct_recomputation():
    """2 m delta max_i (1/i) sum_{j=1..i} P[B = v - j], summed term by term."""
    m, r, v, eps, delta = 500, 60, 48, 1.3, 1e-4
    q = math.exp(eps) / (1 + math.exp(eps))
    worst = max(sum(binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    expected = binom.sf(v - 1, r, q) + 2 * m * delta * worst
    assert audit.p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-10)
    # delta weakens the bound; at delta = 0 the p-value is the binomial tail alone.
    assert audit.p_value(m, r, v, eps, 0.0) == pytest.approx(binom.sf(v - 1, r, q), rel=1e-12)
    assert audit.epsilon_lower_bound(m, r, v, delta) < audit.epsilon_lower_bound(m, r, v, 0.0)


def test_chance_level_guesses_give_no_bound():
    assert audit.epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert audit.epsilon_lower_bound(1000, 200, 0, 1e-5) == 0.0


@pytest.mark.parametrize("true_eps", [0.5, 2.0])
def test_randomised_response_is_never_caught_above_its_eps_more_often_than_alpha(true_eps):
    """Soundness: guesses about an eps-DP mechanism (randomised response) are right with
    probability e^eps / (1 + e^eps). Over 2,000 simulated audits the 95 % lower bound
    exceeds the true eps in at most 5 % of them (plus sampling slack); and the audit has
    power: it usually finds a clearly positive bound."""
    rng = np.random.default_rng(0)
    m, r = 1000, 300
    q = math.exp(true_eps) / (1 + math.exp(true_eps))
    correct = rng.binomial(r, q, size=2000)
    bounds = {v: audit.epsilon_lower_bound(m, r, int(v), 0.0) for v in np.unique(correct)}
    lower = np.array([bounds[v] for v in correct])
    assert (lower > true_eps).mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 2000)
    assert np.median(lower) > 0.6 * true_eps


def test_guesses_count_the_top_and_bottom_scores():
    included = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    perfect = np.where(included, 1.0, 0.0) + np.linspace(0, 0.1, 8)
    assert audit.guess(perfect, included, k_pos=3, k_neg=3) == (6, 6)
    assert audit.guess(-perfect, included, k_pos=3, k_neg=3) == (6, 0)  # scores of the wrong sign
    assert audit.guess(perfect, included, k_pos=4, k_neg=0) == (4, 4)
    assert audit.guess(perfect, included, k_pos=0, k_neg=2) == (2, 2)


def test_bad_inputs_name_the_problem():
    with pytest.raises(DPDMError, match=r"correct \(5\) <= guesses \(4\)"):
        audit.p_value(10, 4, 5, 1.0, 0.0)
    with pytest.raises(DPDMError, match="confidence must lie in"):
        audit.epsilon_lower_bound(10, 4, 4, 0.0, confidence=95)
    with pytest.raises(DPDMError, match="at most the 3 canaries"):
        audit.guess([0.1, 0.2, 0.3], [True, False, True], 2, 2)
    with pytest.raises(DPDMError, match="one score per canary"):
        audit.guess([0.1, 0.2], [True, False, True], 1, 1)


def test_membership_scores_find_the_canaries_a_model_memorised():
    """Power at the smallest scale: a denoiser trained without DP on half of 16 random
    canaries scores those above the other half, so every guess is right; the untrained
    network scores all of them 0."""
    import copy

    import torch

    from dpdm.diffusion import build_precond, example_loss
    from test_diffusion import settings_for

    torch.manual_seed(0)
    model = build_precond(settings_for("edm"), 8, 1, 0)
    reference = copy.deepcopy(model)
    canaries = torch.rand(16, 1, 8, 8) * 2 - 1
    included = np.arange(16) % 2 == 0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    member = canaries[torch.from_numpy(included)]
    for _ in range(150):
        sigma = torch.exp(torch.randn(len(member), 2) * 1.2 - 1.2)
        noise = torch.randn(len(member), 2, 1, 8, 8)
        loss = torch.stack([example_loss(model, y, None, s, n) for y, s, n in zip(member, sigma, noise)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = audit.membership_scores(model, reference, canaries)
    assert audit.guess(scores, included, k_pos=4, k_neg=4) == (8, 8)
    assert np.allclose(audit.membership_scores(reference, reference, canaries), 0.0)
