"""Bad inputs, table-driven (issue: a user's first week).

Each row is one thing a user may type: the `python -m dpdm` arguments, the exit status
expected (2: bad input, said in one line; 0: an input that must be accepted), words the
message must hold, and files that must be unchanged afterwards (and outputs that must
not appear). No row may print a traceback. The commands run in-process (`dpdm.cli.main`),
so the whole table takes seconds; the workflow-level rows (Snakemake's --config and
--configfile) are at the end and run `snakemake -n`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpdm import config as cfg
from dpdm import data, layout
from dpdm.cli import main
from helpers import REPO  # tests/helpers.py

PAPER = str(REPO / "config" / "config.yaml")
SMOKE = str(REPO / "config" / "smoke.yaml")


# ----------------------------------------------------------------------------
# The files the rows point at ({w}/... in the table).


def _images(n, size=16, channels=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def _npz(path, images, labels=None):
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    np.savez(path, **arrays)
    return path


def _model(path, dataset="digits", eps=10.0):
    from dpdm.diffusion import build_precond, save_model

    settings = {"model": {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [],
                          "dropout": 0.0},
                "diffusion": {"precond": "edm"},
                "cell": {"dataset": dataset, "eps": eps, "eps_tag": cfg.eps_tag(eps), "seed": 0}}
    torch.manual_seed(0)
    p = build_precond(settings, 16, 1, 10)
    save_model(path, p, p, settings, {"resolution": 16, "channels": 1, "num_classes": 10}, step=1)


def _cell_settings(eps=10, dataset="digits", **train):
    s = cfg.resolve_cell(cfg.load_config([]), "digits", eps, 0)
    s["cell"]["dataset"] = dataset
    s["device"] = "cpu"
    s["data"]["digits_size"] = 16
    s["model"].update(channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    s["train"].update(batch_size=32, epochs=1, max_steps=2, noise_multiplicity=1, log_every=1, **train)
    s["sample"].update(num_samples=4, batch_size=4)
    s["samplers"] = {"fast": {"kind": "ddim", "steps": 2}}
    return s


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    from dpdm import fid

    root = tmp_path_factory.mktemp("bad")
    data.prepare("digits", out_dir=root / "data" / "digits", download=False, digits_size=16)
    labels = np.repeat(np.arange(10), 20)
    _npz(root / "s16.npz", _images(200), labels)
    _npz(root / "s28.npz", _images(200, size=28), labels)
    _npz(root / "srgb.npz", _images(200, channels=3), labels)
    _npz(root / "two.npz", _images(2), np.array([0, 1]))
    _npz(root / "frac.npz", _images(200), labels + 0.5)
    _npz(root / "nolabels.npz", _images(200))
    blob = (root / "s16.npz").read_bytes()
    (root / "trunc.npz").write_bytes(blob[: len(blob) // 2])
    fid.compute_reference(root / "data" / "digits", "test", root / "ref16.npz", extractor="untrained", device="cpu",
                          num_images=20)
    blob = (root / "ref16.npz").read_bytes()
    (root / "ref_trunc.npz").write_bytes(blob[: len(blob) // 2])
    with np.load(root / "ref16.npz") as z:
        np.savez(root / "ref_old.npz", **{k: z[k] for k in z.files if k != "image_shape"})
    _model(root / "model.pt")
    (root / "garbage.pt").write_bytes(b"not a torch file")
    for name, s in {"s10": _cell_settings(10), "s1": _cell_settings(1), "smnist": _cell_settings(10, "mnist"),
                    "size8": {**_cell_settings(10), "data": {"digits_size": 8}}}.items():
        (root / f"{name}.json").write_text(json.dumps(s))
    s = _cell_settings(10)
    del s["baseline"]
    (root / "nobaseline.json").write_text(json.dumps(s))
    (root / "notjson.json").write_text("{'single': quotes}")
    (root / "a_file").write_text("a file, not a folder")
    # A JSON file that is not a report manifest, and a manifest listing a broken ledger.
    (root / "misc").mkdir()
    (root / "misc" / "privacy.json").write_text("{}")
    cell = root / "r" / "digits" / "eps10" / "seed0"
    cell.mkdir(parents=True)
    (cell / "privacy.json").write_text('{"steps": ')
    entry = layout.Entry("privacy", str(cell / "privacy.json"), "digits", 10.0, 0)
    (root / "manifest.json").write_text(json.dumps({"entries": [dataclasses.asdict(entry)]}))
    entry = layout.Entry("checkpoint", str(cell / "privacy.json"), "digits", 10.0, 0)
    (root / "manifest_kind.json").write_text(json.dumps({"entries": [dataclasses.asdict(entry)]}))
    # A previous prepared set that a failed prepare must leave alone, and a corrupt raw file.
    prev = root / "prep" / "mnist"
    prev.mkdir(parents=True)
    for name in ("train.npz", "test.npz", "meta.json"):
        (prev / name).write_text(f"previous {name}")
    raw = root / "raw" / "mnist" / "raw"
    raw.mkdir(parents=True)
    for f in data.dataset_spec("mnist").raw_files:
        (raw / f.name).write_bytes(b"\x1f\x8b corrupt")
    # Configs.
    (root / "bad.yaml").write_text("experiments: [{dataset: digits, eps: [1]}\n  bad: : x\n")
    (root / "delta.yaml").write_text("experiments: [{dataset: digits, eps: [1]}]\ndefaults:\n  privacy: {delta: 1e-5}\n")
    (root / "cells_one.yaml").write_text("experiments: [{dataset: digits, eps: [1]}]\n"
                                         "datasets: {digits: {cells: {one: {}}}}\n")
    (root / "cells.yaml").write_text("experiments: [{dataset: digits, eps: [1]}]\n"
                                     "datasets: {digits: {cells: {1: {train: {lr: 0.01}}}}}\n")
    (root / "huge_eps.yaml").write_text("experiments: [{dataset: digits, eps: [1000000]}]\n")
    (root / "unknown_key.yaml").write_text("experiments: [{dataset: digits, eps: [1]}]\ntrian: {epochs: 2}\n")
    (root / "no_such_dataset.yaml").write_text("experiments: [{dataset: svhn, eps: [1]}]\n")
    return root


# ----------------------------------------------------------------------------
# The table.


@dataclasses.dataclass
class Case:
    name: str
    argv: str  # split on spaces; {w} is the fixture folder
    rc: int
    words: tuple = ()  # each must appear in stderr/stdout (case-insensitive)
    unchanged: tuple = ()  # files (relative to {w}) whose bytes must not change
    absent: tuple = ()  # outputs (relative to {w}) that must not be written


SETTINGS = "--settings {w}/s10.json"
CASES = [
    # --settings
    Case("settings: not JSON", "train --settings {w}/notjson.json --data {w}/data/digits --out {w}/o1", 2,
         ("--settings is not valid JSON",), absent=("o1/model.pt",)),
    Case("settings: JSON text with a typo", "train --settings {\"cell\": --data {w}/data/digits --out {w}/o1", 2,
         ("not valid JSON",)),
    Case("settings: missing file", "train --settings {w}/nope.json --data {w}/data/digits --out {w}/o1", 2,
         ("neither a JSON object nor an existing",)),
    Case("settings: empty object", "train --settings {} --data {w}/data/digits --out {w}/o1", 2,
         ("lacks cell", "train")),
    Case("settings: a list", "sample --settings [1] --model {w}/model.pt --sampler fast --out {w}/x.npz", 2,
         ("neither a JSON object",)),
    Case("settings: baseline without its section", "baseline --settings {w}/nobaseline.json --data {w}/data/digits "
         "--classifier cnn --out {w}/b.json", 2, ("lacks baseline",), absent=("b.json",)),
    Case("cell: neither --settings nor --dataset/--eps", "train --data {w}/data/digits --out {w}/o1", 2,
         ("give --settings, or --dataset and --eps",)),
    Case("cell: --eps without --dataset", "train --eps 1 --data {w}/data/digits --out {w}/o1", 2,
         ("--dataset and --eps",)),
    # Numbers and choices on the command line
    Case("sample --num-samples -5", f"sample {SETTINGS} --model {{w}}/model.pt --sampler fast --out {{w}}/x.npz "
         "--num-samples -5", 2, ("--num-samples", "must be >= 1"), absent=("x.npz",)),
    Case("fid --num-samples -198", "fid --samples {w}/s16.npz --ref {w}/ref16.npz --out {w}/f.json "
         "--extractor untrained --num-samples -198", 2, ("must be >= 1",), absent=("f.json",)),
    Case("fid --num-samples 0", "fid --samples {w}/s16.npz --ref {w}/ref16.npz --out {w}/f.json "
         "--extractor untrained --num-samples 0", 2, ("must be >= 1",), absent=("f.json",)),
    Case("fid --num-samples abc", "fid --samples {w}/s16.npz --ref {w}/ref16.npz --out {w}/f.json "
         "--num-samples abc", 2, ("is not an integer",)),
    Case("fid --batch-size 0", "fid --samples {w}/s16.npz --ref {w}/ref16.npz --out {w}/f.json --batch-size 0", 2,
         ("must be >= 1",)),
    Case("fid --device gpu", "fid --samples {w}/s16.npz --ref {w}/ref16.npz --out {w}/f.json "
         "--extractor untrained --device gpu", 2, ("device 'gpu'", "auto, cpu, cuda"), absent=("f.json",)),
    Case("fid-ref --num-images 1", "fid-ref --data {w}/data/digits --split test --out {w}/r.npz "
         "--extractor untrained --num-images 1", 2, ("at least 2 images",), absent=("r.npz",)),
    Case("fid-ref --split val", "fid-ref --data {w}/data/digits --split val --out {w}/r.npz", 2,
         ("invalid choice: 'val'",)),
    Case("judge-fit --epochs 0", "judge-fit --data {w}/data/digits --epochs 0 --out {w}/j.pt", 2,
         ("must be >= 1",)),
    Case("classify --classifier resnet", f"classify {SETTINGS} --samples {{w}}/s16.npz "
         "--test {w}/data/digits/test.npz --classifier resnet --out {w}/c.json", 2, ("invalid choice: 'resnet'",)),
    Case("prepare --digits-size 12", "prepare --dataset digits --out {w}/d12 --digits-size 12", 2,
         ("invalid choice: 12",)),
    # FID: broken files and mismatches
    Case("fid: truncated samples", "fid --samples {w}/trunc.npz --ref {w}/ref16.npz --out {w}/f.json "
         "--extractor untrained --device cpu", 2, ("trunc.npz", "truncated or not a readable .npz"), absent=("f.json",)),
    Case("fid: truncated reference", "fid --samples {w}/s16.npz --ref {w}/ref_trunc.npz --out {w}/f.json "
         "--extractor untrained --device cpu", 2, ("ref_trunc.npz", "truncated"), absent=("f.json",)),
    Case("fid: missing reference", "fid --samples {w}/s16.npz --ref {w}/nope.npz --out {w}/f.json "
         "--extractor untrained --device cpu", 2, ("do not exist", "fid-ref")),
    Case("fid: reference without its image shape", "fid --samples {w}/s16.npz --ref {w}/ref_old.npz "
         "--out {w}/f.json --extractor untrained --device cpu", 2, ("lacks 'image_shape'", "fid-ref"),
         absent=("f.json",)),
    Case("fid --prdc-k without the reference's features", "fid --samples {w}/s16.npz --ref {w}/ref16.npz "
         "--out {w}/f.json --extractor untrained --device cpu --prdc-k 3", 2, ("--keep-features",),
         absent=("f.json",)),
    # The privacy audit (issue 16)
    Case("audit: more canaries than training examples", f"audit {SETTINGS} --data {{w}}/data/digits "
         "--out {w}/a.json --canaries 5000", 2, ("exceeds the", "training examples"), absent=("a.json",)),
    Case("audit: k+ of half the canaries", f"audit {SETTINGS} --data {{w}}/data/digits --out {{w}}/a.json "
         "--canaries 100 --k-pos 50", 2, ("k_pos = 50", "< m/2"), absent=("a.json",)),
    Case("audit: an unknown way to break it", f"audit {SETTINGS} --data {{w}}/data/digits --out {{w}}/a.json "
         "--test-only-break half-noise", 2, ("no-clip", "no-noise"), absent=("a.json",)),
    Case("audit: a broken mechanism fails the audit", f"audit --config {SMOKE} --dataset digits --eps 1 "
         "--data {w}/data/digits --out {w}/a.json --test-only-break no-noise --audit-seed 0", 2,
         ("privacy audit FAILED", "above the accountant's", "broken on purpose")),
    Case("fid: 28x28 samples vs a 16x16 reference", "fid --samples {w}/s28.npz --ref {w}/ref16.npz "
         "--out {w}/f.json --extractor untrained --device cpu", 2, ("28x28 grayscale", "16x16 grayscale"),
         absent=("f.json",)),
    Case("fid: RGB samples vs a grayscale reference", "fid --samples {w}/srgb.npz --ref {w}/ref16.npz "
         "--out {w}/f.json --extractor untrained --device cpu", 2, ("16x16 RGB", "16x16 grayscale"),
         absent=("f.json",)),
    Case("fid: more samples asked than held", "fid --samples {w}/s16.npz --ref {w}/ref16.npz --out {w}/f.json "
         "--extractor untrained --device cpu --num-samples 500", 2, ("holds only 200",), absent=("f.json",)),
    Case("fid: Inception weights that are not there", "fid --samples {w}/s16.npz --ref {w}/ref16.npz "
         "--out {w}/f.json --weights {w}/nope.pth --device cpu", 2, ("nope.pth",), absent=("f.json",)),
    # Sampling: the wrong model
    Case("sample: another dataset's model", "sample --settings {w}/smnist.json --model {w}/model.pt "
         "--sampler fast --out {w}/x.npz", 2, ("another cell", "'digits'", "'mnist'"), absent=("x.npz",)),
    Case("sample: another eps's model", "sample --settings {w}/s1.json --model {w}/model.pt --sampler fast "
         "--out {w}/x.npz", 2, ("another cell", "eps 10.0", "eps 1.0"), absent=("x.npz",)),
    Case("sample: missing model", f"sample {SETTINGS} --model {{w}}/nope.pt --sampler fast --out {{w}}/x.npz", 2,
         ("does not exist", "train the cell first")),
    Case("sample: not a model file", f"sample {SETTINGS} --model {{w}}/garbage.pt --sampler fast "
         "--out {w}/x.npz", 2, ("cannot be read",), unchanged=("garbage.pt",), absent=("x.npz",)),
    Case("sample: unknown sampler", f"sample {SETTINGS} --model {{w}}/model.pt --sampler ddpm --out {{w}}/x.npz",
         2, ("unknown sampler 'ddpm'", "fast")),
    # Training: the wrong data, an unwritable place
    Case("train: digits_size differs from the prepared data", "train --settings {w}/size8.json "
         "--data {w}/data/digits --out {w}/o2", 2, ("digits_size 8", "16x16", "--digits-size 8"),
         unchanged=("data/digits/meta.json",), absent=("o2/model.pt", "o2/checkpoints/checkpoint.pt")),
    Case("train: another dataset's data", "train --settings {w}/smnist.json --data {w}/data/digits --out {w}/o3",
         2, ("'digits' data", "'mnist'"), absent=("o3/model.pt",)),
    Case("train: data not prepared", f"train {SETTINGS} --data {{w}}/nowhere --out {{w}}/o4", 2,
         ("nowhere",), absent=("o4/model.pt",)),
    Case("train: output under a file", f"train {SETTINGS} --data {{w}}/data/digits --out {{w}}/a_file/cell", 2,
         ("cannot write the cell folder", "a_file"), unchanged=("a_file",)),
    Case("train: checkpoints under a file", f"train {SETTINGS} --data {{w}}/data/digits --out {{w}}/o5 "
         "--checkpoint-dir {w}/a_file/ck", 2, ("cannot write the checkpoint folder",), absent=("o5/model.pt",)),
    # Classifiers on samples
    Case("classify: fractional labels", f"classify {SETTINGS} --samples {{w}}/frac.npz "
         "--test {w}/data/digits/test.npz --classifier logreg --out {w}/c.json", 2,
         ("whole class numbers", "0.5"), absent=("c.json",)),
    Case("classify: two images", f"classify {SETTINGS} --samples {{w}}/two.npz --test {{w}}/data/digits/test.npz "
         "--classifier logreg --out {w}/c.json", 2, ("hold 2 images", "at least 10 per class"), absent=("c.json",)),
    Case("classify: samples without labels", f"classify {SETTINGS} --samples {{w}}/nolabels.npz "
         "--test {w}/data/digits/test.npz --classifier logreg --out {w}/c.json", 2, ("unconditional",),
         absent=("c.json",)),
    Case("classify: 28x28 samples, 16x16 test set", f"classify {SETTINGS} --samples {{w}}/s28.npz "
         "--test {w}/data/digits/test.npz --classifier logreg --out {w}/c.json", 2, ("real test images",),
         absent=("c.json",)),
    Case("classify: truncated samples", f"classify {SETTINGS} --samples {{w}}/trunc.npz "
         "--test {w}/data/digits/test.npz --classifier logreg --out {w}/c.json", 2, ("not a readable .npz",)),
    Case("judge: missing judge", f"judge {SETTINGS} --judge {{w}}/nope.pt --samples {{w}}/s16.npz "
         "--out {w}/j.json", 2, ("nope.pt",), absent=("j.json",)),
    # The report
    Case("report: a manifest that is not one", "report --out {w}/rep --manifest {w}/misc/privacy.json", 2,
         ("misc/privacy.json", "is not a report manifest", "report_manifest"), absent=("rep/tables/privacy.csv",)),
    Case("report: a broken ledger", "report --out {w}/rep --manifest {w}/manifest.json", 2,
         ("privacy.json", "not a readable JSON file")),
    Case("report: an unknown kind of result", "report --out {w}/rep --manifest {w}/manifest_kind.json", 2,
         ("kind 'checkpoint'",)),
    Case("report: no manifest", "report --out {w}/rep", 2, ("the following arguments are required: --manifest",)),
    Case("report-ablation: bad manifest", "report-ablation --out {w}/rep --manifest {\"rows\":", 2,
         ("--manifest is not valid JSON",)),
    # Preparing data
    Case("prepare: unknown dataset", "prepare --dataset svhn --out {w}/svhn --no-download", 2,
         ("svhn", "mnist")),
    Case("prepare: corrupt raw files leave the previous set intact",
         "prepare --dataset mnist --out {w}/prep/mnist --raw-dir {w}/raw --no-download", 2, ("checksum",),
         unchanged=("prep/mnist/train.npz", "prep/mnist/test.npz", "prep/mnist/meta.json")),
    Case("prepare: missing raw files, no download", "prepare --dataset fashion_mnist --out {w}/prep/fm "
         "--raw-dir {w}/empty --no-download", 2, ("DPDM_RAW_DIR", "--no-download"), absent=("prep/fm/meta.json",)),
    # Configs (check-config reads them as the workflow does)
    Case("config: YAML syntax error names the file and line", "check-config {w}/bad.yaml", 2,
         ("bad.yaml", "line 1", "not valid YAML")),
    Case("config: 1e-5 is a number", "check-config {w}/delta.yaml", 0, ("valid", "1 models to train")),
    Case("config: a cell keyed by a word", "check-config {w}/cells_one.yaml", 2,
         ("datasets.digits.cells.one", "keyed by its eps")),
    Case("config: eps 1e6", "check-config {w}/huge_eps.yaml", 2, ("experiments.0.eps.0",)),
    Case("config: a misspelt key", "check-config {w}/unknown_key.yaml", 2, ("'trian' is unknown",)),
    Case("config: unknown dataset", "check-config {w}/no_such_dataset.yaml", 2, ("svhn",)),
    Case("config: missing file", "check-config {w}/nope.yaml", 2, ("nope.yaml does not exist",)),
    Case("config: --set that a dataset's settings hide (the --help example on smoke)",
         f"check-config {SMOKE} --set defaults.train.epochs=2", 2,
         ("cannot take effect", "datasets.digits.settings.train.epochs")),
    Case("config: --set that one dataset's settings hide", f"check-config {PAPER} --set defaults.train.batch_size=256",
         2, ("cannot take effect", "datasets.celeba32.settings.train.batch_size")),
    Case("config: --set that a cell hides", "check-config {w}/cells.yaml --set datasets.digits.settings.train.lr=0.1",
         2, ("cannot take effect", "datasets.digits.cells.1.train.lr")),
    Case("config: --set that can take effect", f"check-config {PAPER} --set datasets.mnist.settings.train.epochs=2",
         0, ("models to train",)),
    Case("config: --set without '='", f"check-config {PAPER} --set defaults.train.epochs", 2,
         ("must look like key.sub=value",)),
    Case("config: --set with bad YAML", f"check-config {PAPER} --set seeds=[0,", 2, ("not valid YAML",)),
    Case("config: --set of a wrong type", f"check-config {PAPER} --set seeds=zero", 2, ("'seeds'",)),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _argv(case: Case, w: Path) -> list[str]:
    return [a.replace("{w}", str(w)) for a in case.argv.split(" ")]


def test_the_table_covers_at_least_45_inputs():
    assert len(CASES) >= 45 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, w, capsys):
    before = {f: _sha(w / f) for f in case.unchanged}
    try:
        rc = main(_argv(case, w))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    text = out + err
    assert rc == case.rc, text
    for word in case.words:
        assert word.lower() in text.lower(), f"{word!r} not in:\n{text}"
    assert "Traceback" not in text and "internal error" not in text, text
    if case.rc == 2:  # one line says it (argparse adds its usage above)
        msg = [line for line in err.splitlines() if "error:" in line]
        assert len(msg) == 1, err
    for f in case.unchanged:
        assert _sha(w / f) == before[f], f"{f} changed"
    for f in case.absent:
        assert not (w / f).exists(), f"{f} was written"


def test_a_bug_is_one_line_unless_verbose(monkeypatch, capsys):
    """Not bad input but a bug: exit 1, one line that says so; the traceback with -v (and
    in the workflow's logs, which set DPDM_TRACEBACK)."""
    from dpdm import config

    def broken(*a, **k):
        raise TypeError("boom")

    monkeypatch.setattr(config, "load_config", broken)
    monkeypatch.delenv("DPDM_TRACEBACK", raising=False)
    assert main(["check-config", SMOKE]) == 1
    err = capsys.readouterr().err
    assert "internal error: TypeError: boom" in err and "-v" in err and "Traceback" not in err
    assert main(["-v", "check-config", SMOKE]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("DPDM_TRACEBACK", "1")
    assert main(["check-config", SMOKE]) == 1
    assert "Traceback" in capsys.readouterr().err
