"""dpdm.report on hand-made result files: Table 2 selects without the test set, FID
that was not computed says so, loss curves need the opt-in, the privacy table composes
every release of a dataset and flags choices made on non-covered numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpdm import layout, privacy, report
from dpdm.artifacts import DPDMError
from dpdm.registry import CLASSIFIERS


def _write(entry: layout.Entry, data: dict) -> layout.Entry:
    path = Path(entry.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return entry


def _ledger(sigma: float, q: float, steps: int, eps_target: float, delta: float = 1e-5) -> dict:
    history = [[sigma, q, steps]]
    return {"noise_multiplier": sigma, "sample_rate": q, "steps": steps, "noise_multiplicity": 2, "clip": 1.0,
            "delta": delta, "target_eps": eps_target, "num_examples": 1000, "expected_batch_size": q * 1000,
            "epochs": q * steps, "history": history, "choices_on_private_data": [],
            "eps_rdp": privacy.epsilon_from_history(history, delta, "rdp"),
            "eps_prv": privacy.epsilon_from_history(history, delta, "prv")}


def _settings(sampler: str, tuned_on: str | None = None) -> dict:
    opts = {"kind": "ddim", "steps": 10, **({"tuned_on": tuned_on} if tuned_on else {})}
    return {"provenance": {"settings": {"samplers": {sampler: opts}}}}


@pytest.fixture
def results(tmp_path):
    """One dataset, eps 10: two samplers whose CNNs rank differently on the synthetic
    validation split (A better) and the real test set (B better); a DP-SGD baseline."""
    root = tmp_path / "results"
    entries = layout.cell_entries(str(root), "mnist", 10.0, 0, "", {"A": list(CLASSIFIERS), "B": list(CLASSIFIERS)},
                                  fid=False, judge=False)
    files = []
    for e in entries:
        if e.kind == "privacy":
            files.append(_write(e, _ledger(0.8, 0.01, 500, 10.0)))
        elif e.kind == "classify":
            val, test = {"A": (0.90, 0.50), "B": (0.80, 0.95)}[e.sampler]
            files.append(_write(e, {"test_acc": test, "val_acc": val, "sizes": {"synthetic": 10000},
                                    **_settings(e.sampler, "train-split FID" if e.sampler == "A" else None)}))
    led = _ledger(1.0, 0.02, 300, 10.0)
    files += [_write(e, {"test_acc": 0.7, "privacy": led})
              for e in layout.baseline_entries(str(root), "mnist", 10.0, 0, list(CLASSIFIERS))]
    return root, files


def test_table2_picks_the_sampler_by_synthetic_validation_accuracy(results, tmp_path):
    root, files = results
    res = report.collect(files)
    report.table2(res, tmp_path / "out")
    t2 = pd.read_csv(tmp_path / "out" / "tables" / "table2.csv").set_index("classifier")
    # A has the better validation accuracy (90 vs 80) and the worse test accuracy (50 vs 95).
    assert (t2["dpdm_sampler"] == "A").all() and (t2["dpdm_mean"] == 50.0).all()
    assert "validation" in t2["dpdm_selection"].iloc[0]
    assert "never the test set" in (tmp_path / "out" / "tables" / "table2.tex").read_text()


def test_report_without_fid_says_not_computed(results, tmp_path):
    """fid.enabled: false: no fid_*.json at all; the whole report builds, Table 1 says so."""
    root, files = results
    report.build_report(files, tmp_path / "out")
    t1 = pd.read_csv(tmp_path / "out" / "tables" / "table1.csv")
    assert (t1["fid_status"] == report.NOT_COMPUTED).all() and t1["fid_mean"].isna().all()
    tex = (tmp_path / "out" / "tables" / "table1.tex").read_text()
    assert "not computed" in tex and "fid.enabled: false" in tex and "nan" not in tex.lower()
    # Sampler A was tuned on a non-covered number: flagged in the CSV and the caption.
    assert set(t1.loc[t1["sampler"] == "A", "sampler_tuned_on"]) == {"train-split FID"}
    assert "\\ddag" in tex
    assert "trained on 10,000 samples per cell" in tex  # read from the results, not written in the code


def test_loss_curves_need_the_opt_in(results, tmp_path):
    root, files = results
    metrics = layout.Entry("metrics", layout.cell_file("metrics", f"{root}/mnist/eps10/seed0"), "mnist", 10.0, 0)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text("step,epoch,loss\n1,0.01,1.0\n2,0.02,0.9\n")
    with pytest.raises(DPDMError, match="report.loss_curves: true"):
        report.collect(files + [metrics])
    assert len(report.collect(files + [metrics], loss_curves=True)["metrics"]) == 2


def test_privacy_table_composes_every_release_of_a_dataset(results, tmp_path):
    root, files = results
    report.privacy_table(report.collect(files), tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "tables" / "privacy.csv")
    single = table[table["kind"] != "total"]
    total = table[table["kind"] == "total"].iloc[0]
    n = len(CLASSIFIERS)
    assert len(single) == 1 + n  # the generator and a DP-SGD classifier of each kind
    history = [[0.8, 0.01, 500]] + [[1.0, 0.02, 300]] * n
    assert total["eps_rdp"] == pytest.approx(privacy.epsilon_from_history(history, 1e-5, "rdp"))
    assert single["eps_rdp"].max() < total["eps_rdp"] < single["eps_rdp"].sum()
    assert total["steps"] == 500 + n * 300
    generator = single[single["kind"] == "generator"].iloc[0]
    assert "sampler A: tuned on train-split FID" in generator["choices"]


def test_releases_on_datasets_of_shared_examples_compose_together():
    """digits_private is half of digits: besides each dataset's own total, one total composes
    the releases on both (an example of the half pays for all of them)."""
    def row(ds, steps):
        return dict(release=f"generator {ds}", kind="generator", dataset=ds, N=700, delta=1e-4, steps=steps,
                    history=[[1.0, 0.1, steps]], choices="")

    rel = pd.DataFrame([row("digits", 100), row("digits", 50), row("digits_private", 80), row("mnist", 10)])
    totals = report.dataset_totals(rel).set_index("release")
    assert list(totals.index) == ["TOTAL: all 2 releases on digits", "TOTAL: all 1 releases on digits_private",
                                  "TOTAL: all 1 releases on mnist",
                                  "TOTAL: all 3 releases on digits, digits_private (shared examples)"]
    both = totals.loc["TOTAL: all 3 releases on digits, digits_private (shared examples)"]
    assert both["steps"] == 230
    assert both["eps_rdp"] == pytest.approx(privacy.epsilon_from_history([[1.0, 0.1, 230]], 1e-4, "rdp"))


def test_a_public_model_makes_every_total_over_its_examples_not_private():
    """A public model (pre-trained without DP) on digits_public: its own total and digits'
    (digits holds digits_public's examples) are infinite; digits_private, the disjoint other
    half, composes only its releases with digits'."""
    def row(ds, steps, kind="generator"):
        return dict(release=f"generator {ds}", kind=kind, dataset=ds, N=700, delta=1e-4, steps=steps,
                    history=[[1.0, 0.1, steps]], choices="")

    res = {"privacy": pd.DataFrame(), "baseline": pd.DataFrame(), "fid": pd.DataFrame(), "classify": pd.DataFrame(),
           "pretrain": pd.DataFrame([dict(name="pub", dataset="digits_public", eps=np.inf, seed=0, variant="pub",
                                          N=719, steps=240, dataset_sha256="ab")])}
    public = report.releases(res)
    assert public[["release", "kind", "dataset"]].values.tolist() == [
        ["public model pub (pre-trained without DP)", "public", "digits_public"]]
    assert public["eps_rdp"].tolist() == [np.inf]
    rel = pd.concat([pd.DataFrame([row("digits", 100), row("digits_private", 80)]), public], ignore_index=True)
    totals = report.dataset_totals(rel).set_index("release")["eps_rdp"]
    note = ": NOT PRIVATE (public model pub saw these examples without DP)"
    assert totals.to_dict() == {
        "TOTAL: all 1 releases on digits": pytest.approx(privacy.epsilon_from_history([[1.0, 0.1, 100]], 1e-4, "rdp")),
        "TOTAL: all 1 releases on digits_private": pytest.approx(
            privacy.epsilon_from_history([[1.0, 0.1, 80]], 1e-4, "rdp")),
        "TOTAL: all 1 releases on digits_public" + note: np.inf,
        "TOTAL: all 3 releases on digits, digits_private, digits_public (shared examples)" + note: np.inf,
        "TOTAL: all 2 releases on digits, digits_private (shared examples)": pytest.approx(
            privacy.epsilon_from_history([[1.0, 0.1, 180]], 1e-4, "rdp")),
        "TOTAL: all 2 releases on digits, digits_public (shared examples)" + note: np.inf,
    }
