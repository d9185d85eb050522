"""The Snakemake workflow: the paper grid as a dry run, lint, config validation, the
smoke pipeline end to end, single-cell reruns and code-change reruns.

The smoke run works on a copy of the workflow in a temporary folder so it never
touches the repository's results/ and can run beside other tests.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# Jobs of the full paper grid (config/config.yaml): 8 cells (MNIST, Fashion-MNIST at
# eps 0.2/1/10; CelebA at 1/10), 2 samplers per class-conditional cell and 1 for
# CelebA, 3 classifiers, DP-SGD baselines for the class-conditional cells.
PAPER_JOBS = {
    "prepare": 3,
    "fid_reference": 3,
    "train": 8,
    "sample": 6 * 2 + 2,
    "fid": 6 * 2 + 2,
    "classify": 6 * 2 * 3,
    "baseline": 6 * 3,
    "report": 1,
    "all": 1,
}


def run_snakemake(args, cwd, env=None, timeout=1800, check=True):
    e = dict(os.environ, **(env or {}))
    e.pop("DPDM_FID_WEIGHTS", None)
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
    for name in ("Snakefile", "rules", "workflow", "config", "dpdm"):
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


def test_lint_is_clean(dry_workdir):
    p = run_snakemake(["--lint"], cwd=dry_workdir, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


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


# ----------------------------------------------------------------------------
# The smoke pipeline, end to end.


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("smoke"))
    t0 = time.time()
    run_snakemake(["all", "--cores", "2", "--configfile", "config/smoke.yaml"], cwd=work, timeout=1800)
    return work, time.time() - t0


@pytest.mark.workflow
def test_smoke_pipeline_writes_tables_figures_and_results(smoke):
    work, elapsed = smoke
    results = work / "results" / "smoke"
    for name in ("table1", "table2", "privacy"):
        assert (results / "tables" / f"{name}.tex").is_file()
        assert (results / "tables" / f"{name}.csv").is_file()
        assert r"\toprule" in (results / "tables" / f"{name}.tex").read_text()
    for name in ("fid_vs_eps", "acc_vs_eps", "loss_curves", "samples_digits"):
        for ext in ("pdf", "png"):
            assert (results / "figures" / f"{name}.{ext}").stat().st_size > 1000
    cell = results / "digits" / "eps10" / "seed0"
    for f in ("model.pt", "privacy.json", "train_metrics.csv", "samples_fid.npz", "grid_fid.png",
              "fid_fid.json", "classify_acc_cnn.json", "logs/train.log", "benchmarks/train.tsv"):
        assert (cell / f).is_file(), f
    assert not (cell / "checkpoints").exists() or not any((cell / "checkpoints").iterdir())
    print(f"smoke pipeline: {elapsed:.0f} s")


@pytest.mark.workflow
def test_tables_hold_the_numbers_of_the_result_files(smoke):
    work, _ = smoke
    results = work / "results" / "smoke"
    t1 = pd.read_csv(results / "tables" / "table1.csv")
    for _, row in t1.iterrows():
        cell = results / row["dataset"] / f"eps{row['eps']:g}" / "seed0"
        fid = json.loads((cell / f"fid_{row['sampler']}.json").read_text())
        assert row["fid_mean"] == pytest.approx(fid["fid"])
        assert bool(row["fid_test_only"])  # smoke uses the untrained extractor, and says so
        cnn = json.loads((cell / f"classify_{row['sampler']}_cnn.json").read_text())
        assert row["cnn_mean"] == pytest.approx(100 * cnn["test_acc"])
    assert "untrained" in (results / "tables" / "table1.tex").read_text().lower()
    priv = pd.read_csv(results / "tables" / "privacy.csv")
    for _, row in priv.iterrows():
        ledger = json.loads((results / row["dataset"] / f"eps{row['eps']:g}" / "seed0" / "privacy.json").read_text())
        assert row["eps_rdp"] == pytest.approx(ledger["eps_rdp"])
        assert row["sigma"] == pytest.approx(ledger["sigma"])
        assert ledger["eps_rdp"] <= row["target_eps"] * (1 + 1e-9)


@pytest.mark.workflow
def test_rerunning_one_cell_reruns_its_chain_and_the_report_only(smoke):
    work, _ = smoke
    p = run_snakemake(
        ["-n", "all", "--configfile", "config/smoke.yaml", "-R", "results/smoke/digits/eps10/seed0/model.pt"],
        cwd=work,
    )
    counts = job_counts(p.stdout + p.stderr)
    # 1 model, 2 samplers -> 2 sample + 2 fid + 2x3 classify, then the report.
    assert counts == {"train": 1, "sample": 2, "fid": 2, "classify": 6, "report": 1, "all": 1}


@pytest.mark.workflow
def test_nothing_to_do_after_the_smoke_run(smoke):
    work, _ = smoke
    p = run_snakemake(["-n", "all", "--configfile", "config/smoke.yaml"], cwd=work)
    assert "Nothing to be done" in p.stdout + p.stderr


@pytest.mark.workflow
def test_a_code_change_reruns_the_rules_that_use_the_module(smoke):
    work, _ = smoke
    sampling = work / "dpdm" / "sampling.py"
    original = sampling.read_text()
    try:
        sampling.write_text(original + "\n# a change\n")
        p = run_snakemake(["-n", "all", "--configfile", "config/smoke.yaml"], cwd=work)
    finally:
        sampling.write_text(original)
    counts = job_counts(p.stdout + p.stderr)
    # Two cells x two samplers: sampling reruns; training and data preparation do not.
    assert counts.get("sample") == 4 and "train" not in counts and "prepare" not in counts
    assert collections.Counter(counts)["report"] == 1
