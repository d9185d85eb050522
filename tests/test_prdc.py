"""Precision / recall and density / coverage (dpdm.prdc) against Naeem et al.'s `prdc`
package, and on sets whose answers are known."""

import numpy as np
import pytest

from dpdm.errors import DPDMError
from dpdm.prdc import prdc


@pytest.mark.parametrize("n_real, n_fake, dim, k, chunk", [(60, 45, 8, 3, 7), (80, 80, 16, 5, 2048),
                                                            (33, 70, 4, 1, 10)])
def test_matches_the_prdc_package(n_real, n_fake, dim, k, chunk):
    from prdc import compute_prdc

    rng = np.random.default_rng(n_real + k)
    real = rng.normal(size=(n_real, dim))
    fake = rng.normal(0.3, 1.2, size=(n_fake, dim))  # overlapping, not equal: every metric strictly in (0, 1)
    ours = prdc(real, fake, k=k, chunk=chunk)
    theirs = compute_prdc(real, fake, nearest_k=k)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-12), name
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1 and 0 < ours["coverage"] < 1
    assert (ours["k"], ours["num_real"], ours["num_fake"]) == (k, n_real, n_fake)


def test_known_answers():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 6))
    same = prdc(real, real + 1e-9, k=5)  # the real set itself: every ball hit, every point covered
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    # density: about 1 (each point in its own ball and, on average, in about k others' / k): measured 1.096
    assert 0.9 < same["density"] < 1.3
    far = prdc(real, real + 100.0, k=5)  # a copy far away: no fidelity, no diversity
    assert far == {**far, "precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    collapsed = prdc(real, np.repeat(real[:1], 50, axis=0) + rng.normal(0, 1e-6, (50, 6)), k=5)
    assert collapsed["precision"] == 1.0  # mode collapse: every sample realistic ...
    assert collapsed["recall"] < 0.1 and collapsed["coverage"] < 0.1  # ... but no diversity


def test_bad_inputs():
    with pytest.raises(DPDMError, match="more than k"):
        prdc(np.zeros((5, 2)), np.ones((5, 2)), k=5)
    with pytest.raises(DPDMError, match="equal D"):
        prdc(np.zeros((10, 2)), np.ones((10, 3)), k=2)
