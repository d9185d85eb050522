"""The Snakemake workflow: the paper grid as a dry run, lint, config validation, the
smoke pipeline end to end, single-cell reruns and code-change reruns.

The smoke run works on a copy of the workflow in a temporary folder so it never
touches the repository's results/ and can run beside other tests.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from dpdm.artifacts import sha256_file
from helpers import REPO, SMOKE_CONFIGS  # tests/helpers.py

SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# Jobs of the full paper grid (config/config.yaml). Main grid: 8 cells (MNIST,
# Fashion-MNIST at eps 0.2/1/10; CelebA at 1/10), 2 samplers per class-conditional cell
# and 1 for CelebA, 3 classifiers each, DP-SGD baselines for the class-conditional cells.
# Ablations (MNIST): K in {1,2,4,8,16,32} at eps 1 (K32 is the main cell: 5 new models),
# VP/VE/v/EDM at eps 0.2 (v is the main cell: 3 new), 4 samplers at eps 0.2/1/10 on the
# main cells (churn-fid and ddim are the main cells' fid and acc: 2 new samplers each,
# one of them, sddim, shared with the K and parameterisation ablations).
# FID references: train and test split of each dataset. The judge (a CNN trained on the
# real training split) labels every class-conditional sample set (all but CelebA's 2).
ABLATION_MODELS = 5 + 3
SAMPLE_SETS = 6 * 2 + 2 + ABLATION_MODELS + 3 * 2
PAPER_JOBS = {
    "prepare": 3,
    "fid_reference": 3 * 2,
    "train": 8 + ABLATION_MODELS,
    "sample": SAMPLE_SETS,
    "fid": SAMPLE_SETS,
    "classify": 6 * 2 * 3 + ABLATION_MODELS * 1 + 3 * 2 * 3,
    "train_judge": 2,
    "judge": SAMPLE_SETS - 2,
    "baseline": 6 * 3,
    "report_manifest": 1,
    "report": 1,
    "ablation": 3,  # tables 3, 5, 6
    "memorisation": SAMPLE_SETS,
    "audit_cell": 2,  # MNIST at eps 1 and 10
    "audit_report": 1,
    "all": 1,
}


@functools.cache
def _no_slurm_bin() -> str:
    """A folder holding an `scontrol` that fails at once. snakemake-executor-plugin-slurm
    runs `scontrol show config` whenever Snakemake starts (it imports every plugin), and
    that waits 9 s where scontrol is installed but no controller runs (CI, after
    test_slurm.py stops its cluster). These tests never talk to SLURM."""
    folder = Path(tempfile.mkdtemp(prefix="dpdm-no-slurm-"))
    stub = folder / "scontrol"
    stub.write_text("#!/bin/sh\necho 'no SLURM controller in tests/test_workflow.py' >&2\nexit 1\n")
    stub.chmod(0o755)
    return str(folder)


def run_snakemake(args, cwd, env=None, timeout=1800, check=True):
    e = dict(os.environ, **(env or {}))
    e.pop("DPDM_FID_WEIGHTS", None)
    e["PATH"] = _no_slurm_bin() + os.pathsep + e.get("PATH", "")
    p = subprocess.run(SNAKEMAKE + args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}")
    return p


def job_counts(output: str) -> dict[str, int]:
    """Parse the 'Job stats' table that snakemake prints."""
    counts = {}
    m = re.search(r"Job stats:\s*\n\s*job\s+count\s*\n[-\s]+\n(.*?)\n\s*total\s+(\d+)", output, re.S)
    assert m, f"no job stats in snakemake output:\n{output[-3000:]}"
    for line in m.group(1).strip().splitlines():
        name, n = line.split()
        counts[name] = int(n)
    return counts


def copy_workflow(dest: Path) -> Path:
    for name in ("Snakefile", "rules", "workflow", "config", "dpdm", "environment.yml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "slurm").symlink_to("workflow/profiles/slurm")
    return dest


@pytest.fixture(scope="module")
def dry_workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("dry"))


def test_paper_grid_dry_run_with_slurm_profile(dry_workdir):
    t0 = time.time()
    p = run_snakemake(["-n", "--profile", "slurm", "all", "--quiet", "rules"], cwd=dry_workdir)
    elapsed = time.time() - t0
    counts = job_counts(p.stdout + p.stderr)
    expected = dict(PAPER_JOBS, fetch_fid_weights=1)
    assert counts == expected
    assert elapsed < 60, f"dry run of the paper grid took {elapsed:.1f} s"


def test_each_ablation_is_a_target_that_trains_only_its_own_models(dry_workdir):
    """`snakemake results/tables/table3.tex` builds that ablation's table (noise
    multiplicity); shared cells are the main models. `ablations` builds every one."""
    p = run_snakemake(["-n", "--profile", "slurm", "results/tables/table3.tex", "--quiet", "rules"],
                      cwd=dry_workdir)
    counts = job_counts(p.stdout + p.stderr)
    # K1..K32 at eps 1: 6 models (K32 = the main cell), one sampler, FID and CNN each.
    assert counts["train"] == 6 and counts["sample"] == 6 and counts["fid"] == 6 and counts["classify"] == 6
    assert counts["ablation"] == 1 and "report" not in counts and "baseline" not in counts
    p = run_snakemake(["-n", "--profile", "slurm", "ablations", "--quiet", "rules"], cwd=dry_workdir)
    assert job_counts(p.stdout + p.stderr)["ablation"] == 3
    p = run_snakemake(["-n", "all"], cwd=dry_workdir)  # every job, with its outputs
    trained = re.findall(r"^\s+output: (\S+/model\.pt)", p.stdout + p.stderr, re.M)
    assert len(trained) == len(set(trained)) == PAPER_JOBS["train"]
    assert "results/mnist/eps1/seed0/model.pt" in trained and "results/mnist/eps1/K8/seed0/model.pt" in trained
    assert not any("/K32/" in t or "/eps0.2/v/" in t for t in trained)


# config/finetune.yaml (issue 17): one public model, CIFAR-10 at eps 1, 5, 10 and Camelyon17
# at eps 10, each fine-tuned and from scratch (the ablation tables' "scratch" rows).
FINETUNE_JOBS = {"fetch_fid_weights": 1, "prepare": 3, "report_manifest": 1, "fid_reference": 4, "pretrain": 1,
                 "train": 8, "sample": 8, "classify": 8, "fid": 8, "memorisation": 8, "ablation": 2, "report": 1,
                 "all": 1}


def test_the_finetuning_grid_dry_runs_through_the_slurm_profile(dry_workdir):
    """prepare imagenet32, cifar10, camelyon17; pre-train once (a GPU job); 4 fine-tuned
    cells start from it (`--init`), 4 scratch cells do not; WRN classifiers."""
    args = ["-n", "-p", "--profile", "slurm", "all", "--configfile", "config/finetune.yaml"]
    p = run_snakemake(args, cwd=dry_workdir)
    out = p.stdout + p.stderr
    assert job_counts(out) == FINETUNE_JOBS
    trains = re.findall(r"exec python -m dpdm train .*? --out (\S+)\s+(--init \S+\s+)?--procs-per-node", out)
    assert len(trains) == 8
    for cell, init in trains:
        assert bool(init) == ("/scratch/" not in cell), (cell, init)
        assert not init or init.split()[1] == "results/pretrain/imagenet32/model.pt"
    pretrain = re.search(r"rule pretrain:.*?resources: ([^\n]*)", out, re.S).group(1)
    assert "gpu=1" in pretrain and "slurm_partition=gpu" in pretrain
    assert "--classifier wrn-28-10" in out and "--classifier wrn-16-4" in out
    # the laptop overlay (digits -> MNIST): its table needs the preset's 2 MNIST cells,
    # the public model and 2 fine-tuned cells
    p = run_snakemake(["-n", "results/laptop/tables/finetune_mnist.csv", "--configfile", "config/laptop.yaml",
                       "config/laptop-finetune.yaml", "--quiet", "rules"], cwd=dry_workdir)
    assert job_counts(p.stdout + p.stderr) == {"prepare": 2, "pretrain": 1, "train": 4, "sample": 4, "classify": 4,
                                               "ablation": 1}


def test_lint_is_clean(dry_workdir):
    p = run_snakemake(["--lint"], cwd=dry_workdir, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_workflow_files_are_formatted_with_snakefmt():
    snakefmt = shutil.which("snakefmt") or str(Path(sys.executable).with_name("snakefmt"))
    p = subprocess.run([snakefmt, "--check", "Snakefile", "rules"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, f"run `snakefmt Snakefile rules`:\n{p.stdout}{p.stderr}"


def test_a_user_config_runs_exactly_its_own_cells(dry_workdir):
    """--configfile replaces the paper's config/config.yaml: no inherited MNIST ablations
    or dataset settings; listing the paper first builds on it."""
    mine = dry_workdir / "mine.yaml"
    mine.write_text("experiments:\n  - {dataset: mnist, eps: [10]}\nfid: {enabled: false}\n")
    p = run_snakemake(["-n", "all", "--configfile", "mine.yaml", "--quiet", "rules"], cwd=dry_workdir)
    counts = job_counts(p.stdout + p.stderr)
    assert counts["train"] == 1 and "ablation" not in counts, counts
    p = run_snakemake(["-n", "all", "--configfile", "config/config.yaml", "mine.yaml", "--quiet", "rules"],
                      cwd=dry_workdir)
    counts = job_counts(p.stdout + p.stderr)
    assert counts["train"] > 1 and counts["ablation"] == 3, counts


@pytest.mark.parametrize(
    "override, key",
    [
        (["defaults={'train': {'lr': -1}}"], "defaults.train.lr"),
        (["bogus=1"], "bogus"),
        (["fid={'extractor': 'resnet'}"], "fid.extractor"),
    ],
)
def test_bad_config_stops_the_workflow_naming_the_key(dry_workdir, override, key):
    p = run_snakemake(["-n", "all", "--config", *override], cwd=dry_workdir, check=False)
    assert p.returncode != 0
    assert f"'{key}'" in p.stdout + p.stderr


def test_overrides_are_read_as_users_write_them(dry_workdir):
    """--config values arrive as strings from Snakemake; YAML 1e-5 is a number; the dry
    run says in one line what will be trained."""
    (dry_workdir / "delta.yaml").write_text("experiments: [{dataset: digits, eps: [1]}]\n"
                                            "defaults: {privacy: {delta: 1e-5}}\nfid: {enabled: false}\n")
    p = run_snakemake(["-n", "all", "--configfile", "delta.yaml", "--config", "seeds=[0,1]",
                       "fid={batch_size: 50, enabled: false}", "--quiet", "rules"], cwd=dry_workdir)
    assert job_counts(p.stdout + p.stderr)["train"] == 2  # seeds 0 and 1
    assert "dpdm: 2 models to train (2 cells of the grid + 0 ablation models) on digits" in p.stdout + p.stderr


def test_an_override_that_cannot_take_effect_stops_the_workflow(dry_workdir):
    p = run_snakemake(["-n", "all", "--configfile", "config/smoke.yaml", "--config", "defaults={train: {epochs: 2}}"],
                      cwd=dry_workdir, check=False)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "cannot take effect" in out and "'datasets.digits.settings.train.epochs'" in out


# ----------------------------------------------------------------------------
# The smoke pipeline, end to end.


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("smoke"))
    t0 = time.time()
    run_snakemake(["all", "--cores", "2", "--configfile", *SMOKE_CONFIGS], cwd=work, timeout=1800)
    return work, time.time() - t0


@pytest.mark.workflow
def test_smoke_pipeline_writes_tables_figures_and_results(smoke):
    work, elapsed = smoke
    results = work / "results" / "smoke"
    for name in ("table1", "table2", "privacy"):
        assert (results / "tables" / f"{name}.tex").is_file()
        assert (results / "tables" / f"{name}.csv").is_file()
        assert r"\toprule" in (results / "tables" / f"{name}.tex").read_text()
    # 2 K, edm at 2 eps, 2 samplers x 2 eps, scratch vs public (issue 17's miniature)
    for name, rows in (("table3", 2), ("table5", 2), ("table6", 4), ("finetune", 2)):
        assert r"\toprule" in (results / "tables" / f"{name}.tex").read_text()
        assert len(pd.read_csv(results / "tables" / f"{name}.csv")) == rows
    for name in ("fid_vs_eps", "acc_vs_eps", "samples_digits", "table3", "table5", "table6", "finetune"):
        for ext in ("pdf", "png"):
            assert (results / "figures" / f"{name}.{ext}").stat().st_size > 1000
    # Training-loss curves are private (un-noised statistics of the training data): not in
    # the default report (report.loss_curves is an explicit opt-in).
    assert not list((results / "figures").glob("loss_curves.*"))
    cell = results / "digits" / "eps10" / "seed0"
    for f in ("model.pt", "privacy.json", "private/train_metrics.csv", "samples_fid.npz", "grid_fid.png",
              "fid_fid.json", "classify_acc_cnn.json", "judge_acc.json", "logs/train.log", "benchmarks/train.tsv"):
        assert (cell / f).is_file(), f
    assert not (cell / "train_metrics.csv").exists()
    # the memorisation check: JSON beside the results (labelled), the pairs figure private
    for sampler in ("fid", "acc"):
        mem = json.loads((cell / f"memorisation_{sampler}.json").read_text())
        assert mem["covered_by_dp"] is False and "NOT covered" in mem["not_covered"]
        assert mem["num_samples"] == 1000 and mem["num_train"] == 1438
        assert (cell / "private" / f"memorisation_pairs_{sampler}.png").stat().st_size > 1000
        assert not (cell / f"memorisation_pairs_{sampler}.png").exists()
    assert not (cell / "checkpoints").exists() or not any((cell / "checkpoints").iterdir())
    print(f"smoke pipeline: {elapsed:.0f} s")


@pytest.mark.workflow
def test_the_smoke_run_fine_tunes_the_public_model(smoke):
    """Issue 17's miniature: pretrain on digits_public (no privacy) -> DP fine-tune on the
    disjoint digits_private -> sample -> evaluate, beside the same cell from scratch."""
    work, _ = smoke
    results = work / "results" / "smoke"
    record = json.loads((results / "pretrain" / "digits_public" / "pretrain.json").read_text())
    assert record["dataset"] == "digits_public" and record["num_examples"] == 719 and record["steps"] == 40 * 6
    cells = {v: results / "digits_private" / "eps10" / v / "seed0" for v in ("public", "scratch")}
    tuned, scratch = (json.loads((cells[v] / "privacy.json").read_text()) for v in ("public", "scratch"))
    assert tuned["initialisation"]["name"] == "digits_public"
    assert tuned["initialisation"]["model_sha256"] == sha256_file(results / "pretrain" / "digits_public" / "model.pt")
    assert scratch["initialisation"]["kind"].startswith("random")
    for ledger in (tuned, scratch):  # the same mechanism: only the initialisation differs
        assert ledger["num_examples"] == 719 and ledger["eps_rdp"] <= 10
    assert tuned["noise_multiplier"] == scratch["noise_multiplier"] and tuned["steps"] == scratch["steps"]
    table = pd.read_csv(results / "tables" / "finetune.csv")
    assert sorted(table["variant"]) == ["public", "scratch"], table
    for v, cell in cells.items():
        acc = json.loads((cell / "classify_acc_cnn.json").read_text())["test_acc"]
        assert acc > 0.2, (v, acc)  # well above chance (10 %); measured: README "DP fine-tuning"
    # Public pre-training makes the samples class-faithful (measured: judge 100 % vs 49 %)
    judge = {v: json.loads((cells[v] / "judge_acc.json").read_text())["judge_acc"] for v in cells}
    assert judge["public"] > judge["scratch"] + 0.1, judge


@pytest.mark.workflow
def test_the_smoke_run_audits_both_cells_and_they_pass(smoke):
    """Issue 16: `all` runs the configured audits (config audit.cells) under
    {dataset}/eps{eps}/audit/, writes their table and figure, and each real mechanism's
    empirical lower bound stays below the eps its ledger reports."""
    work, _ = smoke
    results = work / "results" / "smoke"
    table = pd.read_csv(results / "tables" / "audit.csv")
    assert sorted(table["eps"]) == [1.0, 10.0] and table["passed"].all()
    assert (table["eps_lower_bound"] <= table["eps_accountant"]).all()
    assert (table["test_only_break"].isna()).all()
    for _, row in table.iterrows():
        audit = json.loads((results / "digits" / f"eps{row['eps']:g}" / "audit" / "seed0" / "audit.json").read_text())
        ledger = json.loads((results / "digits" / f"eps{row['eps']:g}" / "seed0" / "privacy.json").read_text())
        assert audit["eps_lower_bound"] == pytest.approx(row["eps_lower_bound"])
        # the audit ran the cell's own mechanism: same sigma, q and steps as the trained model's ledger
        assert audit["mechanism"]["noise_multiplier"] == ledger["noise_multiplier"]
        assert audit["mechanism"]["sample_rate"] == pytest.approx(ledger["sample_rate"])
        assert audit["mechanism"]["steps"] == ledger["steps"]
        assert audit["eps_accountant"] == pytest.approx(ledger["eps_rdp"])
        assert len(audit["scores"]) == audit["canaries"] == 1000
    # at eps = 10 the audit sees the mechanism (measured lower bounds ~2-2.5); at eps = 1 little
    assert table.set_index("eps").loc[10.0, "eps_lower_bound"] > 1.0
    assert "audit" in (results / "tables" / "audit.tex").read_text()
    assert (results / "figures" / "audit.png").stat().st_size > 1000


@pytest.mark.workflow
def test_published_files_hold_no_fingerprint_of_the_private_data(smoke):
    """No file outside the private folders (private/, checkpoints/, logs/, benchmarks/)
    contains the sha256 (hex or raw) of a private input: with byte-identical data files,
    such a hash decides membership of a candidate record with certainty."""
    import hashlib

    from dpdm.artifacts import is_private

    work, _ = smoke
    results = work / "results" / "smoke"
    # The training split and everything computed from it. (The real test split is
    # evaluation data outside the guarantee's neighbouring relation; results may name it.)
    private = []
    for dataset in ("digits", "digits_private"):  # digits_public is public: pretrain.json names its hash
        data = results / "private" / "data" / dataset
        private += [data / name for name in ("train.npz", "meta.json", "fid_train.npz", "judge_cnn.pt")]
        private += list((results / dataset).rglob("private/*")) + list((results / dataset).rglob("checkpoints/*"))
    digests = {}
    for f in private:
        h = hashlib.sha256(f.read_bytes())
        digests[f.name] = (h.hexdigest().encode(), h.hexdigest().upper().encode(), h.digest())
    published = [f for f in results.rglob("*") if f.is_file() and not is_private(f.relative_to(results))]
    assert any(f.name == "privacy.json" for f in published) and any(f.name == "model.pt" for f in published)
    for f in published:
        blob = f.read_bytes()
        for name, forms in digests.items():
            assert not any(d in blob for d in forms), f"{f.relative_to(results)} holds the sha256 of private {name}"
    ledger = json.loads((results / "digits" / "eps10" / "seed0" / "privacy.json").read_text())
    assert "dataset_sha256" not in json.dumps(ledger)
    tuned = json.loads((results / "digits_private" / "eps10" / "public" / "seed0" / "privacy.json").read_text())
    public = json.loads((results / "pretrain" / "digits_public" / "pretrain.json").read_text())
    assert tuned["initialisation"]["public_dataset_sha256"] == public["dataset_sha256"]  # the public data's, only


@pytest.mark.workflow
def test_tables_hold_the_numbers_of_the_result_files(smoke):
    work, _ = smoke
    results = work / "results" / "smoke"
    t1 = pd.read_csv(results / "tables" / "table1.csv")
    for _, row in t1.iterrows():
        cell = results / row["dataset"] / f"eps{row['eps']:g}" / "seed0"
        fid = json.loads((cell / f"fid_{row['sampler']}.json").read_text())
        assert row["fid_mean"] == pytest.approx(fid["fid"])
        assert row["fid_train_mean"] == pytest.approx(fid["fids"]["train"])
        assert row["fid_test_mean"] == pytest.approx(fid["fids"]["test"])
        assert not row["fid_train_covered_by_dp"] and row["fid_test_covered_by_dp"]
        for metric in ("precision", "recall", "density", "coverage"):  # beside FID, per reference split
            for split in ("train", "test"):
                assert row[f"{metric}_{split}_mean"] == pytest.approx(fid["prdc"][split][metric])
        assert bool(row["fid_test_only"])  # smoke uses the untrained extractor, and says so
        cnn = json.loads((cell / f"classify_{row['sampler']}_cnn.json").read_text())
        assert row["cnn_mean"] == pytest.approx(100 * cnn["test_acc"])
        judge = json.loads((cell / f"judge_{row['sampler']}.json").read_text())
        assert row["judge_mean"] == pytest.approx(100 * judge["judge_acc"]) and not row["judge_covered_by_dp"]
    assert "untrained" in (results / "tables" / "table1.tex").read_text().lower()
    priv = pd.read_csv(results / "tables" / "privacy.csv")
    releases = priv[~priv["kind"].isin(["total", "public"])]  # the DP releases
    for _, row in releases[releases["kind"] == "generator"].iterrows():
        cell = results / row["release"].split()[-1]  # e.g. "generator digits/eps10/K1/seed0"
        ledger = json.loads((cell / "privacy.json").read_text())
        assert row["eps_rdp"] == pytest.approx(ledger["eps_rdp"])
        assert row["sigma"] == pytest.approx(ledger["noise_multiplier"])
        assert ledger["eps_rdp"] <= row["target_eps"] * (1 + 1e-9)
    # Every release on digits (2 generators, the K1 ablation model, 2 DP-SGD CNNs) composes
    # into the dataset's total, which exceeds every single release and not their sum.
    totals = priv[priv["kind"] == "total"].set_index("release")
    total = totals.loc["TOTAL: all 5 releases on digits"]
    digits = releases[releases["dataset"] == "digits"]
    assert len(digits) == 5 and total["steps"] == digits["steps"].sum()
    assert digits["eps_rdp"].max() < total["eps_rdp"] <= digits["eps_rdp"].sum()
    # the fine-tuning miniature's two generators on digits_private compose apart from digits'
    # (disjoint examples); the public model is no release of private data
    assert sorted(releases[releases["dataset"] == "digits_private"]["release"]) == [
        "generator digits_private/eps10/public/seed0", "generator digits_private/eps10/scratch/seed0"]
    assert not releases["release"].str.contains("pretrain").any()
    # ... but digits_private is half of digits: its examples pay for both, composed
    both = totals.loc["TOTAL: all 7 releases on digits, digits_private (shared examples)"]
    assert both["steps"] == releases["steps"].sum() and total["eps_rdp"] < both["eps_rdp"] < float("inf")
    # The public model is a release too, without privacy, on digits_public: the other half of
    # digits. Any total over its examples is not private, and says so; digits_private's is not touched.
    public = priv[priv["kind"] == "public"]
    assert list(public["release"]) == ["public model digits_public (pre-trained without DP)"]
    assert public["dataset"].tolist() == ["digits_public"] and public["eps_rdp"].tolist() == [float("inf")]
    not_private = totals[totals["eps_rdp"] == float("inf")].index
    assert sorted(not_private) == sorted([
        "TOTAL: all 1 releases on digits_public: NOT PRIVATE (public model digits_public saw these examples without DP)",
        "TOTAL: all 6 releases on digits, digits_public (shared examples): NOT PRIVATE (public model digits_public "
        "saw these examples without DP)",
        "TOTAL: all 8 releases on digits, digits_private, digits_public (shared examples): NOT PRIVATE (public "
        "model digits_public saw these examples without DP)"])
    assert r"$\infty$" in (results / "tables" / "privacy.tex").read_text()
    # Ablations: K1 has its own model, K2 is the main eps-10 cell (K = 2 in the smoke config).
    t3 = pd.read_csv(results / "tables" / "table3.csv").set_index("variant")
    for variant, cell in (("K1", "digits/eps10/K1/seed0"), ("K2", "digits/eps10/seed0")):
        fid = json.loads((results / cell / "fid_acc.json").read_text())
        cnn = json.loads((results / cell / "classify_acc_cnn.json").read_text())
        assert t3.loc[variant, "fid_mean"] == pytest.approx(fid["fid"])
        assert t3.loc[variant, "cnn_mean"] == pytest.approx(100 * cnn["test_acc"])
        assert t3.loc[variant, "x"] == int(variant[1:])
        assert json.loads((results / cell / "privacy.json").read_text())["noise_multiplicity"] == int(variant[1:])
    t6 = pd.read_csv(results / "tables" / "table6.csv")
    assert set(t6["sampler"]) == {"fid", "acc"} and set(t6["eps"]) == {1.0, 10.0}


# ----------------------------------------------------------------------------
# Learning: the smoke model's class-conditional samples look like their classes.
# Thresholds from measurement (smoke config, eps = 10, `acc` sampler): judge accuracy
# 0.78-0.86 over repeated runs; eps = 1: ~0.30; chance 0.10.


def _judge(work, settings, samples, tmp_path, name):
    from dpdm.classifiers import judge_samples

    judge = work / "results" / "smoke" / "private" / "data" / "digits" / "judge_cnn.pt"
    return judge_samples(settings, judge, samples, tmp_path / f"{name}.json")["judge_acc"]


@pytest.mark.workflow
def test_the_smoke_model_learns_class_conditional_digits(smoke):
    work, _ = smoke
    results = work / "results" / "smoke" / "digits"
    acc10 = json.loads((results / "eps10" / "seed0" / "judge_acc.json").read_text())["judge_acc"]
    acc1 = json.loads((results / "eps1" / "seed0" / "judge_acc.json").read_text())["judge_acc"]
    assert acc10 >= 0.6, f"the eps-10 smoke model's samples are not class-faithful: judge accuracy {acc10:.3f}"
    assert acc10 > acc1 + 0.15, (acc10, acc1)
    cnn10 = json.loads((results / "eps10" / "seed0" / "classify_acc_cnn.json").read_text())["test_acc"]
    assert cnn10 >= 0.4, f"a CNN trained on eps-10 samples scores {cnn10:.3f} on the real test set"


@pytest.mark.workflow
def test_the_learning_check_fails_on_permuted_labels(smoke, tmp_path):
    """Samples generated for class c but labelled c + 1 (the sampler given permuted labels)."""
    import numpy as np

    from dpdm.config import resolve_cell

    work, _ = smoke
    settings = resolve_cell(_smoke_config(work), "digits", 10, 0)
    with np.load(work / "results/smoke/digits/eps10/seed0/samples_acc.npz") as z:
        images, labels = z["images"], z["labels"]
    shifted = tmp_path / "shifted.npz"
    np.savez(shifted, images=images, labels=(labels + 1) % 10)
    assert _judge(work, settings, shifted, tmp_path, "shifted") < 0.25


@pytest.mark.workflow
def test_the_learning_check_fails_on_an_untrained_model(smoke, tmp_path):
    import torch

    from dpdm.config import resolve_cell
    from dpdm.diffusion import build_precond
    from dpdm.sampling import generate

    work, _ = smoke
    trained = torch.load(work / "results/smoke/digits/eps10/seed0/model.pt", weights_only=True)
    spec = trained["spec"]
    torch.manual_seed(0)
    fresh = build_precond(trained["settings"], spec["resolution"], spec["channels"], spec["num_classes"])
    untrained = dict(trained, ema=fresh.state_dict(), model=fresh.state_dict())
    torch.save(untrained, tmp_path / "model.pt")
    settings = resolve_cell(_smoke_config(work), "digits", 10, 0)
    generate(settings, tmp_path / "model.pt", "acc", tmp_path / "samples.npz", num_samples=300)
    assert _judge(work, settings, tmp_path / "samples.npz", tmp_path, "untrained") < 0.3


def _smoke_config(work):
    from dpdm.config import load_config

    return load_config([work / c for c in SMOKE_CONFIGS])


@pytest.mark.workflow
def test_rerunning_one_cell_reruns_its_chain_and_the_report_only(smoke):
    work, _ = smoke
    p = run_snakemake(
        ["-n", "all", "--configfile", *SMOKE_CONFIGS, "-R", "results/smoke/digits/eps10/seed0/model.pt"],
        cwd=work,
    )
    counts = job_counts(p.stdout + p.stderr)
    # 1 model; its 2 samplers -> 2 sample + 2 fid + 2 judge + 2x2 classify + 2 memorisation
    # (the ablations use the same samplers); then the report and the three ablation tables
    # (the cell is K2 of the K ablation, edm of the parameterisation ablation and both
    # samplers' row). The audits do not read the model.
    assert counts == {"train": 1, "sample": 2, "fid": 2, "judge": 2, "classify": 4, "memorisation": 2,
                      "report": 1, "all": 1, "ablation": 3}


@pytest.mark.workflow
def test_nothing_to_do_after_the_smoke_run(smoke):
    work, _ = smoke
    p = run_snakemake(["-n", "all", "--configfile", *SMOKE_CONFIGS], cwd=work)
    assert "Nothing to be done" in p.stdout + p.stderr


@pytest.mark.workflow
def test_the_readme_report_command_for_smoke_works(smoke):
    """README: `snakemake --report results/smoke/report.html --configfile config/smoke.yaml`."""
    work, _ = smoke
    readme = (REPO / "README.md").read_text()
    cmd = "snakemake --report results/smoke/report.html --configfile config/smoke.yaml"
    assert cmd in readme
    run_snakemake(cmd.split()[1:], cwd=work, timeout=600)
    html = (work / "results" / "smoke" / "report.html").read_text(errors="replace")
    assert "table1.csv" in html and "samples_digits.png" in html
    assert not (work / "results" / "report.html").exists()


@pytest.mark.workflow
def test_a_code_change_reruns_the_rules_that_use_the_module(smoke):
    work, _ = smoke
    sampling = work / "dpdm" / "sampling.py"
    original = sampling.read_text()
    try:
        sampling.write_text(original + "\n# a change\n")
        p = run_snakemake(["-n", "all", "--configfile", *SMOKE_CONFIGS], cwd=work)
    finally:
        sampling.write_text(original)
    counts = job_counts(p.stdout + p.stderr)
    # Every sample set reruns (2 main cells x 2 samplers, K1's one, and the fine-tuning
    # miniature's scratch and public cells); training and data preparation do not.
    assert counts.get("sample") == 7 and "train" not in counts and "prepare" not in counts
    assert collections.Counter(counts)["report"] == 1


def _rule_commands() -> dict[str, tuple[set[str], list[str]]]:
    """rule -> (the `python -m dpdm` commands its shell runs, the commands it code_hash()es)."""
    rules = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"^(?=\s*(?:rule|checkpoint)\b)", smk.read_text(), flags=re.M):
            name = re.match(r"\s*(?:rule|checkpoint) (\w+):", block) or re.search(r'name:\s*f?"(\w+)', block)
            commands = set(re.findall(r"python -m dpdm ([a-z-]+)", block))
            if name and commands:
                rules[name.group(1)] = (commands, re.findall(r'code=code_hash\("([a-z-]+)"\)', block))
    return rules


def test_each_rule_hashes_the_code_of_the_command_it_runs():
    """Every rule that runs `python -m dpdm <command>` has the param
    code=code_hash("<command>") (dpdm.codehash derives the modules from the imports)."""
    rules = _rule_commands()
    assert {"prepare", "fid_reference", "train", "sample", "fid", "classify", "baseline", "train_judge", "judge",
            "report", "ablation"} <= set(rules)
    for name, (commands, hashed) in rules.items():
        if commands == {"fetch-weights"}:
            continue  # downloads a fixed file, checked by its sha256
        assert len(commands) == 1 and hashed == sorted(commands), (name, commands, hashed)


def _dry_run_after_appending(work, module: str) -> dict[str, int]:
    path = work / "dpdm" / f"{module}.py"
    original = path.read_text()
    try:
        path.write_text(original + "\n# a change\n")
        p = run_snakemake(["-n", "all", "--configfile", *SMOKE_CONFIGS, "--quiet", "rules"], cwd=work)
    finally:
        path.write_text(original)
    out = p.stdout + p.stderr
    return {} if "Nothing to be done" in out else job_counts(out)


@pytest.mark.workflow
def test_a_change_to_per_example_gradients_retrains(smoke):
    """privacy/rows.py computes every DP gradient: changing it retrains every model and
    reruns the DP-SGD baselines (before: the train rule's hand-kept module list left out
    the module that computed them)."""
    work, _ = smoke
    counts = _dry_run_after_appending(work, "privacy/rows")
    assert counts.get("train") == 5 and counts.get("baseline") == 2 and "prepare" not in counts, counts


def _downstream(work) -> dict[str, set[str]]:
    """rule -> the rules that read its outputs, from `snakemake --rulegraph` of the smoke config."""
    p = run_snakemake(["--rulegraph", "dot", "all", "--configfile", *SMOKE_CONFIGS], cwd=work)
    names = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', p.stdout, re.M))
    graph = {name: set() for name in names.values()}
    for a, b in re.findall(r"^\s*(\d+) -> (\d+)", p.stdout, re.M):
        graph[names[a]].add(names[b])
    assert {"train", "sample", "report", "all"} <= set(graph), p.stdout
    return graph


@pytest.mark.workflow
def test_a_change_to_any_module_reruns_exactly_the_rules_that_run_it(smoke):
    """Issue 15: appending a comment to each dpdm module in turn schedules exactly the
    rules whose commands import it (by dpdm.codehash) and what reads their outputs (the
    report, the ablation tables), nothing else; a module no rule runs schedules nothing."""
    from dpdm import codehash

    work, _ = smoke
    graph = _downstream(work)
    commands = {rule: next(iter(cmds)) for rule, (cmds, _) in _rule_commands().items() if rule in graph}
    modules = sorted(p.relative_to(work / "dpdm").with_suffix("").as_posix() for p in (work / "dpdm").rglob("*.py"))
    assert len(modules) > 25 and "privacy/rows" in modules and "layout" in modules
    wrong = {}
    for module in modules:
        top = module.split("/")[0]  # a package (privacy/) is hashed as one module
        expected = {rule for rule, command in commands.items() if top in codehash.modules_of(command)}
        frontier = list(expected)
        while frontier:
            for reader in graph[frontier.pop()] - expected:
                expected.add(reader)
                frontier.append(reader)
        got = set(_dry_run_after_appending(work, module))
        if got != expected:
            wrong[module] = {"scheduled": sorted(got), "expected": sorted(expected)}
    assert not wrong, wrong


@pytest.mark.workflow
def test_modules_no_rule_runs_rerun_nothing_and_the_report_reruns_tables_only(smoke):
    work, _ = smoke
    assert _dry_run_after_appending(work, "bench") == {}
    counts = _dry_run_after_appending(work, "report")
    assert counts == {"report": 1, "ablation": 4, "audit_report": 1, "all": 1}, counts


@pytest.mark.workflow
def test_tables_compile_in_a_standard_latex_document(smoke, tmp_path):
    """Every generated .tex is a table float that compiles with booktabs alone."""
    if not shutil.which("pdflatex"):
        pytest.skip("pdflatex is not installed (.ci/run installs texlive-latex-base/-recommended)")
    work, _ = smoke
    tables = sorted((work / "results" / "smoke" / "tables").glob("*.tex"))
    assert {t.stem for t in tables} >= {"table1", "table2", "privacy", "table3", "table5", "table6"}
    body = "\n".join(t.read_text() for t in tables)
    doc = tmp_path / "tables.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage[utf8]{inputenc}\n"
                   "\\begin{document}\n" + body + "\n\\end{document}\n")
    p = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]
    assert (tmp_path / "tables.pdf").stat().st_size > 1000


@pytest.mark.workflow
def test_html_report_holds_tables_figures_and_grids(smoke):
    work, _ = smoke
    out = work / "results" / "smoke" / "report.html"
    run_snakemake(["all", "--configfile", *SMOKE_CONFIGS, "--report", str(out)], cwd=work, timeout=600)
    html = out.read_text(errors="replace")
    for name in ("table1.csv", "privacy.csv", "table3.csv", "fid_vs_eps.png", "table6.png", "grid_fid.png"):
        assert name in html, name
