"""Result files -> the paper's tables (LaTeX + CSV) and figures (PDF + PNG).

Every number comes from a result file written by another stage; nothing is typed in
by hand. What each file is (a ledger, an FID, a classifier's accuracy, a DP-SGD
baseline, a sample grid; of which dataset, eps, seed, sampler and classifier) comes
from the manifest the workflow writes from dpdm.layout (rule report_manifest), never
from the file's name.

Tables (paper numbering): table1 = FID and downstream accuracy of class-conditional
datasets (Table 1); table2 = DP-SGD classifiers on real data vs. classifiers trained on
our samples (Table 2); table4 = FID of unconditional datasets (CelebA, Table 4);
privacy = the ledger of every trained model. With several seeds a cell shows
mean ± std. FIDs computed with the untrained (test-only) extractor are labelled so in
every table and figure that shows them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dpdm import layout
from dpdm.artifacts import DPDMError, atomic_path, load_json
from dpdm.prdc import PRDC_METRICS
from dpdm.registry import CLASSIFIERS

log = logging.getLogger("dpdm.report")

PRETTY_DATASET = {
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "celeba32": "CelebA 32",
    "cifar10": "CIFAR-10",
    "digits": "Digits",
    "digits_public": "Digits (public half)",
    "digits_private": "Digits (private half)",
    "imagenet32": "ImageNet 32",
    "camelyon17": "Camelyon17",
}
PRETTY_CLASSIFIER = {"logreg": "Log Reg", "mlp": "MLP", "cnn": "CNN", "wrn-16-4": "WRN-16-4", "wrn-28-10": "WRN-28-10"}
UNTRAINED_NOTE = "FID from an UNTRAINED extractor (test-only mode): not comparable to the paper"
KINDS = ("privacy", "metrics", "fid", "classify", "judge", "baseline", "grid", "pretrain")  # what the report reads


# ----------------------------------------------------------------------------
# Collecting results.


def read_manifest(path: str | Path) -> list[layout.Entry]:
    """The report's inputs from the manifest file the workflow writes ({"entries": [...]})."""
    data = load_json(path)
    fields = {f.name for f in dataclasses.fields(layout.Entry)}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and set(e) == fields for e in entries):
        raise DPDMError(f"{path} is not a report manifest: expected {{\"entries\": [...]}}, each entry with the keys "
                        f"{sorted(fields)} (the workflow's rule report_manifest writes it)")
    return [layout.Entry(**e) for e in entries]


def _tuned_on(data: dict, sampler: str) -> str:
    """The sampler's `tuned_on` flag (a non-covered number its settings were chosen by), from a result's settings."""
    settings = (data.get("provenance") or {}).get("settings") or {}
    return ((settings.get("samplers") or {}).get(sampler) or {}).get("tuned_on") or ""


def collect(entries: list[layout.Entry], loss_curves: bool = False) -> dict[str, pd.DataFrame]:
    """Read every result file into one tidy DataFrame per kind."""
    rows: dict[str, list[dict]] = {k: [] for k in KINDS}
    for e in entries:
        if e.kind not in KINDS:
            raise DPDMError(f"{e.path}: the report does not read results of kind '{e.kind}' (it reads {KINDS})")
        if e.classifier and e.classifier not in CLASSIFIERS:
            raise DPDMError(f"{e.path}: unknown classifier '{e.classifier}' (the classifiers are {CLASSIFIERS})")
        path = Path(e.path)
        info = dict(dataset=e.dataset, eps=float(e.eps), seed=int(e.seed), variant=e.variant)
        if e.kind in ("fid", "classify", "judge", "grid"):
            info["sampler"] = e.sampler
        if e.kind in ("classify", "baseline"):
            info["classifier"] = e.classifier
        kind = e.kind
        if kind == "grid":
            rows[kind].append(dict(info, path=str(path)))
            continue
        if kind == "metrics":
            if not loss_curves:
                raise DPDMError(f"{path}: training losses are computed on private data without noise and are not "
                                "covered by the DP guarantee; they enter the report only with the opt-in config key "
                                "report.loss_curves: true (python -m dpdm report --loss-curves)")
            df = pd.read_csv(path)
            for k, v in info.items():
                df[k] = v
            rows[kind].append(df)
            continue
        data = load_json(path)
        if kind == "privacy":
            info.update(
                sigma=data["noise_multiplier"], q=data["sample_rate"], steps=data["steps"], K=data["noise_multiplicity"],
                C=data["clip"], delta=data["delta"], target_eps=data["target_eps"],
                eps_rdp=data["eps_rdp"], eps_prv=data["eps_prv"], N=data["num_examples"],
                expected_batch=data["expected_batch_size"], epochs=data["epochs"], history=data["history"],
                choices="; ".join(data.get("choices_on_private_data") or []),
            )
        elif kind == "pretrain":  # a public model: no privacy mechanism at all
            info.update(name=e.variant, N=data["num_examples"], steps=data["steps"],
                        dataset_sha256=data["dataset_sha256"])
        elif kind == "fid":
            fids = data.get("fids") or {(data.get("reference") or {}).get("split", "train"): data["fid"]}
            info.update(fid=data["fid"], test_only=bool(data.get("test_only", False)),
                        extractor=data.get("extractor"), tuned_on=_tuned_on(data, e.sampler),
                        **{f"fid_{split}": value for split, value in fids.items()},
                        **{f"{m}_{split}": v[m] for split, v in (data.get("prdc") or {}).items() for m in PRDC_METRICS})
        elif kind == "judge":
            info.update(judge=100.0 * data["judge_acc"], judge_real=100.0 * data["judge"]["real_test_acc"])
        elif kind in ("classify", "baseline"):
            info.update(acc=100.0 * data["test_acc"])
            if kind == "classify":
                info.update(val_acc=100.0 * data["val_acc"], tuned_on=_tuned_on(data, e.sampler),
                            num_synthetic=(data.get("sizes") or {}).get("synthetic"))
            if kind == "baseline":
                led = data["privacy"]
                info.update(eps_rdp=led["eps_rdp"], eps_prv=led["eps_prv"], sigma=led["noise_multiplier"],
                            q=led["sample_rate"], steps=led["steps"], K=1, C=led["clip"], delta=led["delta"],
                            target_eps=led["target_eps"], N=led["num_examples"], history=led["history"],
                            choices="; ".join(led.get("choices_on_private_data") or []))
        rows[kind].append(info)
    out = {}
    for kind, r in rows.items():
        if kind == "metrics":
            out[kind] = pd.concat(r, ignore_index=True) if r else pd.DataFrame()
        else:
            out[kind] = pd.DataFrame(r)
    return out


def main_cells(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the main grid (not an ablation's own models)."""
    return df[df["variant"] == ""] if len(df) and "variant" in df else df


# ----------------------------------------------------------------------------
# Formatting.


def _mean_std(values: pd.Series) -> tuple[float, float, int]:
    """Mean, sample std (NaN for one value) and count of the non-missing values."""
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return np.nan, np.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else np.nan, len(v)


def _fmt(mean: float, std: float, n: int, digits: int, latex: bool) -> str:
    if n == 0 or np.isnan(mean):
        return "--"
    s = f"{mean:.{digits}f}"
    if n > 1:
        s += (r" $\pm$ " if latex else " ± ") + f"{std:.{digits}f}"
    return s


def aggregate(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Mean, std and count over seeds of `value`, grouped by `keys`."""
    rows = []
    for k, g in df.groupby(keys, sort=True):
        k = k if isinstance(k, tuple) else (k,)
        mean, std, n = _mean_std(g[value])
        rows.append(dict(zip(keys, k), mean=mean, std=std, n=n))
    return pd.DataFrame(rows)


def _latex_eps(eps: float) -> str:
    return f"$\\varepsilon={eps:g}$"


def write_table(wide: pd.DataFrame, tidy: pd.DataFrame, out_dir: Path, name: str, caption: str) -> None:
    """`wide` (strings) -> {name}.tex via Styler.to_latex (booktabs); `tidy` -> {name}.csv."""
    with atomic_path(out_dir / layout.TABLE.format(name=name, ext="csv")) as tmp:
        tidy.to_csv(tmp, index=False)
    latex = wide.style.to_latex(
        hrules=True,  # \toprule, \midrule, \bottomrule: booktabs
        caption=caption,
        label=f"tab:{name}",
        position_float="centering",
        multicol_align="c",
        multirow_align="naive",  # no \multirow: compiles with booktabs alone
    )
    with atomic_path(out_dir / layout.TABLE.format(name=name, ext="tex")) as tmp:
        tmp.write_text(latex)


def _escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


# ----------------------------------------------------------------------------
# Tables.


NOT_COVERED_MARK = "\\dag"  # LaTeX; CSV columns say covered_by_dp instead
TUNED_MARK = "\\ddag"
NOT_COVERED_NOTE = ("$^\\dag$ FID against the training split is a statistic of the private data, not covered by the "
                    "DP guarantee (the paper's protocol)")
TUNED_NOTE = "$^\\ddag$ sampler settings chosen by a number the DP guarantee does not cover (see tables/privacy.csv)"


def _fid_splits(fid: pd.DataFrame) -> list[str]:
    """The FID reference splits present, headline (train, the paper's) first."""
    splits = [c[len("fid_"):] for c in fid.columns if c.startswith("fid_") and c != "fid_test_only"]
    return sorted(splits, key=lambda split: (split != "train", split))


def _fid_column(split: str, untrained: bool) -> str:
    name = f"FID ({split})" + (f"$^{NOT_COVERED_MARK}$" if split == "train" else "")
    return name + (" untrained, TEST ONLY" if untrained else "")


def _fid_captions(splits: list[str], untrained: bool, tuned: bool) -> str:
    notes = []
    if "train" in splits:
        notes.append(NOT_COVERED_NOTE)
    if tuned:
        notes.append(TUNED_NOTE)
    if untrained:
        notes.append(UNTRAINED_NOTE)
    return "".join(" " + n + "." for n in notes)


NOT_COMPUTED = "not computed"


def _count_text(clf: pd.DataFrame) -> str:
    """'10,000 samples per cell', or the range when cells differ (read from the classify results)."""
    counts = clf["num_synthetic"].dropna().astype(int) if "num_synthetic" in clf else pd.Series(dtype=int)
    if not len(counts):
        return "the samples"
    lo, hi = counts.min(), counts.max()
    return f"{lo:,} samples per cell" if lo == hi else f"{lo:,} to {hi:,} samples per cell"


def table1(res: dict[str, pd.DataFrame], out_dir: Path) -> None:
    """Table 1: FID (per reference split) and Log Reg / MLP / CNN accuracy per (dataset, eps, sampler).
    Without FID results (config fid.enabled: false) the FID column says "not computed"."""
    fid, clf, judge = main_cells(res["fid"]), main_cells(res["classify"]), main_cells(res["judge"])
    fid = fid[fid["dataset"].isin(clf["dataset"].unique())] if len(clf) and len(fid) else fid.iloc[0:0]
    untrained = bool(len(fid) and fid["test_only"].any())
    splits = _fid_splits(fid)
    tuned = bool(len(clf) and (clf["tuned_on"] != "").any())
    keys = ["dataset", "eps", "sampler"]
    cells = pd.concat([f[keys] for f in (fid, clf) if len(f)]).drop_duplicates().sort_values(keys) \
        if len(clf) else clf
    tidy_rows, wide_rows = [], {}
    for ds, eps, sampler in cells.itertuples(index=False):
        g = fid[(fid["dataset"] == ds) & (fid["eps"] == eps) & (fid["sampler"] == sampler)] if len(fid) else fid
        ours = clf[(clf["dataset"] == ds) & (clf["eps"] == eps) & (clf["sampler"] == sampler)]
        flag = ours["tuned_on"].iloc[0] if len(ours) else g["tuned_on"].iloc[0]
        tidy = dict(dataset=ds, eps=eps, sampler=sampler, sampler_tuned_on=flag)
        label = _escape(sampler) + (f"$^{TUNED_MARK}$" if flag else "")
        row_key = (_latex_eps(eps), label)
        wide = wide_rows.setdefault(row_key, {})
        if not splits:
            tidy.update(fid_mean=np.nan, fid_std=np.nan, fid_status=NOT_COMPUTED)
            wide[(PRETTY_DATASET.get(ds, ds), "FID")] = NOT_COMPUTED
        for split in splits:
            m, s_, n = _mean_std(g[f"fid_{split}"]) if len(g) else (np.nan, np.nan, 0)
            tidy.update({f"fid_{split}_mean": m, f"fid_{split}_std": s_,
                         f"fid_{split}_covered_by_dp": split != "train"})
            wide[(PRETTY_DATASET.get(ds, ds), _fid_column(split, untrained))] = _fmt(m, s_, n, 1, True)
            for metric in PRDC_METRICS:  # beside FID in the CSV, from the same features and reference
                if f"{metric}_{split}" in g:
                    m, s_, _ = _mean_std(g[f"{metric}_{split}"])
                    tidy.update({f"{metric}_{split}_mean": m, f"{metric}_{split}_std": s_})
        if splits:
            tidy.update(fid_mean=tidy[f"fid_{splits[0]}_mean"], fid_std=tidy[f"fid_{splits[0]}_std"],
                        fid_status="computed" if len(g) else NOT_COMPUTED)
        tidy.update(seeds=int(ours["seed"].nunique()) if len(ours) else len(g), fid_test_only=untrained)
        if len(judge):
            j = judge[(judge["dataset"] == ds) & (judge["eps"] == eps) & (judge["sampler"] == sampler)]
            jm, js, jn = _mean_std(j["judge"])
            tidy.update(judge_mean=jm, judge_std=js, judge_covered_by_dp=False)
            wide[(PRETTY_DATASET.get(ds, ds), f"Judge$^{NOT_COVERED_MARK}$ (\\%)")] = _fmt(jm, js, jn, 1, True)
        for c in CLASSIFIERS:
            sel = clf[(clf["dataset"] == ds) & (clf["eps"] == eps) & (clf["sampler"] == sampler) & (clf["classifier"] == c)] if len(clf) else clf
            cm, cs, cn = _mean_std(sel["acc"]) if len(sel) else (np.nan, np.nan, 0)
            tidy[f"{c}_mean"], tidy[f"{c}_std"] = cm, cs
            wide[(PRETTY_DATASET.get(ds, ds), PRETTY_CLASSIFIER[c] + r" (\%)")] = _fmt(cm, cs, cn, 1, True)
        tidy_rows.append(tidy)
    wide = pd.DataFrame.from_dict(wide_rows, orient="index")
    wide.index = pd.MultiIndex.from_tuples(wide.index, names=["", "sampler"])
    wide.columns = pd.MultiIndex.from_tuples(wide.columns)
    caption = ("Class-conditional DP image generation: FID and accuracy on the real test set of classifiers trained "
               f"on {_count_text(clf)} (90\\% train / 10\\% validation).")
    caption += _fid_captions(splits, untrained, tuned)
    if len(judge):
        caption += (f" Judge: accuracy of a classifier trained on the real training split on the samples' classes "
                    f"(the judge scores {judge['judge_real'].mean():.1f}\\% on real test images); "
                    "$^\\dag$ not covered by the DP guarantee.")
    if not splits:
        caption += " FID was not computed (config fid.enabled: false)."
    write_table(wide.fillna("--"), pd.DataFrame(tidy_rows), out_dir, "table1", caption)


def table2(res: dict[str, pd.DataFrame], out_dir: Path) -> None:
    """Table 2: DP-SGD classifiers trained on real data vs. classifiers trained on our samples.

    DPDM's column takes, per (dataset, eps, classifier), the sampler whose classifier has
    the best accuracy on the SYNTHETIC validation split (mean over seeds): choosing by the
    real test accuracy would be selection on the test set."""
    base, clf = res["baseline"], main_cells(res["classify"])
    tidy_rows, wide_rows = [], {}
    for (ds, eps), g in base.groupby(["dataset", "eps"], sort=True):
        ours = clf[(clf["dataset"] == ds) & (clf["eps"] == eps)] if len(clf) else clf
        for c in CLASSIFIERS:
            bm, bs, bn = _mean_std(g[g["classifier"] == c]["acc"])
            best, best_val = (np.nan, np.nan, 0, None), -np.inf
            if len(ours):
                for sampler, gs in ours[ours["classifier"] == c].groupby("sampler", sort=True):
                    val = float(gs["val_acc"].mean())
                    if val > best_val:
                        best, best_val = (*_mean_std(gs["acc"]), sampler), val
            tidy_rows.append(dict(dataset=ds, eps=eps, classifier=c, dpsgd_mean=bm, dpsgd_std=bs,
                                  dpdm_mean=best[0], dpdm_std=best[1], dpdm_sampler=best[3],
                                  dpdm_selection=TABLE2_SELECTION))
            row = wide_rows.setdefault(PRETTY_CLASSIFIER[c], {})
            col = (PRETTY_DATASET.get(ds, ds), _latex_eps(eps))
            row[col + ("DP-SGD",)] = _fmt(bm, bs, bn, 1, True)
            row[col + ("DPDM",)] = _fmt(*best[:3], 1, True)
    wide = pd.DataFrame.from_dict(wide_rows, orient="index")
    wide.columns = pd.MultiIndex.from_tuples(wide.columns)
    caption = ("Test accuracy (\\%) of classifiers trained with DP-SGD on real data vs. trained "
               "non-privately on DPDM samples at the same privacy level. DPDM: per classifier, the sampler with the "
               "best accuracy on the synthetic validation split (never the test set).")
    write_table(wide.fillna("--"), pd.DataFrame(tidy_rows), out_dir, "table2", caption)


TABLE2_SELECTION = "sampler with the best mean accuracy on the synthetic validation split (ties: first by name)"


def table4(res: dict[str, pd.DataFrame], out_dir: Path, unconditional: set[str]) -> None:
    """Table 4: FID (per reference split) of unconditional datasets (CelebA)."""
    fid = main_cells(res["fid"])
    fid = fid[fid["dataset"].isin(unconditional)]
    untrained = bool(len(fid) and fid["test_only"].any())
    splits = _fid_splits(fid)
    tuned = bool(len(fid) and (fid["tuned_on"] != "").any())
    tidy_rows, wide_rows = [], {}
    for (ds, eps, sampler), g in fid.groupby(["dataset", "eps", "sampler"], sort=True):
        flag = g["tuned_on"].iloc[0]
        tidy = dict(dataset=ds, eps=eps, sampler=sampler, sampler_tuned_on=flag, seeds=len(g), fid_test_only=untrained)
        label = _escape(sampler) + (f"$^{TUNED_MARK}$" if flag else "")
        for split in splits:
            m, s_, n = _mean_std(g[f"fid_{split}"])
            tidy.update({f"fid_{split}_mean": m, f"fid_{split}_std": s_,
                         f"fid_{split}_covered_by_dp": split != "train"})
            wide_rows.setdefault(label, {})[(PRETTY_DATASET.get(ds, ds), _latex_eps(eps),
                                             _fid_column(split, untrained))] = _fmt(m, s_, n, 1, True)
        tidy.update(fid_mean=tidy[f"fid_{splits[0]}_mean"], fid_std=tidy[f"fid_{splits[0]}_std"])
        tidy_rows.append(tidy)
    wide = pd.DataFrame.from_dict(wide_rows, orient="index")
    wide.columns = pd.MultiIndex.from_tuples(wide.columns)
    caption = "FID of unconditional DP generation." + _fid_captions(splits, untrained, tuned)
    write_table(wide.fillna("--"), pd.DataFrame(tidy_rows), out_dir, "table4", caption)


def releases(res: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every mechanism the run releases, one row each: the generator of every cell (main
    grid and ablations) and every DP-SGD baseline, with its recorded history and the
    choices made on numbers the guarantee does not cover."""
    rows = []
    # Samplers with a tuned_on flag, from any result that records the sampler's settings.
    frames = [main_cells(res[k])[["dataset", "eps", "seed", "sampler", "tuned_on"]]
              for k in ("fid", "classify") if len(res[k])]
    used = pd.concat(frames) if frames else pd.DataFrame(columns=["dataset", "eps", "seed", "sampler", "tuned_on"])
    used = used[used["tuned_on"] != ""].drop_duplicates()
    for _, r in res["privacy"].iterrows():
        tuned = used[(used["dataset"] == r["dataset"]) & (used["eps"] == r["eps"]) & (used["seed"] == r["seed"])] \
            if len(used) and not r["variant"] else used.iloc[0:0]
        choices = [r["choices"]] if r["choices"] else []
        choices += [f"sampler {t['sampler']}: tuned on {t['tuned_on']}" for _, t in tuned.iterrows()]
        rows.append(dict(release=f"generator {layout.cell_dir(r['dataset'], r['eps'], r['seed'], r['variant'])}",
                         kind="generator", **{k: r[k] for k in RELEASE_COLUMNS}, choices="; ".join(choices)))
    for _, r in res["baseline"].iterrows():
        rows.append(dict(release=f"DP-SGD {r['classifier']} {layout.cell_dir(r['dataset'], r['eps'], r['seed'])}",
                         kind="baseline", **{k: r[k] for k in RELEASE_COLUMNS}, choices=r["choices"]))
    for _, r in res.get("pretrain", pd.DataFrame()).iterrows():
        rows.append(dict(release=f"public model {r['name']} (pre-trained without DP)", kind="public",
                         dataset=r["dataset"], eps=np.inf, seed=r["seed"], N=r["N"], steps=r["steps"],
                         eps_rdp=np.inf, eps_prv=np.inf, history=[],
                         choices=f"no privacy mechanism: {r['dataset']} must be public data"))
    df = pd.DataFrame(rows)
    return df


RELEASE_COLUMNS = ("dataset", "eps", "seed", "N", "q", "steps", "K", "C", "sigma", "delta", "target_eps", "eps_rdp",
                   "eps_prv", "history")


def dataset_totals(rel: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, epsilon of EVERYTHING the run releases on it, composed: the RDP curves
    of all the releases' recorded histories added up (PRV composing the same histories as
    the second opinion), at the smallest delta among them."""
    from dpdm.data import shares_examples

    rows = [_composed(g, ds, f"TOTAL: all {len(g)} releases on {ds}") for ds, g in rel.groupby("dataset", sort=True)]
    # Datasets that share examples (digits and either of its halves; the halves are
    # disjoint): an example of dataset d pays for the releases on every dataset holding it,
    # so those compose too, once per d whose examples are shared.
    datasets = sorted(set(rel["dataset"]))
    seen = set()
    for d in datasets:
        names = tuple(e for e in datasets if shares_examples(d, e))
        if len(names) > 1 and names not in seen:
            seen.add(names)
            g = rel[rel["dataset"].isin(names)]
            rows.append(_composed(g, d, f"TOTAL: all {len(g)} releases on {', '.join(names)} (shared examples)"))
    return pd.DataFrame(rows)


def _composed(g: pd.DataFrame, dataset: str, label: str) -> dict:
    """One TOTAL row: the releases of `g` composed (RDP; PRV as the second opinion). A
    public model among them (trained without privacy) makes the total infinite: nothing
    bounds what it reveals of those examples."""
    from dpdm import privacy

    public = g[g["kind"] == "public"]
    if len(public):
        names = ", ".join(public["release"].str.split().str[2])
        return dict(release=f"{label}: NOT PRIVATE (public model {names} saw these examples without DP)",
                    kind="total", dataset=dataset, N=int(g["N"].max()), delta=float(g["delta"].min()),
                    steps=int(g["steps"].sum()), eps_rdp=np.inf, eps_prv=np.inf,
                    choices="; ".join(c for c in g["choices"] if c))
    history = [h for hist in g["history"] for h in hist]
    delta = float(g["delta"].min())
    try:
        eps_prv = privacy.epsilon_from_history(history, delta, "prv")
    except Exception as e:  # PRV can fail numerically on long compositions; RDP is then the guarantee
        log.warning("PRV composition of %s failed (%s); the RDP total stands", label, e)
        eps_prv = np.nan
    return dict(release=label, kind="total", dataset=dataset, N=int(g["N"].max()), delta=delta,
                steps=int(g["steps"].sum()), eps_rdp=privacy.epsilon_from_history(history, delta, "rdp"),
                eps_prv=eps_prv, choices="; ".join(c for c in g["choices"] if c))


def privacy_table(res: dict[str, pd.DataFrame], out_dir: Path) -> None:
    """The ledger of every release (each cell's generator, each DP-SGD baseline): sigma,
    q, steps, K and epsilon by both accountants, then per dataset the total epsilon of
    everything the run releases on it (composition)."""
    rel = releases(res).sort_values(["dataset", "kind", "eps", "seed", "release"], kind="stable")
    tidy = pd.concat([rel, dataset_totals(rel)], ignore_index=True).drop(columns=["history"], errors="ignore")
    order = {"generator": 0, "baseline": 1, "public": 2, "total": 3}
    tidy = tidy.sort_values(["dataset", "kind"], key=lambda c: c.map(order)
                            if c.name == "kind" else c, kind="stable").reset_index(drop=True)
    tidy = tidy.astype({c: "Int64" for c in ("seed", "steps", "K") if c in tidy})  # the totals leave them blank

    def num(col, fmt):
        return [("" if pd.isna(v) else r"$\infty$" if v == np.inf else fmt(v)) for v in tidy[col]]

    wide = pd.DataFrame({
        "release": [_escape(r) for r in tidy["release"]],
        r"$\sigma$": num("sigma", lambda v: f"{v:.3f}"),
        "$q$": num("q", lambda v: f"{v:.4g}"),
        "steps": num("steps", lambda v: f"{int(v)}"),
        "$K$": num("K", lambda v: f"{int(v)}"),
        "$C$": num("C", lambda v: f"{v:g}"),
        r"$\delta$": num("delta", lambda v: f"{v:.0e}"),
        r"target $\varepsilon$": num("target_eps", lambda v: f"{v:g}"),
        r"$\varepsilon$ (RDP)": num("eps_rdp", lambda v: f"{v:.3f}"),
        r"$\varepsilon$ (PRV)": num("eps_prv", lambda v: f"{v:.3f}"),
        "choices on non-covered numbers": [_escape(c) if isinstance(c, str) else "" for c in tidy["choices"]],
    })
    caption = ("Privacy ledger of every release: $\\varepsilon$ recomputed by two accountants from the recorded "
               "$\\sigma$, sampling rate $q$ and the steps actually taken; each row holds alone. The TOTAL row of a "
               "dataset composes every release on it (RDP curves added, PRV as a second opinion): the privacy cost "
               "of publishing all of them together; datasets drawn from the same examples (digits and its halves) get "
               "a joint TOTAL too. A public model (pre-trained without DP) is listed with $\\varepsilon = \\infty$ "
               "on its data: any TOTAL over examples it saw is not private. Last column: choices made by looking at "
               "numbers the guarantee does not cover.")
    write_table(wide, tidy, out_dir, "privacy", caption)


# ----------------------------------------------------------------------------
# Figures.


def _save_figure(fig, out_dir: Path, name: str) -> None:
    import matplotlib.pyplot as plt

    for ext in ("pdf", "png"):
        with atomic_path(out_dir / layout.FIGURE.format(name=name, ext=ext)) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)


def _subplots(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(n, 1), figsize=(4.2 * max(n, 1), 3.4), squeeze=False)
    return fig, axes[0]


def fig_fid_vs_eps(res, out_dir: Path) -> None:
    """FID against eps per sampler and reference split; the training split's curves are
    dashed and labelled as not covered by the DP guarantee."""
    fid = main_cells(res["fid"])
    datasets = sorted(fid["dataset"].unique()) if len(fid) else []
    splits = _fid_splits(fid)
    fig, axes = _subplots(len(datasets))
    for ax, ds in zip(axes, datasets):
        for split in splits:
            agg = aggregate(fid[fid["dataset"] == ds], ["sampler", "eps"], f"fid_{split}")
            for sampler, g in agg.groupby("sampler"):
                ax.errorbar(g["eps"], g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3,
                            linestyle="--" if split == "train" else "-",
                            label=f"{sampler}, {split}" + (" (NOT covered by DP)" if split == "train" else ""))
        ax.set_xscale("log")
        ax.set_xlabel("ε")
        ax.set_ylabel("FID" + (" (untrained extractor: TEST ONLY)" if fid["test_only"].any() else ""))
        ax.set_title(PRETTY_DATASET.get(ds, ds))
        ax.legend(title="sampler, reference split", fontsize=6)
    if "train" in splits:
        fig.suptitle("FID against the training split is a statistic of the private data: not covered by the DP "
                     "guarantee", fontsize=7, y=1.02)
    _save_figure(fig, out_dir, "fid_vs_eps")


def fig_acc_vs_eps(res, out_dir: Path) -> None:
    clf, base = main_cells(res["classify"]), res["baseline"]
    datasets = sorted(clf["dataset"].unique()) if len(clf) else []
    fig, axes = _subplots(len(datasets))
    for ax, ds in zip(axes, datasets):
        agg = aggregate(clf[clf["dataset"] == ds], ["sampler", "classifier", "eps"], "acc")
        for (sampler, c), g in agg.groupby(["sampler", "classifier"]):
            ax.errorbar(g["eps"], g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3,
                        label=f"DPDM {sampler}: {PRETTY_CLASSIFIER[c]}")
        if len(base):
            bagg = aggregate(base[base["dataset"] == ds], ["classifier", "eps"], "acc")
            for c, g in bagg.groupby("classifier"):
                ax.errorbar(g["eps"], g["mean"], yerr=g["std"].fillna(0), marker="s", linestyle="--", capsize=3,
                            label=f"DP-SGD real: {PRETTY_CLASSIFIER[c]}")
        ax.set_xscale("log")
        ax.set_xlabel("ε")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(PRETTY_DATASET.get(ds, ds))
        ax.legend(fontsize=6)
    _save_figure(fig, out_dir, "acc_vs_eps")


def fig_loss_curves(res, out_dir: Path) -> None:
    """Training losses (opt-in, report.loss_curves): NOT covered by the DP guarantee."""
    m = main_cells(res["metrics"])
    datasets = sorted(m["dataset"].unique()) if len(m) else []
    fig, axes = _subplots(len(datasets))
    for ax, ds in zip(axes, datasets):
        for (eps, seed), g in m[m["dataset"] == ds].groupby(["eps", "seed"]):
            ax.plot(g["step"], g["loss"], label=f"ε={eps:g}, seed {seed}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (K-averaged)")
        ax.set_yscale("log")
        ax.set_title(PRETTY_DATASET.get(ds, ds))
        ax.legend(fontsize=7)
    fig.suptitle("Diagnostic only: training losses are computed on private data without noise "
                 "and are NOT covered by the DP guarantee; do not publish", fontsize=7, y=1.02)
    _save_figure(fig, out_dir, "loss_curves")


def fig_samples(res, out_dir: Path, dataset: str) -> None:
    """The sample grid of every (eps, sampler) of one dataset (first seed); a panel
    says so when the inputs hold no grid for the dataset."""
    import matplotlib.image as mpimg

    grids = main_cells(res["grid"])
    sel = grids[grids["dataset"] == dataset] if len(grids) else grids
    sel = sel.sort_values(["sampler", "eps", "seed"]).drop_duplicates(["sampler", "eps"]) if len(sel) else sel
    fig, axes = _subplots(len(sel))
    for ax, (_, row) in zip(axes, sel.iterrows()):
        ax.imshow(mpimg.imread(row["path"]), cmap="gray")
        ax.set_title(f"ε={row['eps']:g}, {row['sampler']}")
        ax.axis("off")
    if not len(sel):
        axes[0].text(0.5, 0.5, f"no sample grid of {dataset} among the report's inputs", ha="center", va="center")
        axes[0].axis("off")
    _save_figure(fig, out_dir, f"samples_{dataset}")


# ----------------------------------------------------------------------------
# Entry point.


def build_report(inputs: list[layout.Entry], out_dir: Path, loss_curves: bool = False) -> None:
    """Write every table and figure that `inputs` (the manifest's entries) can fill
    into out_dir/{tables,figures}.

    loss_curves: the opt-in (config report.loss_curves) to read the cells' private
    training metrics and draw figures/loss_curves, labelled as not covered by DP."""
    from dpdm.data import DATASETS

    if not inputs:
        raise DPDMError("the report's manifest lists no result file")
    res = collect(inputs, loss_curves)
    if loss_curves and res["metrics"].empty:
        raise DPDMError("report --loss-curves needs the cells' private/train_metrics.csv among its inputs")
    if res["privacy"].empty:
        raise DPDMError("no privacy.json among the report's inputs: every table needs a trained cell")
    datasets = set(res["privacy"]["dataset"])
    conditional = {d for d in datasets if DATASETS[d].num_classes > 0}
    privacy_table(res, out_dir)
    if conditional:
        table1(res, out_dir)
        fig_acc_vs_eps(res, out_dir)
    if not res["baseline"].empty:
        table2(res, out_dir)
    if datasets - conditional and not res["fid"].empty:
        table4(res, out_dir, datasets - conditional)
    if not res["fid"].empty:
        fig_fid_vs_eps(res, out_dir)
    if loss_curves:
        fig_loss_curves(res, out_dir)
    for ds in sorted(datasets):
        fig_samples(res, out_dir, ds)
    log.info("wrote tables and figures to %s", out_dir)


# ----------------------------------------------------------------------------
# Ablations (paper Tables 3, 5, 6): one table and one figure per named grid.
#
# The manifest comes from dpdm.config.plan_grid: rows of (variant, sampler, eps, seed)
# that point at the cell folder holding the model and the sampler's name there.


def _ablation_label(row: dict, manifest: dict) -> str:
    variants = {r["variant"] for r in manifest["rows"]}
    samplers = {r["sampler"] for r in manifest["rows"]}
    if len(variants) > 1 and len(samplers) > 1:
        return f"{row['variant']} / {row['sampler']}"
    return row["variant"] if len(variants) > 1 else row["sampler"]


def collect_ablation(manifest: dict, results_dir: Path) -> pd.DataFrame:
    """One row per (variant, sampler, eps, seed) with its FID and classifier accuracies (%)."""
    rows = []
    for r in manifest["rows"]:
        cell = f"{results_dir}/{r['cell']}"
        fid = load_json(layout.cell_file("fid", cell, r["cell_sampler"])) if manifest.get("fid", True) else \
            {"fid": np.nan, "reference": {"split": None}}
        row = dict(label=_ablation_label(r, manifest), variant=r["variant"], sampler=r["sampler"], x=r["x"],
                   eps=float(r["eps"]), seed=int(r["seed"]), cell=r["cell"], fid=fid["fid"],
                   fid_split=(fid.get("reference") or {}).get("split", "train"),
                   test_only=bool(fid.get("test_only", False)))
        for c in r.get("classifiers", []):
            row[c] = 100.0 * load_json(layout.cell_file("classify", cell, r["cell_sampler"], c))["test_acc"]
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_table(manifest: dict, df: pd.DataFrame, out_dir: Path) -> None:
    """Rows: the ablation's variants (or samplers); columns: eps x (FID, accuracies)."""
    classifiers = [c for c in CLASSIFIERS if c in manifest["classifiers"]]
    untrained = bool(df["test_only"].any())
    split = df["fid_split"].iloc[0]
    fid_col = _fid_column(split, untrained) if split else "FID"
    order = list(dict.fromkeys(df["label"]))
    tidy_rows, wide_rows = [], {}
    for (label, eps), g in sorted(df.groupby(["label", "eps"], sort=False), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        m, s, n = _mean_std(g["fid"])
        tidy = dict(ablation=manifest["name"], label=label, variant=g["variant"].iloc[0], sampler=g["sampler"].iloc[0],
                    x=g["x"].iloc[0], eps=eps, fid_mean=m, fid_std=s, seeds=n, fid_test_only=untrained,
                    fid_split=split, fid_covered_by_dp=split != "train")
        wide = wide_rows.setdefault(_escape(label), {})
        wide[(_latex_eps(eps), fid_col)] = _fmt(m, s, n, 1, True) if split else NOT_COMPUTED
        for c in classifiers:
            cm, cs, cn = _mean_std(g[c])
            tidy[f"{c}_mean"], tidy[f"{c}_std"] = cm, cs
            wide[(_latex_eps(eps), PRETTY_CLASSIFIER[c] + r" (\%)")] = _fmt(cm, cs, cn, 1, True)
        tidy_rows.append(tidy)
    wide = pd.DataFrame.from_dict(wide_rows, orient="index")
    wide.columns = pd.MultiIndex.from_tuples(wide.columns)
    caption = (f"Ablation: {_escape(manifest['title'])} ({PRETTY_DATASET.get(manifest['dataset'], manifest['dataset'])}). "
               "FID and test accuracy on real data of classifiers trained on the samples.")
    caption += _fid_captions([split], untrained, False) if split else " FID was not computed (config fid.enabled: false)."
    write_table(wide.fillna("--"), pd.DataFrame(tidy_rows), out_dir, manifest["table"], caption)


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def ablation_figure(manifest: dict, df: pd.DataFrame, out_dir: Path) -> None:
    """A line plot against the varied value when it is a number (e.g. K), else grouped
    bars per eps (parameterisations, samplers). Error bars: std over seeds."""
    metrics = (["fid"] if manifest.get("fid", True) else []) + [c for c in CLASSIFIERS if c in manifest["classifiers"]]
    split = df["fid_split"].iloc[0]
    names = {"fid": f"FID ({split})" + (" NOT covered by DP" if split == "train" else "")
             + (" (untrained: TEST ONLY)" if df["test_only"].any() else "")}
    names.update({c: f"{PRETTY_CLASSIFIER[c]} accuracy (%)" for c in CLASSIFIERS})
    fig, axes = _subplots(len(metrics))
    line = manifest.get("vary") and _numeric(df["x"].tolist())
    order = list(dict.fromkeys(df["label"]))
    for ax, metric in zip(axes, metrics):
        if line:
            agg = aggregate(df, ["eps", "sampler", "x"], metric)
            for (eps, sampler), g in agg.groupby(["eps", "sampler"]):
                ax.errorbar(g["x"], g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3,
                            label=f"ε={eps:g}" + (f", {sampler}" if agg["sampler"].nunique() > 1 else ""))
            xs = sorted(df["x"].unique())
            if min(xs) > 0 and max(xs) / min(xs) >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.set_xlabel(manifest["vary"])
        else:
            agg = aggregate(df, ["eps", "label"], metric)
            eps_values = sorted(agg["eps"].unique())
            width = 0.8 / max(len(order), 1)
            for i, label in enumerate(order):
                g = agg[agg["label"] == label].set_index("eps").reindex(eps_values)
                pos = np.arange(len(eps_values)) + (i - (len(order) - 1) / 2) * width
                ax.bar(pos, g["mean"], width, yerr=g["std"].fillna(0), capsize=3, label=label)
            ax.set_xticks(np.arange(len(eps_values)), [f"ε={e:g}" for e in eps_values])
        ax.set_ylabel(names[metric])
        ax.legend(fontsize=7)
    fig.suptitle(f"{manifest['title']} ({PRETTY_DATASET.get(manifest['dataset'], manifest['dataset'])})", fontsize=9)
    _save_figure(fig, out_dir, manifest["table"])


def build_ablation_report(manifest: dict, out_dir: Path) -> None:
    """The table and figure of one ablation, from the result files of its cells under out_dir."""
    if not manifest.get("rows"):
        raise DPDMError(f"ablation '{manifest.get('name')}' has no rows: give it eps values and variants")
    df = collect_ablation(manifest, out_dir)
    ablation_table(manifest, df, out_dir)
    ablation_figure(manifest, df, out_dir)
    log.info("wrote ablation %s to %s/tables and %s/figures", manifest["name"], out_dir, out_dir)


# ----------------------------------------------------------------------------
# The privacy audit (dpdm.audit): empirical lower bound vs the accountant's epsilon.


def build_audit_report(paths: list[Path], out_dir: Path) -> None:
    """tables/audit.{tex,csv} (one row per audited cell) and figures/audit.{pdf,png} (the
    score distributions of included and excluded canaries) from audit.json files."""
    if not paths:
        raise DPDMError("report-audit needs at least one audit.json")
    audits = [load_json(p) for p in paths]
    audits.sort(key=lambda a: (a["cell"]["dataset"], a["cell"]["eps"], a["cell"]["seed"]))
    tidy, wide = [], {}
    for a in audits:
        c, mech = a["cell"], a["mechanism"]
        tidy.append(dict(dataset=c["dataset"], eps=c["eps"], seed=c["seed"], eps_accountant=a["eps_accountant"],
                         accountant=a["accountant"], eps_lower_bound=a["eps_lower_bound"],
                         confidence=a["confidence"], delta=a["delta"], canaries=a["canaries"],
                         guesses=a["guesses"], correct=a["correct"], noise_multiplier=mech["noise_multiplier"],
                         sample_rate=mech["sample_rate"], steps=mech["steps"], passed=a["passed"],
                         test_only_break=a.get("test_only_break") or ""))
        wide[(PRETTY_DATASET.get(c["dataset"], c["dataset"]), _latex_eps(c["eps"]), str(c["seed"]))] = {
            "accountant $\\varepsilon$": f"{a['eps_accountant']:.2f}",
            "empirical $\\varepsilon \\geq$": f"{a['eps_lower_bound']:.2f}",
            "correct / guesses": f"{a['correct']} / {a['guesses']}",
            "canaries": str(a["canaries"]),
            "audit": ("passed" if a["passed"] else "FAILED") + (" (broken on purpose: TEST ONLY)"
                                                                if a.get("test_only_break") else ""),
        }
    table = pd.DataFrame.from_dict(wide, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["", "", "seed"])
    conf = {a["confidence"] for a in audits}
    caption = ("One-run privacy audit (Steinke, Nasr \\& Jagielski 2023) of each audited cell's DP-SGD mechanism "
               "with gradient canaries, each included by a fair coin: the empirical lower bound on $\\varepsilon$ at "
               f"{', '.join(f'{100 * c:g}' for c in sorted(conf))}\\% confidence, from the correct membership "
               "guesses, beside the accountant's $\\varepsilon$ (an upper bound). A lower bound above the "
               "accountant's would mean the mechanism or its accounting is broken.")
    write_table(table, pd.DataFrame(tidy), out_dir, layout.AUDIT_TABLE, caption)
    _fig_audit(audits, out_dir)


def _fig_audit(audits: list[dict], out_dir: Path) -> None:
    fig, axes = _subplots(len(audits))
    for ax, a in zip(axes, audits):
        scores, coins = np.asarray(a["scores"]), np.asarray(a["included_coins"], dtype=bool)
        bins = np.linspace(scores.min(), scores.max(), 40)
        ax.hist(scores[~coins], bins=bins, alpha=0.6, label=f"excluded ({(~coins).sum()})")
        ax.hist(scores[coins], bins=bins, alpha=0.6, label=f"included ({coins.sum()})")
        c = a["cell"]
        ax.set_title(f"{c['dataset']} eps={c['eps']:g} seed {c['seed']}: eps >= {a['eps_lower_bound']:.2f} "
                     f"(accountant {a['eps_accountant']:.2f})" + (" BROKEN (TEST ONLY)"
                                                                  if a.get("test_only_break") else ""), fontsize=8)
        ax.set_xlabel("canary score (units of C)")
        ax.legend(fontsize=7)
    _save_figure(fig, out_dir, layout.AUDIT_TABLE)
