"""The results layout: every folder and file name of a run, written once.

    {results}/{dataset}/eps{eps}/[{variant}/]seed{seed}/   one trained model (a cell): CELL_FILES
    {results}/{dataset}/baseline/eps{eps}/seed{seed}/{classifier}.json   a DP-SGD classifier on real data
    {results}/{dataset}/eps{eps}/audit/seed{seed}/audit.json   a privacy audit of that cell's mechanism
    {results}/tables/{name}.{tex,csv}   {results}/figures/{name}.{pdf,png}   the report

The workflow builds its rule patterns and targets from these templates (Snakemake
fills the `{...}` wildcards), the trainer and the report write and read files by
these names, and the report learns what each input is from a manifest of `Entry`s
the workflow writes (`REPORT_MANIFEST`), never by parsing a path.
"""

from __future__ import annotations

import dataclasses
import math

CELL = "{dataset}/{eps}/{variant}seed{seed}"  # {eps} is eps_tag(eps); {variant} is "" or "name/"
CELL_FILES = {
    "model": "model.pt",
    "privacy": "privacy.json",  # the ledger, written last: its presence marks a finished cell
    "metrics": "private/train_metrics.csv",  # training losses: not covered by DP, so private
    "run": "private/run.json",  # sha256 of the data read, timings
    "samples": "samples_{sampler}.npz",
    "grid": "grid_{sampler}.png",
    "fid": "fid_{sampler}.json",
    "classify": "classify_{sampler}_{classifier}.json",
    "judge": "judge_{sampler}.json",
    # nearest training images of the samples: NOT covered by DP (dpdm.memorisation)
    "memorisation": "memorisation_{sampler}.json",
    "pairs": "private/memorisation_pairs_{sampler}.png",  # shows training images
    "pairs_published": "memorisation_pairs_{sampler}.png",  # only with memorisation.publish_pairs
}
AUDIT_FOLDER = "audit"  # reserved: no ablation variant may take this name
AUDIT_DIR = "{dataset}/{eps}/" + AUDIT_FOLDER + "/seed{seed}"  # a privacy audit (dpdm.audit), never a model
AUDIT = AUDIT_DIR + "/audit.json"
BASELINE_DIR = "{dataset}/baseline/{eps}/seed{seed}"
BASELINE = BASELINE_DIR + "/{classifier}.json"
TABLE = "tables/{name}.{ext}"  # ext: tex, csv
FIGURE = "figures/{name}.{ext}"  # ext: pdf, png
REPORT_TABLES = ("privacy", "table1", "table2", "table4")  # the main report's (an ablation's are its own)
AUDIT_TABLE = "audit"  # tables/audit.* and figures/audit.*: every audited cell
REPORT_MANIFEST = "tables/report_inputs.json"  # what the report reads (rule report_manifest)


def eps_tag(eps: float) -> str:
    """0.2 -> 'eps0.2', 1.0 -> 'eps1', 10 -> 'eps10' (as the config writes it)."""
    return f"eps{float(eps):g}"


def cell_dir(dataset: str, eps: float, seed: int, variant: str = "") -> str:
    """A cell's folder relative to paths.results."""
    return CELL.format(dataset=dataset, eps=eps_tag(eps), variant=f"{variant}/" if variant else "", seed=int(seed))


def cell_file(kind: str, cell: str, sampler: str = "", classifier: str = "") -> str:
    """The file of `kind` (a CELL_FILES key) in the cell folder `cell`."""
    return f"{cell}/{CELL_FILES[kind].format(sampler=sampler, classifier=classifier)}"


def audit_file(dataset: str, eps: float, seed: int) -> str:
    return AUDIT.format(dataset=dataset, eps=eps_tag(eps), seed=int(seed))


def baseline_file(dataset: str, eps: float, seed: int, classifier: str) -> str:
    return BASELINE.format(dataset=dataset, eps=eps_tag(eps), seed=int(seed), classifier=classifier)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One result file and what it is: the report's unit of input."""

    kind: str  # a CELL_FILES key or "baseline"
    path: str
    dataset: str
    eps: float
    seed: int
    variant: str = ""  # "" for a main cell
    sampler: str = ""
    classifier: str = ""


def cell_entries(results: str, dataset: str, eps: float, seed: int, variant: str, classifiers: dict,
                 fid: bool, judge: bool, memorisation: str = "") -> list[Entry]:
    """Every file one cell produces: model, ledger, metrics and, per sampler (the keys of
    `classifiers`, each with its list of classifiers), samples, grid, FID (`fid`),
    classifier results, the judge's (`judge`) and the memorisation check with its
    figure (`memorisation`: "" none, "pairs" or "pairs_published", where the figure goes)."""
    cell = f"{results}/{cell_dir(dataset, eps, seed, variant)}"

    def entry(kind, sampler="", classifier=""):
        return Entry(kind, cell_file(kind, cell, sampler, classifier), dataset, float(eps), int(seed), variant,
                     sampler, classifier)

    out = [entry("model"), entry("privacy"), entry("metrics")]
    for sampler, names in classifiers.items():
        out += [entry("samples", sampler), entry("grid", sampler)] + ([entry("fid", sampler)] if fid else [])
        out += [entry("classify", sampler, c) for c in names]
        out += [entry("judge", sampler)] if judge else []
        out += [entry("memorisation", sampler), entry(memorisation, sampler)] if memorisation else []
    return out


PRETRAIN_RECORD = "pretrain/{name}/pretrain.json"


def pretrain_entry(results: str, name: str, dataset: str) -> Entry:
    """A public model's record: a release WITHOUT privacy (eps = inf) on its dataset; the
    variant field holds the model's name."""
    return Entry("pretrain", f"{results}/{PRETRAIN_RECORD.format(name=name)}", dataset, math.inf, 0, name)


def baseline_entries(results: str, dataset: str, eps: float, seed: int, classifiers: list) -> list[Entry]:
    return [Entry("baseline", f"{results}/{baseline_file(dataset, eps, seed, c)}", dataset, float(eps), int(seed),
                  classifier=c) for c in classifiers]
