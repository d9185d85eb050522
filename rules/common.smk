# Shared helpers: config merge and validation, the grid of cells, resolved settings,
# resources. Everything that decides *what* a cell is lives in dpdm/config.py; this
# file only adapts it to Snakemake (wildcards, params, resources).

import dataclasses
import json
import os
import re
import shlex
import sys

sys.path.insert(
    0, workflow.basedir
)  # import the repo's dpdm even without `pip install -e .`
os.environ.setdefault(
    "DPDM_TRACEBACK", "1"
)  # a job's log keeps the traceback of a bug (dpdm.cli)

from dpdm import config as dpcfg
from dpdm import launch, layout
from dpdm.artifacts import DPDMError, save_json
from dpdm.data import DATASETS
from dpdm.layout import CELL_FILES
from dpdm.registry import CLASSIFIERS


def _load_config():
    """The config rebuilt by dpdm.config's rules (config/README.md): the package defaults,
    then either the Snakefile's configfile (the paper) or, when any --configfile is
    given, exactly those files in order; then --config. A user's config thus gets exactly
    the cells it names, not the paper's grid and ablations besides (list
    config/config.yaml first to build on the paper). Snakemake's own merge blends every
    mapping key by key; jobs get the same --configfiles and --config. --config values
    arrive as strings and are read as YAML (dpdm.config.parse_strings).

    Why `workflow.config_settings` (not public API): Snakemake's public `config` is
    already merged by its own rules, which blend the paper's mappings into a user's;
    rebuilding the config needs the original --configfile list and --config values,
    which Snakemake 9 exposes only there. Why not snakemake.utils.validate: the same
    schema is validated by dpdm.config.validate, also outside Snakemake (`python -m dpdm
    ... --config`), with messages that name the key and the fix."""
    cli_files = [os.path.abspath(f) for f in workflow.config_settings.configfiles]
    files = cli_files or list(workflow.configfiles)
    return dpcfg.load_config(
        files, [dpcfg.parse_strings(dict(workflow.config_settings.config or {}))]
    )


try:
    _merged = _load_config()
    config.clear()
    config.update(_merged)
    GRID = dpcfg.plan_grid(config)
except DPDMError as e:
    raise WorkflowError(str(e)) from None
if workflow.is_main_process:  # not again inside each job
    print(
        dpcfg.grid_summary(config, GRID)
        + launch.describe(dpcfg.train_resources(config)),
        file=sys.stderr,
    )

LOSS_CURVES = bool(
    config["report"]["loss_curves"]
)  # opt-in: training losses are not covered by DP
FID = bool(
    config["fid"]["enabled"]
)  # false: no FID jobs; the tables say "not computed"
FID_SPLITS = dpcfg.fid_splits(
    config
)  # the first is the headline FID (the paper's: train)
DATA = config["paths"]["data"]
RESULTS = config["paths"]["results"]
FID_WEIGHTS_DEFAULT = "weights/pt_inception-2015-12-05-6726825d.pth"
# The memorisation check (rules/memorisation.smk) and where its figure of the closest
# sample / training pairs goes: private/ unless the user opts in.
MEMORISATION_FIGURE = (
    ("pairs_published" if config["memorisation"]["publish_pairs"] else "pairs")
    if config["memorisation"]["enabled"]
    else ""
)
# ... and in Inception's feature space as well when the FID has real weights.
MEMORISATION_FEATURES = FID and config["fid"]["extractor"] == "inception"
MAIN_CELLS = [c for c in GRID.cells.values() if not c.variant]


def data_path(path):
    """A file of the prepared data: {paths.data}/<path>."""
    return os.path.join(DATA, path)


def results_path(path):
    """A file under {paths.results}/<path>."""
    return os.path.join(RESULTS, path)


def cell_path(path):
    """A file of a cell: {results}/{dataset}/{eps}/{variant}seed{seed}/<path> (dpdm.layout.CELL).
    The variant wildcard is empty for a main cell and 'name/' for an ablation's own model.
    """
    return os.path.join(RESULTS, layout.CELL, path)


def baseline_path(path):
    """A file of a DP-SGD baseline's folder (dpdm.layout.BASELINE_DIR)."""
    return os.path.join(RESULTS, layout.BASELINE_DIR, path)


def audit_path(path):
    """A file of a privacy audit's folder (dpdm.layout.AUDIT_DIR)."""
    return os.path.join(RESULTS, layout.AUDIT_DIR, path)


def plan_of(wildcards):
    """The planned cell (dpdm.config.CellPlan) named by the wildcards."""
    key = f"{wildcards.dataset}/{wildcards.eps}/{wildcards.variant}seed{wildcards.seed}"
    if key not in GRID.cells:
        raise WorkflowError(
            f"{results_path(key)} is not a cell of this config's grid (experiments, ablations)"
        )
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
    "audit": ("cell", "train", "privacy"),
    "memorisation": ("cell",),
}
# Stages whose settings also hold the sampler named by the wildcard (its `tuned_on` flag
# reaches the fid and classify results, and so the report).
SAMPLER_STAGES = ("sample", "fid", "classify", "memorisation")


def _settings_json(settings, stage):
    return json.dumps(
        {k: settings[k] for k in STAGE_SECTIONS[stage]},
        sort_keys=True,
        separators=(",", ":"),
    )


def stage_settings(stage):
    """A params function: the JSON of the cell's settings that `stage` reads
    (for the SAMPLER_STAGES, with only the sampler named by the wildcard)."""

    def settings_json(wildcards):
        full = settings_of(wildcards)
        if stage in SAMPLER_STAGES:
            if wildcards.sampler not in full["samplers"]:
                raise WorkflowError(
                    f"cell {plan_of(wildcards).path} has no sampler '{wildcards.sampler}'; "
                    f"its samplers are {sorted(full['samplers'])}"
                )
            full["samplers"] = {wildcards.sampler: full["samplers"][wildcards.sampler]}
            return json.dumps(
                {k: full[k] for k in STAGE_SECTIONS[stage] + ("samplers",)},
                sort_keys=True,
                separators=(",", ":"),
            )
        return _settings_json(full, stage)

    return settings_json


def baseline_settings(wildcards):
    """Settings of a DP-SGD baseline: those of the main cell (dataset, eps, seed)."""
    settings = dpcfg.resolve_cell(
        config, wildcards.dataset, dpcfg.parse_eps(wildcards.eps), int(wildcards.seed)
    )
    return _settings_json(settings, "baseline")


def dataset_settings(dataset):
    """Settings shared by every cell of a dataset (used by data preparation)."""
    ds = config["datasets"].get(dataset) or {}
    return dpcfg.deep_merge(config["defaults"], ds.get("settings") or {})


def is_conditional(dataset):
    return DATASETS[dataset].num_classes > 0


def code_hash(command):
    """Content hash of the dpdm modules `python -m dpdm <command>` imports (found from the
    code by dpdm.codehash), a param of each rule running that command. Snakemake does
    not track imported code; with this, a change to any of those modules reruns it."""
    from dpdm.codehash import code_hash as _code_hash

    return _code_hash(command)


def _resources_of(rule_name):
    """config resources.<rule> over resources.default; pretrain without its own entry
    gets train's (one GPU: pre-training runs one process)."""
    res = config["resources"]
    r = dict(res.get("default", {}))
    if rule_name == "pretrain" and "pretrain" not in res:
        train = res.get("train", {})
        r.update({k: v for k, v in train.items() if k not in ("processes", "nodes")})
        r["gpu"] = min(int(r.get("gpu", 0)), 1)
    r.update(res.get(rule_name, {}))
    return r


def rule_resources(rule_name):
    """Resources of a rule from config `resources`; runtime and memory grow with
    the attempt so a retry (profile `retries`) gets a larger allocation. Training on
    several nodes (resources.train.nodes) is an srun job of one task per node, each a
    torchrun of gpu / nodes processes; train's procs_per_node / proc_nodes tell `python
    -m dpdm train` how many processes to start (dpdm.launch)."""
    r = _resources_of(rule_name)
    out = {
        "runtime": lambda wc, attempt: int(r.get("runtime", 60) * attempt),
        "mem_mb": lambda wc, attempt: int(r.get("mem_mb", 4000) * attempt),
        "cpus_per_task": int(r.get("cpus_per_task", 1)),
        "gpu": int(r.get("gpu", 0)),
        "slurm_extra": r.get("slurm_extra", ""),
    }
    nodes, per_node = int(r.get("nodes", 1)), launch.processes_per_node(r)
    if rule_name == "train":  # `python -m dpdm train --procs-per-node P --nodes N`
        out.update(procs_per_node=per_node, proc_nodes=nodes)
    if nodes > 1:
        out.update(
            nodes=nodes,
            mpi="srun",  # the job's shell starts its own srun (dpdm.launch.command)
            tasks=nodes,  # one torchrun per node
            tasks_per_gpu=0,  # not one task per GPU: torchrun starts those
            slurm_extra=f"{out['slurm_extra']} --gpus-per-node={per_node}".strip(),
        )
    return out


def rule_threads(rule_name):
    """Threads of a local job = its SLURM cpus_per_task (Snakemake exports them as
    OMP_NUM_THREADS etc., so torch does not oversubscribe the cores)."""
    return int(_resources_of(rule_name).get("cpus_per_task", 1))


def fid_weights_input(wildcards=None):
    """The Inception weights file the FID rules need (nothing for the untrained extractor)."""
    if config["fid"]["extractor"] != "inception":
        return []
    return [
        dpcfg.env_or(config["paths"]["fid_weights"], "DPDM_FID_WEIGHTS")
        or FID_WEIGHTS_DEFAULT
    ]


def fid_args():
    w = fid_weights_input()
    args = f"--extractor {config['fid']['extractor']} --batch-size {config['fid']['batch_size']}"
    return args + (f" --weights {w[0]}" if w else "")


def judge_of(dataset):
    """The judge classifier of a dataset (classify.judge), None when off or unconditional."""
    return (
        dataset_settings(dataset)["classify"]["judge"]
        if is_conditional(dataset)
        else None
    )


def cell_entries(plan):
    """Every result of one planned cell (dpdm.layout.Entry): model, ledger, metrics,
    samples, grids, FIDs, classifiers, judge."""
    return layout.cell_entries(
        RESULTS,
        plan.dataset,
        plan.eps,
        plan.seed,
        plan.variant,
        plan.classifiers,
        fid=FID,
        judge=bool(judge_of(plan.dataset)),
        memorisation=MEMORISATION_FIGURE,
    )


def cell_outputs(plan):
    return [e.path for e in cell_entries(plan)]


def baseline_entries():
    out = []
    for exp in config["experiments"]:
        if not exp.get("baseline", is_conditional(exp["dataset"])):
            continue
        for eps in exp["eps"]:
            for seed in exp.get("seeds", config["seeds"]):
                settings = dpcfg.resolve_cell(config, exp["dataset"], eps, seed)
                out += layout.baseline_entries(
                    RESULTS,
                    exp["dataset"],
                    eps,
                    seed,
                    settings["baseline"]["classifiers"],
                )
    return out


def baseline_outputs():
    return [e.path for e in baseline_entries()]


def main_outputs():
    """Every result of the main grid (with the sample grids)."""
    return [p for plan in MAIN_CELLS for p in cell_outputs(plan)] + baseline_outputs()


# What the report reads, by kind of result (dpdm.layout.CELL_FILES keys): the main
# grid's published results and sample grids, the ledger of EVERY release (ablation
# models too: the privacy table composes them per dataset) and, only with the opt-in
# report.loss_curves, the cells' private training metrics.
REPORT_KINDS = ("privacy", "fid", "classify", "judge", "grid", "baseline")


def report_entries():
    main = [e for plan in MAIN_CELLS for e in cell_entries(plan)] + baseline_entries()
    out = [e for e in main if e.kind in REPORT_KINDS]
    out += [
        e
        for plan in GRID.cells.values()
        if plan.variant
        for e in cell_entries(plan)
        if e.kind == "privacy"
    ]
    # the public models the grid fine-tunes: releases without privacy, in the privacy table
    out += [
        layout.pretrain_entry(RESULTS, name, dataset)
        for name, dataset in dpcfg.public_models(config, GRID).items()
    ]
    if LOSS_CURVES:
        out += [e for e in main if e.kind == "metrics"]
    return out


def report_manifest():
    """The report's manifest (JSON): every input and what it is, so the report never
    parses a path."""
    entries = [dataclasses.asdict(e) for e in report_entries()]
    return json.dumps({"entries": entries}, sort_keys=True, separators=(",", ":"))


def write_report_manifest(manifest, path, log):
    """Rule report_manifest's job: the manifest's JSON to `path`, atomically."""
    entries = json.loads(manifest)
    save_json(path, entries)
    with open(log, "w") as f:
        print(f"{len(entries['entries'])} report inputs -> {path}", file=f)


def report_inputs():
    return [e.path for e in report_entries()]


def report_tables():
    """The paper's tables this config can fill (dpdm/report.py writes exactly these)."""
    datasets = {c.dataset for c in MAIN_CELLS}
    tables = ["privacy"]
    if any(is_conditional(ds) for ds in datasets):
        tables.append("table1")
    if baseline_outputs():
        tables.append("table2")
    if FID and any(not is_conditional(ds) for ds in datasets):
        tables.append("table4")
    return tables


def report_figures():
    datasets = sorted({c.dataset for c in MAIN_CELLS})
    figs = (["fid_vs_eps"] if FID else []) + (["loss_curves"] if LOSS_CURVES else [])
    figs += [f"samples_{ds}" for ds in datasets]
    if any(is_conditional(ds) for ds in datasets):
        figs.append("acc_vs_eps")
    return figs


def figure_caption(figure):
    """The caption file of a figure kind (workflow/report/<kind>.rst): samples_mnist -> samples."""
    return "samples" if figure.startswith("samples_") else figure


def table_path(name, ext):
    """{results}/tables/<name>.<ext> (dpdm.layout.TABLE)."""
    return results_path(layout.TABLE.format(name=name, ext=ext))


def figure_path(name, ext):
    """{results}/figures/<name>.<ext> (dpdm.layout.FIGURE)."""
    return results_path(layout.FIGURE.format(name=name, ext=ext))


def report_outputs():
    if not MAIN_CELLS:
        return []
    out = [table_path(t, ext) for t in report_tables() for ext in ("tex", "csv")]
    out += [figure_path(f, ext) for f in report_figures() for ext in ("pdf", "png")]
    return out


# Ablations by their table's name (e.g. table3 -> noise_multiplicity): the wildcard
# of rule ablation.
ABLATION_OF_TABLE = {abl["table"]: name for name, abl in GRID.ablations.items()}


def ablation_inputs(name):
    """The result files an ablation's table reads (FIDs, classifiers, ledgers)."""
    out = []
    for row in GRID.ablations[name]["rows"]:
        d = results_path(row["cell"])
        out.append(layout.cell_file("privacy", d))
        if FID:
            out.append(layout.cell_file("fid", d, row["cell_sampler"]))
        out += [
            layout.cell_file("classify", d, row["cell_sampler"], c)
            for c in row["classifiers"]
        ]
    return list(dict.fromkeys(out))


def ablation_outputs(name):
    table = GRID.ablations[name]["table"]
    return [table_path(table, ext) for ext in ("tex", "csv")] + [
        figure_path(table, ext) for ext in ("pdf", "png")
    ]


def all_outputs():
    out = [
        p for plan in GRID.cells.values() for p in cell_outputs(plan)
    ] + baseline_outputs()
    out += report_outputs()
    for name in GRID.ablations:
        out += ablation_outputs(name)
    return out + audit_outputs()


# ----------------------------------------------------------------------------
# Input and params functions of the rules (named, so each rule reads as a table).


def get_data_dir(wildcards):
    """The prepared dataset's folder: {paths.data}/{dataset}."""
    return data_path(wildcards.dataset)


def get_raw_dir(wildcards):
    """Where prepare looks for raw files ($DPDM_RAW_DIR, else paths.raw)."""
    return dpcfg.env_or(config["paths"]["raw"], "DPDM_RAW_DIR") or "raw"


def get_digits_size(wildcards):
    return dataset_settings(wildcards.dataset)["data"]["digits_size"]


def get_cell_dir(wildcards):
    """The planned cell's folder (with its variant, if an ablation's own model)."""
    return results_path(plan_of(wildcards).path)


def get_attempts_log(wildcards):
    """Every training attempt's log, appended (Snakemake empties the rule's log per job)."""
    return results_path(f"{plan_of(wildcards).path}/logs/train_attempts.log")


def get_fid_references(wildcards):
    """The reference statistics of the configured splits (the first is the headline FID)."""
    return [data_path(f"{wildcards.dataset}/fid_{split}.npz") for split in FID_SPLITS]


def get_ref_args(wildcards, input):
    return " ".join(f"--ref {shlex.quote(r)}" for r in input.refs)


def get_judge_epochs(wildcards):
    return dataset_settings(wildcards.dataset)["classify"]["judge_epochs"]


def get_judge_file(wildcards):
    return data_path(f"{wildcards.dataset}/judge_{judge_of(wildcards.dataset)}.pt")


def get_ablation_inputs(wildcards):
    return ablation_inputs(ABLATION_OF_TABLE[wildcards.table])


def get_ablation_manifest(wildcards):
    """The ablation's rows (dpdm.config.plan_grid), as JSON for report-ablation."""
    return json.dumps(
        GRID.ablations[ABLATION_OF_TABLE[wildcards.table]],
        sort_keys=True,
        separators=(",", ":"),
    )


def get_results_dir(wildcards, output):
    """paths.results, from a table's path {results}/tables/<name>.tex."""
    tex = output.tex if isinstance(output.tex, str) else output.tex[0]
    return os.path.dirname(os.path.dirname(tex))


def memorisation_weights_input(wildcards):
    """The Inception weights, when the memorisation check also works in its feature space."""
    return fid_weights_input() if MEMORISATION_FEATURES else []


def memorisation_options():
    m = config["memorisation"]
    out = f"--alpha {m['alpha']} --neighbours {m['neighbours']}"
    if MEMORISATION_FEATURES:
        out += f" --extractor inception --weights {shlex.quote(fid_weights_input()[0])}"
    return out


# ----------------------------------------------------------------------------
# Privacy audits (config audit.cells; rules/audit.smk).

AUDIT_CELLS = dpcfg.audit_cells(config)


def audit_files():
    return [
        results_path(layout.audit_file(ds, eps, seed)) for ds, eps, seed in AUDIT_CELLS
    ]


def audit_outputs():
    """The audits and, when there are any, their table and figure."""
    if not AUDIT_CELLS:
        return []
    return audit_files() + [
        path(layout.AUDIT_TABLE, ext)
        for path, exts in ((table_path, ("tex", "csv")), (figure_path, ("pdf", "png")))
        for ext in exts
    ]


def audit_settings(wildcards):
    """The audited cell's settings (the sections its training plan reads)."""
    settings = dpcfg.resolve_cell(
        config, wildcards.dataset, dpcfg.parse_eps(wildcards.eps), int(wildcards.seed)
    )
    return _settings_json(settings, "audit")


def audit_options():
    a = config["audit"]
    out = f"--canaries {a['canaries']} --k-pos {a['k_pos']} --k-neg {a['k_neg']} --confidence {a['confidence']}"
    return out + (
        f" --test-only-break {a['test_only_break']}" if a["test_only_break"] else ""
    )


# ----------------------------------------------------------------------------
# Public pre-training and DP fine-tuning (issue 17; dpdm/pretrain.py, dpdm/finetune.py).


def pretrain_path(name, path):
    """A file of public model `name`: {results}/pretrain/{name}/<path>."""
    return results_path(f"pretrain/{name}/{path}")


def pretrain_of(wildcards):
    """The resolved settings of the public model named by the `name` wildcard."""
    try:
        return dpcfg.pretrain_settings(config, wildcards.name)
    except DPDMError as e:
        raise WorkflowError(str(e)) from None


def get_pretrain_data(wildcards):
    """The public dataset's prepared train split and meta.json."""
    dataset = pretrain_of(wildcards)["pretrain"]["dataset"]
    return [data_path(f"{dataset}/train.npz"), data_path(f"{dataset}/meta.json")]


def get_pretrain_settings(wildcards):
    return json.dumps(pretrain_of(wildcards), sort_keys=True)


def get_init_model(wildcards):
    """The public model a cell fine-tunes (train.init.pretrained), or nothing."""
    name = (settings_of(wildcards)["train"].get("init") or {}).get("pretrained")
    return [pretrain_path(name, "model.pt")] if name else []


def get_init_arg(wildcards):
    """`--init <model.pt>` for a fine-tuned cell, else nothing."""
    model = get_init_model(wildcards)
    return f"--init {shlex.quote(model[0])}" if model else ""
