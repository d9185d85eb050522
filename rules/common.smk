# Shared helpers: config merge and validation, the grid of cells, resolved settings,
# resources. Everything that decides *what* a cell is lives in dpdm/config.py; this
# file only adapts it to Snakemake (wildcards, params, resources).

import json
import os
import sys

sys.path.insert(0, workflow.basedir)  # import the repo's dpdm even without `pip install -e .`

from dpdm import config as dpcfg
from dpdm.artifacts import DPDMError
from dpdm.data import DATASETS


def _load_config():
    """The config rebuilt by dpdm.config's rules (config/README.md): the package defaults,
    the Snakefile's configfile, each --configfile in order, then --config. Snakemake's own
    merge blends every mapping key by key, which would mix e.g. a --configfile's samplers
    or ablations with the paper's. Jobs get the same --configfiles and --config."""
    cli_files = [os.path.abspath(f) for f in workflow.config_settings.configfiles]
    files = [f for f in workflow.configfiles if os.path.abspath(f) not in cli_files] + cli_files
    return dpcfg.load_config(files, [dict(workflow.config_settings.config or {})])


try:
    _merged = _load_config()
    config.clear()
    config.update(_merged)
    GRID = dpcfg.plan_grid(config)
except DPDMError as e:
    raise WorkflowError(str(e)) from None

DATA = config["paths"]["data"]
RESULTS = config["paths"]["results"]
FID_WEIGHTS_DEFAULT = "weights/pt_inception-2015-12-05-6726825d.pth"
MAIN_CELLS = [c for c in GRID.cells.values() if not c.variant]


def data_path(path):
    """A file of the prepared data: {paths.data}/<path>."""
    return os.path.join(DATA, path)


def results_path(path):
    """A file under {paths.results}/<path>."""
    return os.path.join(RESULTS, path)


def cell_path(path):
    """A file of a cell: {results}/{dataset}/{eps}/[{variant}/]seed{seed}/<path>. The
    variant wildcard is empty for a main cell and 'name/' for an ablation's own model."""
    return os.path.join(RESULTS, "{dataset}", "{eps}", "{variant}seed{seed}", path)


def plan_of(wildcards):
    """The planned cell (dpdm.config.CellPlan) named by the wildcards."""
    key = f"{wildcards.dataset}/{wildcards.eps}/{wildcards.variant}seed{wildcards.seed}"
    if key not in GRID.cells:
        raise WorkflowError(f"{results_path(key)} is not a cell of this config's grid (experiments, ablations)")
    return GRID.cells[key]


def settings_of(wildcards):
    """Resolved settings of the cell named by the wildcards (dpdm.config.cell_settings)."""
    return dpcfg.cell_settings(config, plan_of(wildcards))


# The sections of a cell's settings each stage reads. A rule's params hold only these,
# so changing e.g. `classify.epochs` reruns the classifiers but never retrains a model.
STAGE_SECTIONS = {
    "train": ("cell", "device", "data", "model", "diffusion", "train", "privacy"),
    "sample": ("cell", "device", "sample"),
    "fid": ("cell",),
    "classify": ("cell", "device", "classify"),
    "baseline": ("cell", "device", "privacy", "baseline"),
}


def _settings_json(settings, stage):
    return json.dumps({k: settings[k] for k in STAGE_SECTIONS[stage]}, sort_keys=True, separators=(",", ":"))


def stage_settings(stage):
    """A params function: the JSON of the cell's settings that `stage` reads
    (for `sample`, only the sampler named by the wildcard)."""

    def settings_json(wildcards):
        full = settings_of(wildcards)
        if stage == "sample":
            if wildcards.sampler not in full["samplers"]:
                raise WorkflowError(
                    f"cell {plan_of(wildcards).path} has no sampler '{wildcards.sampler}'; "
                    f"its samplers are {sorted(full['samplers'])}"
                )
            full["samplers"] = {wildcards.sampler: full["samplers"][wildcards.sampler]}
            return json.dumps({k: full[k] for k in STAGE_SECTIONS[stage] + ("samplers",)}, sort_keys=True,
                              separators=(",", ":"))
        return _settings_json(full, stage)

    return settings_json


def baseline_settings(wildcards):
    """Settings of a DP-SGD baseline: those of the main cell (dataset, eps, seed)."""
    settings = dpcfg.resolve_cell(config, wildcards.dataset, dpcfg.parse_eps(wildcards.eps), int(wildcards.seed))
    return _settings_json(settings, "baseline")


def dataset_settings(dataset):
    """Settings shared by every cell of a dataset (used by data preparation)."""
    ds = config["datasets"].get(dataset) or {}
    return dpcfg.deep_merge(config["defaults"], ds.get("settings") or {})


def is_conditional(dataset):
    return DATASETS[dataset].num_classes > 0


def code_hash(*modules):
    """Content hash of the dpdm modules that the jobs of a rule run, used as a param.
    Snakemake does not track imported code; with this, a change to these files reruns
    the rules that use them."""
    import hashlib

    h = hashlib.sha256()
    for m in ("__init__", "artifacts", "config", "cli") + modules:
        with open(os.path.join(workflow.basedir, "dpdm", f"{m}.py"), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _resources_of(rule_name):
    r = dict(config["resources"].get("default", {}))
    r.update(config["resources"].get(rule_name, {}))
    return r


def rule_resources(rule_name):
    """Resources of a rule from config `resources`; runtime and memory grow with
    the attempt so a retry (profile `retries`) gets a larger allocation."""
    r = _resources_of(rule_name)
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
    return int(_resources_of(rule_name).get("cpus_per_task", 1))


def fid_weights_input(wildcards=None):
    """The Inception weights file the FID rules need (nothing for the untrained extractor)."""
    if config["fid"]["extractor"] != "inception":
        return []
    return [dpcfg.env_or(config["paths"]["fid_weights"], "DPDM_FID_WEIGHTS") or FID_WEIGHTS_DEFAULT]


def fid_args():
    w = fid_weights_input()
    args = f"--extractor {config['fid']['extractor']} --batch-size {config['fid']['batch_size']}"
    return args + (f" --weights {w[0]}" if w else "")


def cell_outputs(plan):
    """Every result of one planned cell: model, ledger, metrics, samples, FIDs, classifiers."""
    d = results_path(plan.path)
    out = [f"{d}/model.pt", f"{d}/privacy.json", f"{d}/train_metrics.csv"]
    for s, classifiers in plan.classifiers.items():
        out += [f"{d}/samples_{s}.npz", f"{d}/grid_{s}.png", f"{d}/fid_{s}.json"]
        out += [f"{d}/classify_{s}_{c}.json" for c in classifiers]
    return out


def baseline_outputs():
    out = []
    for exp in config["experiments"]:
        if not exp.get("baseline", is_conditional(exp["dataset"])):
            continue
        for eps in exp["eps"]:
            for seed in exp.get("seeds", config["seeds"]):
                settings = dpcfg.resolve_cell(config, exp["dataset"], eps, seed)
                d = results_path(f"{exp['dataset']}/baseline/{dpcfg.eps_tag(eps)}/seed{seed}")
                out += [f"{d}/{c}.json" for c in settings["baseline"]["classifiers"]]
    return out


def main_outputs():
    """Every result of the main grid that the report reads (with the sample grids)."""
    return [p for plan in MAIN_CELLS for p in cell_outputs(plan)] + baseline_outputs()


def report_tables():
    """The paper's tables this config can fill (dpdm/report.py writes exactly these)."""
    datasets = {c.dataset for c in MAIN_CELLS}
    tables = ["privacy"]
    if any(is_conditional(ds) for ds in datasets):
        tables.append("table1")
    if baseline_outputs():
        tables.append("table2")
    if any(not is_conditional(ds) for ds in datasets):
        tables.append("table4")
    return tables


def report_figures():
    datasets = sorted({c.dataset for c in MAIN_CELLS})
    figs = ["fid_vs_eps", "loss_curves"] + [f"samples_{ds}" for ds in datasets]
    if any(is_conditional(ds) for ds in datasets):
        figs.append("acc_vs_eps")
    return figs


def report_outputs():
    if not MAIN_CELLS:
        return []
    out = [results_path(f"tables/{t}.{ext}") for t in report_tables() for ext in ("tex", "csv")]
    out += [results_path(f"figures/{f}.{ext}") for f in report_figures() for ext in ("pdf", "png")]
    return out


def ablation_inputs(name):
    """The result files an ablation's table reads (FIDs, classifiers, ledgers)."""
    out = []
    for row in GRID.ablations[name]["rows"]:
        d = results_path(row["cell"])
        out += [f"{d}/privacy.json", f"{d}/fid_{row['cell_sampler']}.json"]
        out += [f"{d}/classify_{row['cell_sampler']}_{c}.json" for c in row["classifiers"]]
    return list(dict.fromkeys(out))


def ablation_outputs(name):
    table = GRID.ablations[name]["table"]
    return {
        "tex": results_path(f"tables/{table}.tex"),
        "csv": results_path(f"tables/{table}.csv"),
        "pdf": results_path(f"figures/{table}.pdf"),
        "png": results_path(f"figures/{table}.png"),
    }


def all_outputs():
    out = [p for plan in GRID.cells.values() for p in cell_outputs(plan)] + baseline_outputs()
    out += report_outputs()
    for name in GRID.ablations:
        out += list(ablation_outputs(name).values())
    return out
