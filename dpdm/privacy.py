"""DP-SGD: accounting, Poisson sampling, per-example gradients, clipping and noise.

Accounting is stock Opacus: `calibrate_sigma` finds the noise multiplier for a target
(epsilon, delta), `spent_epsilon` recomputes epsilon from the steps actually taken.
Every epsilon we report comes from an accountant, never from the config.
"""

from __future__ import annotations

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
