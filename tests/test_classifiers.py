"""Downstream classifiers: models, the synthetic-train / real-test protocol, DP-SGD baselines (CPU, small)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from dpdm import classifiers, privacy
from dpdm.artifacts import DPDMError, sha256_file
from dpdm.config import DEFAULTS_FILE, read_yaml
from dpdm.privacy import calibrate_sigma, spent_epsilon, steps_for


def _settings(dataset="digits", seed=0, eps=10.0, **sections):
    """Resolved cell settings built from the package defaults (like config.resolve_cell)."""
    config = read_yaml(DEFAULTS_FILE)
    s = copy.deepcopy(config["defaults"])
    s["cell"] = {"dataset": dataset, "eps": eps, "eps_tag": f"eps{eps:g}", "seed": seed}
    s["privacy"]["target_eps"] = eps
    s["device"] = "cpu"
    s["fid"] = copy.deepcopy(config["fid"])
    s["paths"] = copy.deepcopy(config["paths"])
    for key, value in sections.items():
        s[key].update(value)
    return s


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits upscaled to 16x16 uint8: an easy 10-class problem."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.kron(d.images, np.ones((2, 2))) * (255 / 16)).round().astype(np.uint8)[..., None]
    return x, d.target.astype(np.int64)


def _write(path, images, labels=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return path


@pytest.fixture
def digit_files(tmp_path, digits):
    x, y = digits
    samples = _write(tmp_path / "samples_ddim.npz", x[:1000], y[:1000])
    test = _write(tmp_path / "data" / "test.npz", x[1400:], y[1400:])
    _write(tmp_path / "data" / "train.npz", x[:1400], y[:1400])
    return samples, test


# ----------------------------------------------------------------------------
# Models.


@pytest.mark.parametrize("name", classifiers.CLASSIFIERS)
@pytest.mark.parametrize("resolution,channels", [(28, 1), (16, 1), (32, 3)])
def test_model_shapes(name, resolution, channels):
    from opacus.validators import ModuleValidator

    model = classifiers.build_classifier(name, resolution, channels, 10)
    out = model(torch.zeros(3, channels, resolution, resolution))
    assert out.shape == (3, 10)
    assert ModuleValidator.validate(model, strict=False) == []  # DP-SGD compatible: no BatchNorm
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_architectures_match_the_paper():
    nn = torch.nn
    logreg = classifiers.build_classifier("logreg", 28, 1, 10)
    assert [type(m) for m in logreg] == [nn.Flatten, nn.Linear] and logreg[1].in_features == 784
    mlp = classifiers.build_classifier("mlp", 28, 1, 10)
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [100, 10]
    cnn = classifiers.build_classifier("cnn", 28, 1, 10)
    convs = [m for m in cnn if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128] and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in cnn) == 3
    assert [m.p for m in cnn if isinstance(m, nn.Dropout)] == [0.5] * 4
    dense = [m for m in cnn if isinstance(m, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(1152, 128), (128, 10)]  # 28 -> 3x3x128


def test_wide_resnets_have_the_published_sizes():
    """Issue 17: WRN-16-4 and WRN-28-10 (Zagoruyko & Komodakis 2016 report 2.7M and 36.5M
    parameters on CIFAR-10), with GroupNorm in place of BatchNorm."""
    for name, millions, blocks in (("wrn-16-4", 2.75, 6), ("wrn-28-10", 36.48, 12)):
        model = classifiers.build_classifier(name, 32, 3, 10)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
        assert sum(isinstance(m, classifiers.WideBlock) for m in model.modules()) == blocks
        assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    with pytest.raises(DPDMError, match="6n \\+ 4"):
        classifiers.WRN(32, 3, 10, depth=20)


def test_build_errors():
    with pytest.raises(DPDMError, match="unknown classifier"):
        classifiers.build_classifier("resnet", 28, 1, 10)
    with pytest.raises(DPDMError, match="at least 8x8"):
        classifiers.build_classifier("cnn", 4, 1, 10)
    with pytest.raises(DPDMError, match="at least 2 classes"):
        classifiers.build_classifier("mlp", 28, 1, 0)


# ----------------------------------------------------------------------------
# The protocol.


def test_stratified_split_sizes():
    labels = np.repeat(np.arange(10), 100)
    tr, va, stratified = classifiers._stratified_split(labels, 0.1, seed=0)
    assert stratified and len(tr) == 900 and len(va) == 100
    assert np.bincount(labels[va]).tolist() == [10] * 10
    assert len(np.intersect1d(tr, va)) == 0 and len(np.union1d(tr, va)) == 1000
    assert not np.array_equal(np.sort(tr)[:50], tr[:50])  # shuffled
    tr2, va2, _ = classifiers._stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)  # seeded
    imbalanced = np.array([0] * 800 + [1] * 200)
    _, va, _ = classifiers._stratified_split(imbalanced, 0.1, seed=1)
    assert np.bincount(imbalanced[va]).tolist() == [80, 20]
    # A class with a single sample cannot be stratified: random split, flagged.
    _, _, stratified = classifiers._stratified_split(np.array([0] * 30 + [1]), 0.1, seed=0)
    assert not stratified


def test_protocol_learns_easy_data(tmp_path, digit_files):
    samples, test = digit_files
    settings = _settings(classify={"epochs": 30})
    out = tmp_path / "classify_ddim_mlp.json"
    res = classifiers.classify(settings, samples, test, "mlp", out)
    assert res["test_acc"] > 0.85
    saved = json.loads(out.read_text())
    assert saved["test_acc"] == res["test_acc"]
    for key in ("classifier", "test_acc", "chosen_epoch", "val_acc", "test_acc_last", "selection", "num_classes",
                "image_shape", "sizes", "split", "seed", "hyperparameters", "curves", "timing", "provenance"):
        assert key in saved, key
    assert saved["sizes"] == {"synthetic": 1000, "train": 900, "val": 100, "test": len(np.load(test)["labels"])}
    assert saved["split"]["stratified"] is True and saved["seed"] == 0
    assert saved["hyperparameters"]["lr"] == 3e-4 and saved["hyperparameters"]["batch_size"] == 128
    assert saved["image_shape"] == [16, 16, 1] and saved["num_classes"] == 10
    for curve in ("epoch", "train_loss", "train_acc", "val_acc", "test_acc", "epoch_s"):
        assert len(saved["curves"][curve]) == 30
    assert saved["curves"]["train_loss"][-1] < saved["curves"]["train_loss"][0]
    assert saved["chosen_epoch"] == 1 + int(np.argmax(saved["curves"]["val_acc"]))
    assert saved["provenance"]["cell"] == settings["cell"]
    assert saved["provenance"]["inputs"] == {str(samples): sha256_file(samples), str(test): sha256_file(test)}
    # Deterministic for a seed.
    again = classifiers.classify(settings, samples, test, "mlp", tmp_path / "again.json")
    assert again["curves"]["val_acc"] == res["curves"]["val_acc"]


def test_cnn_and_logreg_run(tmp_path, digit_files):
    samples, test = digit_files
    settings = _settings(classify={"epochs": 2})
    for name in ("logreg", "cnn"):
        res = classifiers.classify(settings, samples, test, name, tmp_path / f"{name}.json")
        assert 0 <= res["test_acc"] <= 1 and res["chosen_epoch"] in (1, 2)


def test_chosen_epoch_is_best_validation_not_test(tmp_path, digit_files, monkeypatch):
    samples, test = digit_files
    val = iter([0.50, 0.90, 0.70, 0.90, 0.60])  # best: epoch 2 (ties -> earliest)
    tst = iter([0.95, 0.60, 0.99, 0.97, 0.98])  # best on test would be epoch 3
    monkeypatch.setattr(classifiers, "_accuracy", lambda model, x, y, split="", **k: next(
        {"val": val, "test": tst}[split]))
    res = classifiers.classify(_settings(classify={"epochs": 5}), samples, test, "logreg", tmp_path / "c.json")
    assert res["chosen_epoch"] == 2 and res["val_acc"] == 0.90
    assert res["test_acc"] == 0.60 and res["test_acc_last"] == 0.98
    assert res["curves"]["test_acc"] == [0.95, 0.60, 0.99, 0.97, 0.98]


def test_unconditional_refused(tmp_path, digits):
    x, y = digits
    test = _write(tmp_path / "data" / "test.npz", x[:50], y[:50])
    no_labels = _write(tmp_path / "a.npz", x[:50])
    minus_one = _write(tmp_path / "b.npz", x[:50], -np.ones(50, np.int64))
    for samples in (no_labels, minus_one):
        with pytest.raises(DPDMError, match="unconditional"):
            classifiers.classify(_settings(), samples, test, "logreg", tmp_path / "x.json")
    labelled = _write(tmp_path / "c.npz", x[:50], y[:50])
    with pytest.raises(DPDMError, match="unconditional"):  # celeba32: num_classes = 0 in the registry
        classifiers.classify(_settings(dataset="celeba32"), labelled, test, "logreg", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_shape_mismatch_refused(tmp_path, digits):
    x, y = digits
    test = _write(tmp_path / "test.npz", x[:20], y[:20])
    samples = _write(tmp_path / "s.npz", np.zeros((20, 28, 28, 1), np.uint8), y[:20])
    with pytest.raises(DPDMError, match="real test images"):
        classifiers.classify(_settings(), samples, test, "logreg", tmp_path / "x.json")


def test_cli_classify(tmp_path, digit_files):
    from dpdm.cli import main

    samples, test = digit_files
    settings = _settings(classify={"epochs": 1})
    out = tmp_path / "cli.json"
    rc = main(["classify", "--settings", json.dumps(settings), "--samples", str(samples), "--test", str(test),
               "--classifier", "logreg", "--out", str(out)])
    assert rc == 0 and json.loads(out.read_text())["classifier"] == "logreg"


# ----------------------------------------------------------------------------
# DP-SGD baselines.


def test_dp_baseline_ledger(tmp_path, digit_files):
    data = tmp_path / "data"
    settings = _settings(baseline={"epochs": 2, "batch_size": 70, "lr": 1e-3, "clip": 1.0},
                         privacy={"delta": 1e-4})
    out = tmp_path / "baseline" / "logreg.json"
    res = classifiers.dp_baseline(settings, data, "logreg", out)
    saved = json.loads(out.read_text())
    led = saved["privacy"]
    n = 1400
    q = 70 / n
    steps = steps_for(2, q)
    assert led["num_examples"] == n and led["sample_rate"] == pytest.approx(q)
    assert led["planned_steps"] == steps and led["steps"] == steps and led["history"] == [[led["noise_multiplier"], q, steps]]
    assert led["noise_multiplier"] == pytest.approx(calibrate_sigma(10.0, 1e-4, q, steps, "rdp"), rel=1e-12)
    assert led["clip"] == 1.0 and led["delta"] == 1e-4 and led["target_eps"] == 10.0 and led["noise_multiplicity"] == 1
    assert 0 < led["eps_rdp"] <= 10.0 and led["within_target"]
    assert led["eps_rdp"] == pytest.approx(spent_epsilon(led["noise_multiplier"], q, steps, 1e-4, "rdp"))
    assert led["eps_prv"] is not None and 0 < led["eps_prv"] <= led["eps_rdp"] * 1.01
    # no fingerprint of the private training split in the published file; losses and hashes kept private
    assert sha256_file(data / "train.npz") not in out.read_text() and "train_loss" not in out.read_text()
    private = json.loads((out.parent / "private" / "logreg.json").read_text())
    assert private["train_npz_sha256"] == sha256_file(data / "train.npz")
    assert len(private["curves"]["train_loss"]) == 2 and any("training losses" in c for c in led["not_covered"])
    assert led["accountants"]["rdp"]["version"] and "last epoch" in led["model_selection"]
    assert led["dp_randomness"].startswith("secret")
    assert saved["selection"].startswith("last epoch") and saved["chosen_epoch"] == 2
    assert saved["test_acc"] == saved["curves"]["test_acc"][-1] == res["test_acc"]
    assert saved["curves"]["step"] == [steps_for(1, q), steps]
    assert saved["provenance"]["cell"] == settings["cell"]
    assert saved["test_acc"] > 0.3  # learns something even with noise


def test_baseline_dropout_masks_are_per_example_so_one_example_moves_the_clipped_sum_by_at_most_c(digits):
    """The DP-SGD baseline's CNN draws its dropout masks per example from the secret
    per-example generators (key, step, index): adding x* to a batch, even at its front,
    leaves every other example's masks and outputs unchanged, and Opacus' clipped sum
    moves by at most C (with masks drawn by position from one stream it moved by more)."""
    x, y = digits
    images, labels = torch.from_numpy(x[:41]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y[:41])
    clip, star, others = 1e-3, 40, torch.tensor([1, 4, 9, 15, 22, 30, 31])

    def clipped_sum(idx):
        torch.manual_seed(0)
        model = classifiers.build_classifier("cnn", 16, 1, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt, _, key = classifiers.make_private(model, opt, images, labels, 0.5, 0.0, clip, 5, "cpu")
        model.train()
        classifiers.private_backward(model, images[idx], labels[idx], idx, key, 3, "cpu")
        opt.clip_and_accumulate()
        classifiers.use_example_generators(model, privacy.example_generators(key, 3, idx.tolist()))
        out = model(classifiers._scale(images[idx]))  # the same masks again: outputs per example
        return torch.cat([p.summed_grad.reshape(-1) for p in model.parameters()]), out.detach()

    with_x, out_with = clipped_sum(torch.cat([torch.tensor([star]), others]))
    without, out_without = clipped_sum(others)
    assert torch.equal(out_with[1:], out_without)  # the other examples' masks did not change
    assert 0 < float((with_x - without).norm()) <= clip * (1 + 1e-4)


def test_dp_baseline_randomness_is_secret_unless_seeded(tmp_path, digit_files, monkeypatch):
    """Poisson batches and DP noise come from OS entropy, not from the (public) cell seed:
    two runs of the same cell differ; with DPDM_DP_SEED they are identical and say so."""
    data = tmp_path / "data"
    settings = _settings(baseline={"epochs": 1, "batch_size": 70, "lr": 1e-3, "clip": 1.0}, privacy={"delta": 1e-4})

    def losses(name):
        return classifiers.dp_baseline(settings, data, "logreg", tmp_path / f"{name}.json")

    monkeypatch.delenv("DPDM_DP_SEED", raising=False)
    a, b = losses("a"), losses("b")
    assert a["private"]["curves"]["train_loss"] != b["private"]["curves"]["train_loss"]
    monkeypatch.setenv("DPDM_DP_SEED", "7")
    c, d = losses("c"), losses("d")
    assert c["private"]["curves"]["train_loss"] == d["private"]["curves"]["train_loss"]
    assert c["privacy"]["dp_randomness"].startswith("REPRODUCIBLE")


def test_dp_baseline_empty_batches_and_cnn(tmp_path, digits):
    """Tiny q: many Poisson batches are empty, and the step is still taken (noise only)."""
    x, y = digits
    data = tmp_path / "data"
    _write(data / "train.npz", x[:60], y[:60])
    _write(data / "test.npz", x[60:100], y[60:100])
    settings = _settings(baseline={"epochs": 1, "batch_size": 1, "lr": 1e-3, "clip": 1.0},
                         privacy={"delta": 1e-3})
    res = classifiers.dp_baseline(settings, data, "cnn", tmp_path / "cnn.json")
    assert res["privacy"]["steps"] == 60
    assert 0 < res["privacy"]["eps_rdp"] <= 10.0


def test_dp_baseline_refuses(tmp_path, digits):
    x, y = digits
    data = tmp_path / "data"
    _write(data / "train.npz", x[:60], np.zeros(60, np.int64))
    _write(data / "test.npz", x[60:100], np.zeros(40, np.int64))
    with pytest.raises(DPDMError, match="unconditional"):
        classifiers.dp_baseline(_settings(dataset="celeba32"), data, "mlp", tmp_path / "b.json")
    with pytest.raises(DPDMError, match="delta"):  # delta >= 1/N
        classifiers.dp_baseline(_settings(privacy={"delta": 0.1}), data, "mlp", tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists()
