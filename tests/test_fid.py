"""FID: the Frechet distance, the feature extractor, weights handling, and the files.

Everything runs offline on CPU with the untrained (random-weight) extractor and a
handful of tiny images: each image still goes through a full Inception at 299 x 299.
"""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch

from dpdm import fid
from dpdm.prdc import PRDC_METRICS
from dpdm.artifacts import DPDMError, sha256_file


def _images(n, size=16, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    # Some structure so features differ between sets: a bright square in a random place.
    for i in range(n):
        r, c = rng.integers(0, size // 2, size=2)
        base[i, r:r + size // 2, c:c + size // 2] = 255
    return base


def _write_split(path, images, labels=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(len(images), np.int64) if labels is None else labels
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture(scope="module")
def untrained():
    return fid.build_extractor("untrained", device="cpu")


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """No weights anywhere: env unset, torch hub pointed at an empty folder."""
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


# ----------------------------------------------------------------------------
# The distance.


def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(1)
    d = 7
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_general_covariances():
    rng = np.random.default_rng(2)
    d = 5
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(r1 @ s2 @ r1))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_equals_pytorch_fids_sqrtm_formula():
    """The eigen-decomposition trace equals pytorch-fid's scipy sqrtm of S1 S2, also for
    rank-deficient sample covariances (fewer samples than dimensions) and big dimensions."""
    from scipy import linalg

    rng = np.random.default_rng(4)
    for d, n1, n2 in ((6, 50, 40), (64, 30, 200), (256, 300, 120)):
        x, y = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)), rng.normal(size=(n2, d)) + 0.3
        mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
        covmean = linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert fid.frechet_distance(mu1, s1, mu2, s2, sqrt_sigma1=fid.psd_sqrt(s1)) == \
            pytest.approx(fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-12)


def test_frechet_singular_covariances_handled():
    # Rank-deficient covariances (fewer samples than dimensions), as with small sample sets.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 10))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-4


def test_frechet_shape_mismatch():
    with pytest.raises(DPDMError, match="different shapes"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_streamed_statistics_match_numpy():
    class Fake:
        def __call__(self, batch):
            return batch.reshape(len(batch), -1).astype(np.float64) * 0.01 + 1e3  # large offset

    x = _images(23, size=4)
    mu, sigma = fid.activation_statistics(x, Fake(), batch_size=5)
    act = x.reshape(23, -1).astype(np.float64) * 0.01 + 1e3
    np.testing.assert_allclose(mu, act.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(act, rowvar=False), atol=1e-9)


# ----------------------------------------------------------------------------
# The extractor.


def test_extractor_matches_pytorch_fid(monkeypatch, untrained):
    """Our network = pytorch-fid's InceptionV3 (pool3, resize and normalize) for the same weights."""
    import pytorch_fid.inception as pfi

    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: fid.untrained_state_dict())
    reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = _images(2, size=28, channels=3, seed=4)
    ours = untrained(x)
    with torch.inference_mode():
        theirs = reference(torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255.0)[0].flatten(1).double().numpy()
    assert ours.shape == (2, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_grayscale_is_repeated_to_rgb(untrained):
    g = _images(2, size=16, channels=1, seed=5)
    np.testing.assert_allclose(untrained(g), untrained(np.repeat(g, 3, axis=-1)), rtol=1e-4, atol=1e-5)


def test_statistics_deterministic(untrained):
    x = _images(3, size=16, seed=6)
    mu1, s1 = fid.activation_statistics(x, untrained, batch_size=2)
    mu2, s2 = fid.activation_statistics(x, untrained, batch_size=2)
    np.testing.assert_array_equal(mu1, mu2)  # same input, same batching: bit-identical
    np.testing.assert_array_equal(s1, s2)
    mu3, _ = fid.activation_statistics(x, untrained, batch_size=3)
    np.testing.assert_allclose(mu1, mu3, rtol=1e-5, atol=1e-8)  # other batching: equal up to float error


def test_cpu_chunks_change_nothing_but_rounding(untrained, monkeypatch):
    """A batch larger than CPU_CHUNK is split; the features are those of each image alone."""
    monkeypatch.setattr(untrained, "CPU_CHUNK", 2)
    x = _images(5, size=16, seed=7)
    chunked = untrained(x)
    alone = np.concatenate([untrained(x[i:i + 1]) for i in range(5)])
    assert chunked.shape == (5, 2048)
    np.testing.assert_allclose(chunked, alone, rtol=1e-5, atol=1e-6)
    assert untrained(x[:0]).shape == (0, 2048)


def test_untrained_weights_depend_only_on_seed():
    fresh = fid.untrained_state_dict.__wrapped__(fid.UNTRAINED_SEED)  # bypass the per-process cache
    cached = fid.untrained_state_dict(fid.UNTRAINED_SEED)
    assert fresh.keys() == cached.keys()
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    other = fid.untrained_state_dict.__wrapped__(fid.UNTRAINED_SEED + 1)
    assert not torch.equal(other["Conv2d_1a_3x3.conv.weight"], cached["Conv2d_1a_3x3.conv.weight"])


def test_rejects_non_uint8(untrained):
    with pytest.raises(DPDMError, match="uint8"):
        untrained(np.zeros((1, 8, 8, 1), np.float32))


# ----------------------------------------------------------------------------
# Weights.


def test_missing_weights_offline(no_weights):
    with pytest.raises(DPDMError) as e:
        fid.resolve_weights(None)
    msg = str(e.value)
    assert fid.WEIGHTS_SHA256 in msg and "fetch-weights" in msg and fid.WEIGHTS_ENV in msg
    assert fid.WEIGHTS_URL in msg and "95,628,359" in msg


def test_missing_explicit_weights_file(no_weights, tmp_path):
    with pytest.raises(DPDMError, match="does not exist") as e:
        fid.build_extractor("inception", weights_path=tmp_path / "nope.pth", device="cpu")
    assert "fetch-weights" in str(e.value)


def test_wrong_checksum_weights(no_weights, tmp_path, monkeypatch):
    bad = tmp_path / fid.WEIGHTS_FILENAME
    bad.write_bytes(b"definitely not inception")
    with pytest.raises(DPDMError, match="sha256") as e:
        fid.resolve_weights(bad)
    assert fid.WEIGHTS_SHA256 in str(e.value)
    # Also when found through the environment variable or torch hub's cache.
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(bad))
    with pytest.raises(DPDMError, match="sha256"):
        fid.resolve_weights(None)
    monkeypatch.delenv(fid.WEIGHTS_ENV)
    hub = fid._hub_weights_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"also not inception")
    with pytest.raises(DPDMError, match="sha256"):
        fid.resolve_weights(None)


def test_fetch_weights_offline(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fid.urllib.request, "urlopen", offline)
    out = tmp_path / "w" / fid.WEIGHTS_FILENAME
    with pytest.raises(DPDMError, match="needs the internet") as e:
        fid.fetch_weights(out)
    assert fid.WEIGHTS_SHA256 in str(e.value)
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing half-written


def test_fetch_weights_rejects_corrupt_download(monkeypatch, tmp_path):
    import io

    class Resp(io.BytesIO):
        headers = {"Content-Length": "5"}

    monkeypatch.setattr(fid.urllib.request, "urlopen", lambda *a, **k: Resp(b"hello"))
    out = tmp_path / fid.WEIGHTS_FILENAME
    with pytest.raises(DPDMError, match="sha256"):
        fid.fetch_weights(out)
    assert not out.exists()


def test_fake_weights_roundtrip(monkeypatch, tmp_path, no_weights, untrained):
    """Weights loaded from a file through the --weights route give the same features."""
    path = tmp_path / "fake_inception.pth"
    torch.save(fid.untrained_state_dict(), path)
    monkeypatch.setattr(fid, "WEIGHTS_SHA256", sha256_file(path))  # accept our fake file
    loaded = fid.build_extractor("inception", weights_path=path, device="cpu")
    assert loaded.identity["name"] == fid.INCEPTION_NAME
    assert loaded.identity["weights"] == sha256_file(path) and loaded.identity["test_only"] is False
    x = _images(2, size=16, seed=7)
    np.testing.assert_array_equal(loaded(x), untrained(x))
    # And via the environment variable.
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(path))
    assert fid.resolve_weights(None) == path


# ----------------------------------------------------------------------------
# Files end to end.


def test_untrained_end_to_end(tmp_path, caplog, monkeypatch):
    # scipy's sqrtm of a 2048 x 2048 matrix takes about a minute on a loaded CPU, so this
    # test keeps the first DIM features (the network, files and distance code are the real ones).
    dim = 32
    full_call = fid.InceptionFeatures.__call__
    monkeypatch.setattr(fid.InceptionFeatures, "__call__", lambda self, x: full_call(self, x)[:, :dim])

    data = tmp_path / "data"
    _write_split(data / "train.npz", _images(6, seed=8))
    samples = _write_split(tmp_path / "samples_ddim.npz", _images(6, seed=9), labels=-np.ones(6, np.int64))
    ref = tmp_path / "fid_train.npz"
    with caplog.at_level("WARNING"):
        fid.compute_reference(data, "train", ref, extractor="untrained", batch_size=4, device="cpu")
    assert "NOT FIDs" in caplog.text
    r = fid.load_reference(ref)
    assert r["mu"].shape == (dim,) and r["sigma"].shape == (dim, dim) and r["n"] == 6
    assert r["extractor_name"] == "untrained"
    assert r["extractor_weights"] == f"untrained-seed-{fid.UNTRAINED_SEED}"
    assert r["test_only"] is True and r["split"] == "train"
    assert r["source_sha256"] == sha256_file(data / "train.npz")

    res_self = fid.compute_fid(data / "train.npz", ref, tmp_path / "fid_self.json", extractor="untrained",
                               batch_size=6, device="cpu")
    assert abs(res_self["fid"]) < 1e-3  # a set against itself

    settings = {"cell": {"dataset": "mnist", "eps": 10.0, "eps_tag": "eps10", "seed": 0}, "fid": {"batch_size": 4}}
    out = tmp_path / "fid_ddim.json"
    fid.compute_fid(samples, ref, out, extractor="untrained", num_samples=5, batch_size=5, device="cpu",
                    settings=settings)
    res = json.loads(out.read_text())
    assert res["fid"] > 1e-3 and np.isfinite(res["fid"])
    assert res["num_samples"] == 5
    assert res["test_only"] is True and "NOT an FID" in res["warning"]
    assert res["extractor"]["name"] == "untrained" and res["extractor"]["test_only"] is True
    assert res["reference"] == {"path": str(ref), "split": "train", "n": 6, "fid": res["fid"],
                                "covered_by_dp": False}
    assert res["covered_by_dp"] is False and "not post-processing" in res["not_covered"]
    assert res["provenance"]["cell"] == settings["cell"]
    assert res["provenance"]["settings"] == settings
    # the training split's statistics are private: named, never hashed in a published file
    assert set(res["provenance"]["inputs"]) == {str(samples)}
    assert res["provenance"]["private_inputs"] == [str(ref)]
    assert sha256_file(ref) not in out.read_text() and sha256_file(data / "train.npz") not in out.read_text()

    # two references (train, then test): one pass over the samples, both values, the first is the headline
    _write_split(data / "test.npz", _images(6, seed=10))
    ref_test = tmp_path / "fid_test.npz"
    fid.compute_reference(data, "test", ref_test, extractor="untrained", batch_size=6, device="cpu")
    both = fid.compute_fid(samples, [ref, ref_test], tmp_path / "fid_both.json", extractor="untrained",
                           num_samples=5, batch_size=5, device="cpu")
    assert both["fid"] == both["fids"]["train"] == pytest.approx(res["fid"])
    assert both["fids"]["test"] > 0 and [r["covered_by_dp"] for r in both["references"]] == [False, True]
    assert set(both["provenance"]["inputs"]) == {str(samples), str(ref_test)}
    with pytest.raises(DPDMError, match="same split"):
        fid.compute_fid(samples, [ref, ref], tmp_path / "x.json", extractor="untrained", device="cpu")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries

    with pytest.raises(DPDMError, match="holds only 6"):
        fid.compute_fid(samples, ref, tmp_path / "x.json", extractor="untrained", num_samples=7, device="cpu")

    # precision / recall and density / coverage beside FID: need the references' features
    with pytest.raises(DPDMError, match="--keep-features"):
        fid.compute_fid(samples, ref, tmp_path / "x.json", extractor="untrained", device="cpu", prdc_k=2)
    fid.compute_reference(data, "train", ref, extractor="untrained", batch_size=4, device="cpu", keep_features=5)
    fid.compute_reference(data, "test", ref_test, extractor="untrained", batch_size=4, device="cpu",
                          keep_features=100)  # more than the split: all 6
    assert fid.load_reference(ref)["features"].shape == (5, dim)
    assert fid.load_reference(ref_test)["features"].shape == (6, dim)
    pr = fid.compute_fid(samples, [ref, ref_test], tmp_path / "fid_pr.json", extractor="untrained",
                         num_samples=5, batch_size=4, device="cpu", prdc_k=2)
    from dpdm.prdc import prdc

    feats = fid.build_extractor("untrained", device="cpu")(fid.read_images(samples, "samples")[0][:5])
    for path, split in ((ref, "train"), (ref_test, "test")):
        want = prdc(fid.load_reference(path)["features"], feats, k=2)  # min(5 samples, 6 features)
        assert pr["prdc"][split] == pytest.approx(want)
    assert pr["fid"] == pytest.approx(both["fid"], rel=1e-6)  # the FID itself is unchanged
    assert {m: pr[m] for m in PRDC_METRICS} == {m: pr["prdc"]["train"][m] for m in PRDC_METRICS}


def test_refuses_mixed_extractors(tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048), n=np.array(5), split=np.array("train"),
             extractor_name=np.array(fid.INCEPTION_NAME), extractor_weights=np.array(fid.WEIGHTS_SHA256),
             image_shape=np.array([16, 16, 1]))
    samples = _write_split(tmp_path / "s.npz", _images(3))
    with pytest.raises(DPDMError, match="different feature extractors"):
        fid.compute_fid(samples, ref, tmp_path / "f.json", extractor="untrained", device="cpu")
    assert not (tmp_path / "f.json").exists()


def test_reference_without_identity_rejected(tmp_path):
    ref = tmp_path / "pytorch_fid_stats.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(DPDMError, match="extractor"):
        fid.load_reference(ref)
    with pytest.raises(DPDMError, match="fid-ref"):
        fid.load_reference(tmp_path / "missing.npz")


def test_unknown_extractor():
    with pytest.raises(DPDMError, match="unknown FID extractor"):
        fid.build_extractor("vgg", device="cpu")
