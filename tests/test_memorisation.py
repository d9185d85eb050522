"""dpdm.memorisation: exact nearest neighbours, and the check finds planted copies of
training images while real held-out images pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpdm import data, memorisation
from dpdm.artifacts import DPDMError, sha256_file


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.random((37, 12)).astype(np.float32), rng.random((53, 12)).astype(np.float32)
    import torch

    d, i = memorisation.nearest(torch.from_numpy(q), torch.from_numpy(r), k=5, chunk=8)
    full = np.sqrt(((q[:, None, :].astype(np.float64) - r[None]) ** 2).sum(-1))
    want_i = np.argsort(full, axis=1)[:, :5]
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(d, np.take_along_axis(full, want_i, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(DPDMError, match="k = 60"):
        memorisation.nearest(torch.from_numpy(q), torch.from_numpy(r), k=60)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    data.prepare("digits", out_dir=root / "digits", download=False, digits_size=8)
    return root / "digits"


def test_planted_copies_are_found_and_held_out_images_are_not(digits, tmp_path):
    train = data.load_split(digits, "train")[0]
    test = data.load_split(digits, "test")[0]
    fresh, reference = test[:150], test[150:]  # real images the training set never saw
    rng = np.random.default_rng(1)
    copies = train[rng.choice(len(train), 40, replace=False)].astype(np.int16)
    copies = np.clip(copies + rng.integers(-3, 4, copies.shape), 0, 255).astype(np.uint8)  # near, not equal
    samples = np.concatenate([copies, fresh])
    res = memorisation.memorisation(samples, train, reference, neighbours=20)
    arrays = res.pop("_arrays")
    flagged = arrays["relative"] < 1
    assert flagged[:40].all(), "every planted copy is a near-copy"
    # Real held-out digits are flagged only at the real probes' own rate (8x8 digits have
    # near-duplicates across the splits)
    assert flagged[40:].mean() < 0.12 and res["near_copy_fraction_real"] < 0.12
    assert res["near_copy_fraction"] > 0.15 + res["near_copy_fraction_real"]
    assert res["near_copies"] == int(flagged.sum()) and res["num_train"] == len(train)
    assert (arrays["ratio"][:40] < 0.2).all()
    # fresh real digits have the ratios of the real probes (another slice of real held-out digits)
    assert abs(np.median(arrays["ratio"][40:]) - res["ratio_train_test_real"]["quantiles"]["0.5"]) < 0.1
    assert res["num_real_probes"] + res["num_test_reference"] == len(reference)

    np.savez(tmp_path / "samples.npz", images=samples, labels=np.zeros(len(samples), np.int64))
    np.savez(tmp_path / "ref.npz", images=reference, labels=np.zeros(len(reference), np.int64))
    out, pairs = tmp_path / "memorisation_acc.json", tmp_path / "private" / "memorisation_pairs_acc.png"
    memorisation.check_memorisation(tmp_path / "samples.npz", digits / "train.npz", tmp_path / "ref.npz", out,
                                    pairs, neighbours=20)
    written = json.loads(out.read_text())
    assert written["near_copies"] >= 40 and written["covered_by_dp"] is False
    assert "NOT covered" in written["not_covered"] and "_arrays" not in written
    assert written["provenance"]["private_inputs"] == [str(digits / "train.npz")]
    assert sha256_file(digits / "train.npz") not in out.read_text()  # the private split is named, never hashed
    assert pairs.stat().st_size > 1000


def test_bad_inputs(digits):
    train = data.load_split(digits, "train")[0]
    with pytest.raises(DPDMError, match="differ in shape"):
        memorisation.memorisation(train[:5, :4], train, train[:10])
    with pytest.raises(DPDMError, match="alpha"):
        memorisation.memorisation(train[:5], train, train[:10], alpha=2.0)


def test_feature_space_sees_a_shifted_copy_that_pixels_miss(digits):
    """With a feature extractor the same statistics are computed on features too (the
    paper pipeline uses FID's Inception; here a stand-in that is blind to a one-pixel
    shift): a shifted copy of a training image is far in pixels, a copy in features."""
    train = data.load_split(digits, "train")[0]
    test = data.load_split(digits, "test")[0]

    class ShiftBlind:  # column sums of the image: a horizontal shift by one pixel keeps most of them
        identity = {"name": "shift-blind stand-in"}

        def __call__(self, images):
            x = images.astype(np.float32).sum(axis=(2, 3))  # [N, H]: row sums, invariant to horizontal shifts
            return x / 255.0

    shifted = np.roll(train[:30], 1, axis=2)  # copies moved one pixel to the right
    samples = np.concatenate([shifted, test[:60]])
    res = memorisation.memorisation(samples, train, test[60:], neighbours=20, features=ShiftBlind())
    arrays = res.pop("_arrays")
    feat = res["feature_space"]
    assert feat["extractor"] == "shift-blind stand-in"
    assert (arrays["relative"][:30] < 1).mean() < 0.5  # pixels mostly miss the shifted copies ...
    assert feat["near_copies"] >= 25  # ... features catch them
    assert feat["near_copy_fraction_real"] < 0.5 and 0 <= feat["same_nearest_as_pixels"] <= 1


def test_check_memorisation_with_the_untrained_extractor(digits, tmp_path):
    """The CLI path: --extractor untrained (tests only) adds "feature_space" to the JSON
    (small splits: the untrained Inception runs ~10 images/s on CPU)."""
    from dpdm.cli import main

    train, test = data.load_split(digits, "train")[0], data.load_split(digits, "test")[0]
    for name, images in (("samples", test[:6]), ("train", train[:40]), ("test", test[6:26])):
        np.savez(tmp_path / f"{name}.npz", images=images, labels=np.zeros(len(images), np.int64))
    out, pairs = tmp_path / "m.json", tmp_path / "private" / "pairs.png"
    main(["memorisation", "--samples", str(tmp_path / "samples.npz"), "--train", str(tmp_path / "train.npz"),
          "--test", str(tmp_path / "test.npz"), "--out", str(out), "--pairs", str(pairs), "--extractor", "untrained",
          "--device", "cpu", "--neighbours", "5"])
    written = json.loads(out.read_text())
    assert written["feature_space"]["extractor"] == "untrained" and written["num_train"] == 40
    assert pairs.stat().st_size > 1000
