# Shared helpers: config merge and validation, cells, resolved settings, resources.
# All logic that decides *what* a cell is lives in dpdm/config.py; this file only
# adapts it to Snakemake (wildcards, params, resources).

import json
import os
import sys

sys.path.insert(0, workflow.basedir)  # import the repo's dpdm even without `pip install -e .`

from dpdm import config as dpcfg
from dpdm.artifacts import DPDMError
from dpdm.data import DATASETS


try:
    _merged = dpcfg.with_defaults(config)
    dpcfg.validate(_merged)
except DPDMError as e:
    raise WorkflowError(str(e)) from None
config.clear()
config.update(_merged)

DATA = config["paths"]["data"]
RESULTS = config["paths"]["results"]
CELL = RESULTS + "/{dataset}/{eps}/seed{seed}"
CELLS = dpcfg.iter_cells(config)  # [(dataset, eps, seed), ...]
FID_WEIGHTS_DEFAULT = "weights/pt_inception-2015-12-05-6726825d.pth"


wildcard_constraints:
    dataset="|".join(DATASETS),
    eps=r"eps[0-9.e+-]+",
    seed=r"[0-9]+",
    sampler=r"[A-Za-z0-9-]+",
    classifier="logreg|mlp|cnn",
    split="train|test",


def settings_of(wildcards):
    """Resolved settings of the cell named by the wildcards (dpdm.config.resolve_cell)."""
    return dpcfg.resolve_cell(
        config, wildcards.dataset, dpcfg.parse_eps(wildcards.eps), int(wildcards.seed)
    )


# The sections of a cell's settings each stage reads. A rule's params hold only these,
# so changing e.g. `classify.epochs` reruns the classifiers but never retrains a model.
STAGE_SECTIONS = {
    "train": ("cell", "device", "data", "model", "diffusion", "train", "privacy"),
    "sample": ("cell", "device", "sample"),
    "fid": ("cell",),
    "classify": ("cell", "device", "classify"),
    "baseline": ("cell", "device", "privacy", "baseline"),
}


def stage_settings(stage):
    """A params function: the JSON of the cell's settings that `stage` reads
    (for `sample`, only the sampler named by the wildcard)."""

    def settings_json(wildcards):
        full = settings_of(wildcards)
        part = {k: full[k] for k in STAGE_SECTIONS[stage]}
        if stage == "sample":
            if wildcards.sampler not in full["samplers"]:
                raise WorkflowError(
                    f"cell {wildcards.dataset}/{wildcards.eps} has no sampler '{wildcards.sampler}'; "
                    f"its samplers are {sorted(full['samplers'])}"
                )
            part["samplers"] = {wildcards.sampler: full["samplers"][wildcards.sampler]}
        return json.dumps(part, sort_keys=True, separators=(",", ":"))

    return settings_json


def dataset_settings(dataset):
    """Settings shared by every cell of a dataset (used by data preparation)."""
    ds = config["datasets"].get(dataset) or {}
    return dpcfg.deep_merge(config["defaults"], ds.get("settings") or {})


def is_conditional(dataset):
    return DATASETS[dataset].num_classes > 0


def code_hash(*modules):
    """Content hash of the dpdm modules a rule runs, as a param: Snakemake does not
    track imported code, so a change to these files reruns the rules that use them."""
    import hashlib

    h = hashlib.sha256()
    for m in ("__init__", "artifacts", "config", "cli") + modules:
        with open(os.path.join(workflow.basedir, "dpdm", m + ".py"), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def rule_resources(rule_name):
    """Resources of a rule from config `resources`; runtime and memory grow with
    the attempt so a retry (profile `retries`) gets a larger allocation."""
    r = dict(config["resources"].get("default", {}))
    r.update(config["resources"].get(rule_name, {}))
    return {
        "runtime": lambda wc, attempt: int(r.get("runtime", 60) * attempt),
        "mem_mb": lambda wc, attempt: int(r.get("mem_mb", 4000) * attempt),
        "cpus_per_task": int(r.get("cpus_per_task", 1)),
        "gpu": int(r.get("gpu", 0)),
        "slurm_extra": r.get("slurm_extra", ""),
    }


def rule_threads(rule_name):
    """Threads of a local job = its SLURM cpus_per_task (Snakemake exports them as
    OMP_NUM_THREADS etc., so torch does not oversubscribe the cores)."""
    r = dict(config["resources"].get("default", {}))
    r.update(config["resources"].get(rule_name, {}))
    return int(r.get("cpus_per_task", 1))


def fid_weights_input(wildcards=None):
    """The Inception weights file the FID rules need (nothing for the untrained extractor)."""
    if config["fid"]["extractor"] != "inception":
        return []
    return [dpcfg.env_or(config["paths"]["fid_weights"], "DPDM_FID_WEIGHTS") or FID_WEIGHTS_DEFAULT]


def fid_args():
    w = fid_weights_input()
    args = f"--extractor {config['fid']['extractor']} --batch-size {config['fid']['batch_size']}"
    return args + (f" --weights {w[0]}" if w else "")


def samplers_of(dataset, eps, seed):
    return list(dpcfg.resolve_cell(config, dataset, eps, seed)["samplers"])


def cell_dir(dataset, eps, seed):
    return f"{RESULTS}/{dataset}/{dpcfg.eps_tag(eps)}/seed{seed}"


def baseline_cells():
    return [
        (ds, eps, seed)
        for exp in config["experiments"]
        if exp.get("baseline", is_conditional(exp["dataset"]))
        for ds in [exp["dataset"]]
        for eps in exp["eps"]
        for seed in exp.get("seeds", config["seeds"])
    ]


def all_cell_outputs():
    """Every per-cell result that the report reads."""
    out = []
    for ds, eps, seed in CELLS:
        d = cell_dir(ds, eps, seed)
        out += [f"{d}/model.pt", f"{d}/privacy.json", f"{d}/train_metrics.csv"]
        settings = dpcfg.resolve_cell(config, ds, eps, seed)
        for s in settings["samplers"]:
            out += [f"{d}/samples_{s}.npz", f"{d}/grid_{s}.png", f"{d}/fid_{s}.json"]
            if is_conditional(ds):
                out += [f"{d}/classify_{s}_{c}.json" for c in settings["classify"]["classifiers"]]
    for ds, eps, seed in baseline_cells():
        settings = dpcfg.resolve_cell(config, ds, eps, seed)
        out += [
            f"{RESULTS}/{ds}/baseline/{dpcfg.eps_tag(eps)}/seed{seed}/{c}.json"
            for c in settings["baseline"]["classifiers"]
        ]
    return out


def report_json_inputs():
    return [p for p in all_cell_outputs() if p.endswith(".json") or p.endswith(".csv")]


def report_tables():
    """The paper's tables this config can fill (dpdm/report.py writes exactly these)."""
    datasets = {ds for ds, _, _ in CELLS}
    tables = ["privacy"]
    if any(is_conditional(ds) for ds in datasets):
        tables.append("table1")
    if baseline_cells():
        tables.append("table2")
    if any(not is_conditional(ds) for ds in datasets):
        tables.append("table4")
    return tables


def report_figures():
    datasets = sorted({ds for ds, _, _ in CELLS})
    figs = ["fid_vs_eps", "loss_curves"] + [f"samples_{ds}" for ds in datasets]
    if any(is_conditional(ds) for ds in datasets):
        figs.append("acc_vs_eps")
    return figs


def report_outputs():
    if not CELLS:
        return []
    out = [f"{RESULTS}/tables/{t}.{ext}" for t in report_tables() for ext in ("tex", "csv")]
    out += [f"{RESULTS}/figures/{f}.{ext}" for f in report_figures() for ext in ("pdf", "png")]
    return out
