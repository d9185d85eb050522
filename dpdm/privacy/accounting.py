"""Accounting: the noise for a target (epsilon, delta), the epsilon a run spent.

Stock Opacus accountants: `noise_multiplier_for` calibrates sigma for a planned run,
`epsilon_from_history` recomputes epsilon from the steps a mechanism actually took
(`Accountant`, an Opacus RDPAccountant that records them). Every epsilon we report comes
from an accountant, never from the config.
"""

from __future__ import annotations

import functools
import math

from dpdm.artifacts import DPDMError

ACCOUNTANTS = ("rdp", "prv")


def _make_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise DPDMError(f"unknown accountant '{name}'; choose one of {ACCOUNTANTS}")


def spent_epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps (noise multiplier sigma, rate q)."""
    if steps == 0:
        return 0.0
    acc = _make_accountant(accountant)
    acc.history = [(float(sigma), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def check_privacy_params(target_eps: float, delta: float, n: int) -> None:
    """Reject settings that cannot give a meaningful guarantee."""
    if not target_eps > 0:
        raise DPDMError(f"privacy target epsilon must be > 0, got {target_eps}")
    if not 0 < delta < 1.0 / n:
        raise DPDMError(
            f"privacy.delta = {delta:g} must be in (0, 1/N) = (0, {1.0 / n:.3g}) for a dataset of N = {n} "
            "examples; a delta of 1/N or more allows releasing an example outright. Lower privacy.delta."
        )


def calibrate_sigma(
    target_eps: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    rel_tol: float = 1e-3,
) -> float:
    """Smallest noise multiplier whose epsilon after `steps` steps is <= target_eps.

    Bisection on sigma with the chosen accountant; the tolerance is relative to the
    target (Opacus' own `get_noise_multiplier` uses an absolute tolerance, which at
    eps = 0.2 inflates sigma by about 5 %).
    """
    if not target_eps > 0:
        raise DPDMError(f"privacy target epsilon must be > 0, got {target_eps}")
    if not 0 < sample_rate <= 1:
        raise DPDMError(f"sampling rate must be in (0, 1], got {sample_rate}")
    lo, hi = 0.0, 1.0
    while spent_epsilon(hi, sample_rate, steps, delta, accountant) > target_eps:
        lo, hi = hi, 2 * hi
        if hi > 1e5:
            raise DPDMError(f"no noise multiplier below 1e5 reaches epsilon = {target_eps}; check delta and steps")
    # Invariant: eps(hi) <= target < eps(lo) (eps(0) = inf).
    while hi - lo > 1e-6 * hi:
        mid = 0.5 * (lo + hi)
        eps = spent_epsilon(mid, sample_rate, steps, delta, accountant)
        if eps > target_eps:
            lo = mid
        else:
            hi = mid
            if target_eps - eps < rel_tol * target_eps:
                break
    return hi


def steps_for(epochs: float, sample_rate: float) -> int:
    """Number of Poisson-sampled steps in `epochs` passes: ceil(epochs / q)."""
    return int(math.ceil(epochs / sample_rate - 1e-9))


@functools.lru_cache(maxsize=64)
def _rdp_one_step(noise_multiplier: float, sample_rate: float):
    """Opacus' RDP curve of ONE subsampled Gaussian step at the RDPAccountant's default orders."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                     orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)
    return curve


def epsilon_from_history(history, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a list of (noise_multiplier, sample_rate, steps) segments, composed.

    This is how every reported epsilon is computed: from what the mechanism recorded
    while it ran (`DPSGD.history`), not from the config. RDP is exactly what Opacus'
    RDPAccountant computes (its per-step RDP curve times the steps, summed over
    segments, then converted at its default orders); the per-step curve is cached, so
    epsilon-so-far can be logged every step at no cost.
    """
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as rdp_analysis

        curve = sum(_rdp_one_step(s, q) * n for s, q, n in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=delta)
        return float(eps)
    acc = _make_accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


CALIBRATIONS = ("tight", "opacus")


@functools.lru_cache(maxsize=32)
def noise_multiplier_for(
    target_eps: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    accountant: str = "rdp",
    calibration: str = "tight",
) -> float:
    """The noise multiplier sigma for a planned run, by the configured calibration.

    tight:  `calibrate_sigma` (bisection, relative tolerance 1e-3 on epsilon).
    opacus: `opacus.accountants.utils.get_noise_multiplier` with its default absolute
            tolerance 0.01 (the paper's code path; over-noises at small epsilon).
    Either way the result is checked: epsilon(sigma) <= target with the same accountant.
    """
    if accountant not in ACCOUNTANTS:
        raise DPDMError(f"privacy.accountant = '{accountant}' is unknown; choose one of {ACCOUNTANTS}")
    if steps < 1:
        raise DPDMError(f"cannot calibrate noise for {steps} steps; check train.epochs and train.max_steps")
    if calibration == "tight":
        sigma = calibrate_sigma(target_eps, delta, sample_rate, steps, accountant)
    elif calibration == "opacus":
        from opacus.accountants.utils import get_noise_multiplier

        sigma = float(get_noise_multiplier(target_epsilon=target_eps, target_delta=delta,
                                           sample_rate=sample_rate, steps=steps, accountant=accountant))
    else:
        raise DPDMError(f"privacy.calibration = '{calibration}' is unknown; choose one of {CALIBRATIONS}")
    eps = spent_epsilon(sigma, sample_rate, steps, delta, accountant)
    if not eps <= target_eps:  # never trust a calibration routine blindly
        raise DPDMError(f"calibrated sigma = {sigma} gives epsilon = {eps} > target {target_eps} ({accountant})")
    return float(sigma)


class Accountant:
    """The steps a mechanism took, as (noise_multiplier, sample_rate, steps) segments:
    an Opacus RDPAccountant, whose `step` records them (merging equal consecutive
    steps), and whose history `epsilon_from_history` composes."""

    def __init__(self, history=()):
        from opacus.accountants import RDPAccountant

        self._opacus = RDPAccountant()
        self._opacus.history = [(float(s), float(q), int(n)) for s, q, n in history]

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._opacus.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def history(self) -> list[list]:
        """[[noise_multiplier, sample_rate, steps], ...] (a copy, as privacy.json writes it)."""
        return [list(h) for h in self._opacus.history]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._opacus.history)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon_from_history(self._opacus.history, delta, accountant)
