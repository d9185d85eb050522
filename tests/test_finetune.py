"""Issue 17: public pre-training (dpdm/pretrain.py) and DP fine-tuning (dpdm/finetune.py).

- digits_public / digits_private are disjoint halves of digits' train split;
- pretrain learns (its loss falls), writes model.pt with its public record, and resumes
  exactly after a stop signal;
- a fine-tuned cell starts from the public weights: with the learning rate at ~0 its
  model IS the public model; only the selected parameters change, the frozen ones are
  bit-identical; the ledger names the public model and the trained parameters;
- the clipping bound holds over the trained parameters (they alone are clipped and noised);
- bad input: a missing public model, another architecture or resolution, a subset that
  matches nothing, a subset without a public model, an unknown public name in the config.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from dpdm import config as cfg
from dpdm import data, finetune, pretrain, train
from dpdm.artifacts import DPDMError
from helpers import REPO, SMOKE_CONFIGS  # tests/helpers.py
from test_train import tiny_settings  # the tiny cell of the training tests


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    root = tmp_path_factory.mktemp("halves")
    for name in ("digits_public", "digits_private"):
        data.prepare(name, root / name, download=False, digits_size=16)
    return root


def test_the_halves_are_disjoint_and_cover_digits_train(halves, tmp_path):
    data.prepare("digits", tmp_path / "digits", download=False, digits_size=16)
    whole, _ = data.load_split(tmp_path / "digits", "train")
    pub, pub_labels = data.load_split(halves / "digits_public", "train")
    priv, priv_labels = data.load_split(halves / "digits_private", "train")
    a, b = {x.tobytes() for x in pub}, {x.tobytes() for x in priv}
    assert not a & b
    assert a | b == {x.tobytes() for x in whole}
    assert abs(len(pub) - len(priv)) <= 10
    assert set(np.unique(pub_labels)) == set(np.unique(priv_labels)) == set(range(10))  # stratified
    meta = data.load_meta(halves / "digits_private")
    assert meta["dataset"] == "digits_private" and "second of two disjoint halves" in meta["preprocessing"]["half"]
    # what the privacy checks and totals read: the halves share no example, each shares with digits
    assert data.shares_examples("digits", "digits_public") and data.shares_examples("digits_private", "digits")
    assert not data.shares_examples("digits_public", "digits_private") and not data.shares_examples("mnist", "digits")


def pretrain_settings(**over) -> dict:
    s = tiny_settings()
    pt = dict(cfg.PRETRAIN_DEFAULTS, name="pub", dataset="digits_public", epochs=4, batch_size=64, lr=2e-3,
              log_every=5, checkpoint_every=1000)
    pt.update(over)
    return {"pretrain": pt, "model": s["model"], "diffusion": s["diffusion"], "data": s["data"], "device": "cpu"}


@pytest.fixture(scope="module")
def public_model(halves, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "pub"
    record = pretrain.pretrain(pretrain_settings(), halves / "digits_public", out)
    return out, record


def test_pretraining_learns_and_records_its_public_data(public_model, halves):
    out, record = public_model
    rows = list(__import__("csv").DictReader(open(out / pretrain.METRICS_FILE)))
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses
    obj = torch.load(out / "model.pt", weights_only=True)
    assert obj["pretrain"]["dataset"] == "digits_public"
    assert obj["pretrain"]["dataset_sha256"] == data.sha256_file(halves / "digits_public" / "train.npz")
    saved = json.loads((out / pretrain.RECORD_FILE).read_text())
    assert saved["steps"] == record["steps"] == 4 * 12  # ceil(719 / 64) = 12 steps per epoch
    assert "no privacy" in saved["public"]
    assert not (out / "checkpoints").exists()


def test_pretraining_resumes_exactly_after_a_stop_signal(halves, tmp_path, monkeypatch):
    settings = pretrain_settings(epochs=1)
    ref = pretrain.pretrain(settings, halves / "digits_public", tmp_path / "ref")
    original = torch.optim.Adam.step
    calls = {"n": 0}

    def step_then_signal(self, *a, **k):
        out = original(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGUSR1)
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        pretrain.pretrain(settings, halves / "digits_public", tmp_path / "cell")
    assert e.value.code == train.EXIT_CHECKPOINTED
    assert (tmp_path / "cell" / "checkpoints" / "checkpoint.pt").exists()
    monkeypatch.setattr(torch.optim.Adam, "step", original)
    again = pretrain.pretrain(settings, halves / "digits_public", tmp_path / "cell")
    assert again["steps"] == ref["steps"]
    a, b = (torch.load(p / "model.pt", weights_only=True) for p in (tmp_path / "ref", tmp_path / "cell"))
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def _finetune_settings(**train_over) -> dict:
    s = tiny_settings(max_steps=4, **train_over)
    s["cell"]["dataset"] = "digits_private"
    s["privacy"]["delta"] = 1e-4
    s["train"]["init"] = {"pretrained": "pub"}
    return s


def _train(settings, halves, out, init):
    return train.train(settings, halves / "digits_private", out, init_path=init, dp_seed=1)


def test_finetuning_starts_from_the_public_weights(public_model, halves, tmp_path):
    """lr ~ 0: the fine-tuned model equals the public EMA weights; the ledger names them."""
    out, _ = public_model
    cell = tmp_path / "cell"
    _train(_finetune_settings(lr=1e-12), halves, cell, out / "model.pt")
    public = torch.load(out / "model.pt", weights_only=True)["ema"]
    tuned = torch.load(cell / "model.pt", weights_only=True)
    for k, v in public.items():
        torch.testing.assert_close(tuned["model"][k], v, atol=1e-8, rtol=0, msg=k)
    ledger = json.loads((cell / "privacy.json").read_text())
    assert ledger["initialisation"]["name"] == "pub" and ledger["initialisation"]["dataset"] == "digits_public"
    assert ledger["initialisation"]["model_sha256"] == data.sha256_file(out / "model.pt")
    assert ledger["initialisation"]["privacy_cost"].startswith("none")
    assert ledger["private_parameters"]["selection"] == "all" and "trained_names" not in ledger["private_parameters"]
    # a cell from scratch differs from the public model, and says so
    scratch = tmp_path / "scratch"
    s = _finetune_settings(lr=1e-12)
    del s["train"]["init"]
    _train(s, halves, scratch, None)
    w = torch.load(scratch / "model.pt", weights_only=True)["model"]
    assert not all(torch.allclose(w[k], public[k]) for k in public)
    assert json.loads((scratch / "privacy.json").read_text())["initialisation"]["kind"].startswith("random")


@pytest.mark.parametrize("subset", ["bias_norm", ["net.dec.*"]])
def test_only_the_selected_parameters_change(public_model, halves, tmp_path, subset):
    out, _ = public_model
    cell = tmp_path / "cell"
    _train(_finetune_settings(finetune=subset, lr=1e-2), halves, cell, out / "model.pt")
    public = torch.load(out / "model.pt", weights_only=True)["ema"]
    tuned = torch.load(cell / "model.pt", weights_only=True)["model"]
    chosen = finetune.select(list(public), subset)
    assert 0 < len(chosen) < len(public)
    changed = {k for k in public if not torch.equal(public[k], tuned[k])}
    assert changed and changed <= chosen, sorted(changed - chosen)[:5]
    assert len(changed) >= 0.8 * len(chosen)  # the selected ones do train
    trained = json.loads((cell / "privacy.json").read_text())["private_parameters"]
    assert trained["trained_tensors"] == len(chosen) and trained["trained_names"] == sorted(chosen)
    assert trained["trained_parameters"] == sum(public[k].numel() for k in chosen) < trained["total_parameters"]


def test_bias_norm_selects_every_bias_and_normalisation_scale_and_nothing_else():
    """Checked against the modules' types, not the names the selection reads."""
    from dpdm import diffusion, networks

    precond = diffusion.build_precond(_finetune_settings(), 28, 1, 10)
    norm_scales = {f"{m}.weight" for m, mod in precond.named_modules() if isinstance(mod, networks.GroupNorm)}
    biases = {n for n, _ in precond.named_parameters() if n.endswith(".bias")}
    assert "net.out_norm.weight" in norm_scales and len(norm_scales) > 3
    assert finetune.select([n for n, _ in precond.named_parameters()], "bias_norm") == norm_scales | biases


def test_the_clip_bounds_the_trained_parameters_only(public_model, halves):
    """With a subset frozen, the mechanism's per-example gradients cover only the trained
    parameters, and each clipped one has norm <= C over them."""
    from dpdm import diffusion, privacy

    out, _ = public_model
    s = _finetune_settings(finetune="bias_norm")
    d = train._load_training_data(s, halves / "digits_private")
    precond = diffusion.build_precond(s, d["resolution"], d["channels"], d["num_classes"])
    train._initialise(precond, s, out / "model.pt", d)
    trainable = {n for n, p in precond.named_parameters() if p.requires_grad}
    assert trainable == finetune.select([n for n, _ in precond.named_parameters()], "bias_norm")
    dp = privacy.DPSGD(diffusion.example_loss, noise_multiplier=0.0, max_grad_norm=1e-3, num_examples=d["n"],
                       sample_rate=0.05, dp_seed=0, batch_loss_fn=diffusion.batch_example_losses)
    idx = torch.arange(6)
    batch = train.private_batch(dp, precond, data.to_model_range(d["images"][:6]), torch.from_numpy(d["labels"][:6]),
                                idx, 2, 0.0)
    summed, stats = dp.clip_and_accumulate(precond, batch)
    assert stats[2] == 6  # every example clipped at C = 1e-3
    assert summed.numel() == sum(p.numel() for n, p in precond.named_parameters() if n in trainable)
    assert float(summed.norm()) <= 6 * 1e-3 * (1 + 1e-4)


def test_a_fresh_class_embedding_when_the_public_model_is_unconditional(halves, tmp_path):
    out = tmp_path / "uncond"
    pretrain.pretrain(pretrain_settings(conditional=False, max_steps=3), halves / "digits_public", out)
    assert torch.load(out / "model.pt", weights_only=True)["spec"]["num_classes"] == 0
    cell = tmp_path / "cell"
    _train(_finetune_settings(finetune="bias_norm"), halves, cell, out / "model.pt")
    ledger = json.loads((cell / "privacy.json").read_text())
    assert ledger["initialisation"]["class_embedding"].startswith("fresh")
    tuned = torch.load(cell / "model.pt", weights_only=True)["model"]
    assert tuned[finetune.CLASS_EMBEDDING].shape[0] == 11  # 10 classes + the null class, trained privately
    assert ledger["private_parameters"]["trained_tensors"] == len(
        finetune.select(list(tuned), "bias_norm") | {finetune.CLASS_EMBEDDING})


def test_bad_fine_tuning_inputs_are_clear_errors(public_model, halves, tmp_path):
    out, _ = public_model
    with pytest.raises(DPDMError, match="does not exist; run the pretrain stage"):
        _train(_finetune_settings(), halves, tmp_path / "a", tmp_path / "nope.pt")
    with pytest.raises(DPDMError, match="pass its model with --init"):
        _train(_finetune_settings(), halves, tmp_path / "b", None)
    wide = _finetune_settings()
    wide["model"]["channels"] = 16
    with pytest.raises(DPDMError, match="another model than this cell .*model.channels"):
        _train(wide, halves, tmp_path / "c", out / "model.pt")
    with pytest.raises(DPDMError, match="match no parameter"):
        _train(_finetune_settings(finetune=["*.no_such_layer.*"]), halves, tmp_path / "d", out / "model.pt")
    with pytest.raises(DPDMError, match="selects no parameter"):  # a network without attention blocks
        finetune.select(["net.enc.conv.weight", "net.enc.conv.bias"], "attention")
    with pytest.raises(DPDMError, match="unknown subset 'heads'"):
        _train(_finetune_settings(finetune="heads"), halves, tmp_path / "e", out / "model.pt")
    s = _finetune_settings(finetune="bias_norm")
    del s["train"]["init"]
    with pytest.raises(DPDMError, match="train.init.pretrained is not set"):
        _train(s, halves, tmp_path / "f", None)
    # another resolution: the public model at 16x16, the private data at 8x8
    data.prepare("digits_private", tmp_path / "p8", download=False, digits_size=8)
    s8 = _finetune_settings()
    s8["data"]["digits_size"] = 8
    with pytest.raises(DPDMError, match="resolution 16, this cell's data has 8"):
        train.train(s8, tmp_path / "p8", tmp_path / "g", init_path=out / "model.pt", dp_seed=1)
    # a DP cell's model is not a public initialisation
    _train(_finetune_settings(), halves, tmp_path / "dp", out / "model.pt")
    with pytest.raises(DPDMError, match="not a model written by `python -m dpdm pretrain`"):
        _train(_finetune_settings(), halves, tmp_path / "h", tmp_path / "dp" / "model.pt")
    for d in "abcdefgh":
        assert not (tmp_path / d / "model.pt").exists()


def test_the_config_names_known_public_models():
    config = cfg.load_config([REPO / c for c in SMOKE_CONFIGS])
    config = cfg.deep_merge(config, {"datasets": {"digits": {"settings": {"train": {"init": {"pretrained": "x"}}}}}})
    with pytest.raises(DPDMError, match=r"datasets.digits.settings.train.init.pretrained': no public model named 'x'"):
        cfg.validate(config)
    with pytest.raises(DPDMError, match="no public model named 'x'"):
        cfg.pretrain_settings(config, "x")


def test_a_cell_cannot_fine_tune_a_model_pre_trained_on_its_own_examples(public_model, halves, tmp_path):
    """The plan refuses it (both for a main cell and an ablation's variant), and so does the
    training itself, from the dataset the public model records; the plan also refuses a
    public model of another architecture or image size."""
    smoke = cfg.load_config([REPO / c for c in SMOKE_CONFIGS])
    assert cfg.public_models(smoke, cfg.plan_grid(smoke)) == {"digits_public": "digits_public"}
    # digits holds digits_public's examples
    main = cfg.deep_merge(smoke, {"datasets": {"digits": {"settings": {"train": {"init": {
        "pretrained": "digits_public"}}}}}})
    with pytest.raises(DPDMError, match=r"config key 'datasets.digits': cell digits/eps1 fine-tunes the public model "
                                        r"'digits_public', pre-trained WITHOUT privacy on digits_public, which holds "
                                        r"examples of the cell's own private data \(digits\)"):
        cfg.plan_grid(main)
    own = cfg.deep_merge(smoke, {"pretrain": {"digits_public": {"dataset": "digits_private"}}})
    with pytest.raises(DPDMError, match=r"ablations.finetune'.variants.public: .*on digits_private"):
        cfg.plan_grid(own)
    # an architecture or image size the cells cannot load: refused before the pre-training runs
    wide = cfg.deep_merge(smoke, {"pretrain": {"digits_public": {"settings": {"model": {"channels": 99}}}}})
    with pytest.raises(DPDMError, match=r"variants.public: cell digits_private/eps10 fine-tunes the public model "
                                        r"'digits_public', whose settings differ from the cell's in model.channels"):
        cfg.plan_grid(wide)
    cfg.plan_grid(cfg.deep_merge(smoke, {"pretrain": {"digits_public": {"settings": {"model": {"dropout": 0.1}}}}}))
    big = cfg.deep_merge(smoke, {"pretrain": {"digits_public": {"settings": {"data": {"digits_size": 16}}}}})
    with pytest.raises(DPDMError, match=r"pre-trained on digits_public images of \(resolution, channels\) \(16, 1\), "
                                        r"but the cell's are \(8, 1\)"):
        cfg.plan_grid(big)
    s = _finetune_settings()
    path = public_model[0] / "model.pt"
    spec = torch.load(path, weights_only=True)["spec"]
    assert finetune.load_pretrained(path, s, spec)[1]["dataset"] == "digits_public"  # digits_private: disjoint
    s["cell"]["dataset"] = "digits"  # the public model of the fixture saw digits_public
    with pytest.raises(DPDMError, match="pre-trained without privacy on digits_public, which holds examples of this "
                                        r"cell's private data \(digits\)"):
        finetune.load_pretrained(path, s, spec)
