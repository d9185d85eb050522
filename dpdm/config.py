"""Load, merge and validate configs; resolve the settings of one cell.

A config is `dpdm/defaults.yaml` deep-merged with the user's files in order (later
files win; dicts merge key by key, lists and scalars are replaced). The workflow's
`configfile:` plus `--configfile` follow the same rule.

A cell is (dataset, eps, seed[, variant]). Its settings are merged in this order:

    config["defaults"]                        every cell
    config["datasets"][dataset]["settings"]   every cell of one dataset
    config["datasets"][dataset]["cells"][eps] one (dataset, eps)
    ablations.<name>.settings + .variants.<v> an ablation's overrides (see `plan_grid`)

The result ("resolved settings") is what every `python -m dpdm` command consumes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from dpdm.artifacts import DPDMError
from dpdm.layout import AUDIT_FOLDER, AUDIT_TABLE, REPORT_TABLES, cell_dir, eps_tag

log = logging.getLogger("dpdm")
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULTS_FILE = PACKAGE_DIR / "defaults.yaml"
SCHEMA_FILE = PACKAGE_DIR / "config.schema.yaml"  # symlink to workflow/schemas/config.schema.yaml


# A level that names these keys replaces the whole mapping instead of merging into it:
# a dataset that lists its samplers gets exactly those, not the defaults' ones too.
REPLACED_KEYS = frozenset({"samplers"})
# Mappings whose entries are replaced whole, one by one (a null entry removes it): a
# config that defines ablation `sampler` gets exactly its own, not a blend with the paper's.
REPLACED_ENTRIES = frozenset({"ablations"})


def deep_merge(base: dict, override: dict) -> dict:
    """Return base updated by override; nested dicts merge (except REPLACED_KEYS and the
    entries of REPLACED_ENTRIES), everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key in REPLACED_ENTRIES and isinstance(value, dict) and isinstance(out.get(key), dict):
            merged = {**out[key], **copy.deepcopy(value)}
            out[key] = {k: v for k, v in merged.items() if v is not None}
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED_KEYS:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 does: `1e-5` is a number (YAML 1.1,
    PyYAML's default, wants `1.0e-5` and reads `1e-5` as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text):
    """YAML (a string or an open file, whose name errors then cite) -> Python with
    `_Loader` (numbers like 1e-5 are numbers)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DPDMError(f"config file {path} does not exist")
    try:
        with path.open() as f:
            data = yaml_load(f) or {}
    except yaml.YAMLError as e:  # the message holds the line and column
        raise DPDMError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DPDMError(f"config file {path} must hold a mapping at the top level")
    return data


@functools.lru_cache(maxsize=None)
def _defaults_file() -> dict:
    return read_yaml(DEFAULTS_FILE)


def with_defaults(section: str, given: dict | None) -> dict:
    """`given` (a section of a cell's settings, possibly partial: e.g. an older model.pt's
    or a test's) over that section of dpdm/defaults.yaml, the one place defaults live."""
    return {**copy.deepcopy(_defaults_file()["defaults"][section]), **(given or {})}


def parse_override(text: str) -> dict:
    """'train.epochs=2' -> {'train': {'epochs': 2}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise DPDMError(f"override '{text}' must look like key.sub=value")
    key, value = text.split("=", 1)
    try:
        node: Any = yaml_load(value)
    except yaml.YAMLError as e:
        raise DPDMError(f"override '{text}': the value is not valid YAML ({e})") from e
    for part in reversed(key.strip().split(".")):
        node = {part: node}
    return node


def parse_strings(value: Any) -> Any:
    """Values of Snakemake's `--config key=value` arrive as strings (`seeds=[0,1]` as
    ['0', '1'], `fid={batch_size: 50}` as {'batch_size': '50'}): read each string as YAML,
    keeping it a string unless it is a number, list, mapping or boolean."""
    if isinstance(value, dict):
        return {k: parse_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [parse_strings(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, (int, float, list, dict)) or (isinstance(parsed, bool) and value.lower() in
                                                             ("true", "false")):
            return parse_strings(parsed)
    return value


def load_config(files: Iterable[str | os.PathLike] = (), overrides: Iterable[str | dict] = ()) -> dict:
    """Defaults, then each file, then each override ('a.b=value' or a dict); validated.

    An override that a more specific level of the config would hide (e.g. `--set
    defaults.train.epochs=2` when `datasets.mnist.settings.train.epochs` is set) is an
    error that names the key to set instead."""
    config = read_yaml(DEFAULTS_FILE)
    for f in files:
        config = deep_merge(config, read_yaml(f))
    parsed = [o if isinstance(o, dict) else parse_override(o) for o in overrides]
    for o in parsed:
        config = deep_merge(config, o)
    validate(config)
    for o in parsed:
        _check_not_shadowed(config, o)
    return config


def _leaves(tree: Any, prefix: tuple = ()) -> Iterable[tuple]:
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from _leaves(v, prefix + (str(k),))
    else:
        yield prefix


def _check_not_shadowed(config: dict, override: dict) -> None:
    """Fail when an override sets a key that a dataset or a cell of the grid sets too
    (the more specific level wins, so the override would silently do nothing there)."""
    used = {exp["dataset"] for exp in config.get("experiments", [])}
    used |= {abl["dataset"] for abl in (config.get("ablations") or {}).values()}
    datasets = config.get("datasets") or {}
    for path in _leaves(override):
        if path[:1] == ("defaults",):
            names, rest, levels = sorted(used), path[1:], [("datasets", ds, "settings") for ds in sorted(used)]
        elif path[:1] == ("datasets",) and len(path) > 3 and path[2] == "settings":
            names, rest, levels = [path[1]], path[3:], []
        else:
            continue
        for ds in names:  # the cells' keys as the YAML gave them (1 or "eps1")
            levels += [("datasets", ds, "cells", key) for key in (datasets.get(ds) or {}).get("cells") or {}]
        for level in levels:
            hit = _lookup_path(config, level + rest)
            if hit is not _MISSING and hit != _lookup_path(override, path):
                where = ".".join(map(str, level + rest))
                raise DPDMError(f"override of '{'.'.join(path)}' cannot take effect for dataset {level[1]}: "
                                f"'{where}' = {hit!r} is more specific and wins. Set '{where}' instead.")


_MISSING = object()


def _lookup_path(tree: Any, path: tuple) -> Any:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------
# Validation.


def _key_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def validate(config: dict) -> None:
    """Check `config` against the JSON schema and a few rules a schema cannot say.

    Raises DPDMError naming the offending key.
    """
    import jsonschema

    schema = yaml_load(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors[:10]:
            if e.validator == "additionalProperties" and isinstance(e.instance, dict):
                allowed = set(e.schema.get("properties") or {})
                for extra in sorted(set(e.instance) - allowed):
                    key = f"{_key_path(e)}.{extra}" if e.absolute_path else extra
                    lines.append(f"  config key '{key}' is unknown here; known keys: {sorted(allowed)}")
                continue
            lines.append(f"  config key '{_key_path(e)}': {e.message}")
        raise DPDMError("invalid config:\n" + "\n".join(lines) + "\nSee config/README.md for every key.")
    from dpdm.data import DATASETS

    known = set(DATASETS)
    for i, exp in enumerate(config.get("experiments", [])):
        if exp["dataset"] not in known:
            raise DPDMError(
                f"config key 'experiments.{i}.dataset': unknown dataset '{exp['dataset']}'; "
                f"choose one of {sorted(known)}"
            )
    for name in config.get("datasets", {}):
        if name not in known:
            raise DPDMError(f"config key 'datasets.{name}': unknown dataset; choose one of {sorted(known)}")
    _check_cells(config)
    _check_pretrained_names(config)


def _check_cells(config: dict) -> None:
    """Each `datasets.<d>.cells` key is an eps (1, 0.2, eps10); one that matches no eps of
    the grid (experiments, ablations) has no effect: say so."""
    grid: dict[str, set] = {}
    for exp in config.get("experiments", []):
        grid.setdefault(exp["dataset"], set()).update(float(e) for e in exp["eps"])
    for abl in (config.get("ablations") or {}).values():
        grid.setdefault(abl["dataset"], set()).update(float(e) for e in abl["eps"])
    for name, ds in (config.get("datasets") or {}).items():
        for key in (ds or {}).get("cells") or {}:
            try:
                eps = parse_eps(key)
            except ValueError:
                raise DPDMError(f"config key 'datasets.{name}.cells.{key}': a cell is keyed by its eps "
                                f"(e.g. 1, 0.2 or eps10), not '{key}'") from None
            if name in grid and eps not in grid[name]:
                log.warning("config key 'datasets.%s.cells.%s' matches no eps of the grid for %s (%s): it has no "
                            "effect", name, key, name, sorted(grid[name]))


# ----------------------------------------------------------------------------
# Cells.


def parse_eps(text: str | float) -> float:
    """'eps10', '10', 10 -> 10.0; ValueError for anything else."""
    text = str(text)
    return float(text[3:] if text.startswith("eps") else text)


def _cell_overrides(dataset_cfg: dict, eps: float) -> dict:
    for key, value in (dataset_cfg.get("cells") or {}).items():
        if parse_eps(key) == float(eps):
            return value or {}
    return {}


def resolve_cell(config: dict, dataset: str, eps: float, seed: int, variant: dict | None = None,
                 variant_name: str = "") -> dict:
    """The complete settings of one cell; see the module docstring for the merge order.

    `variant` are an ablation's overrides and `variant_name` the folder of its cell
    (recorded in settings["cell"]["variant"]); both empty for a cell of the main grid."""
    from dpdm.data import DATASETS

    if dataset not in DATASETS:
        raise DPDMError(f"unknown dataset '{dataset}'; choose one of {sorted(DATASETS)}")
    eps = float(eps)
    if not eps > 0:
        raise DPDMError(f"epsilon must be > 0, got {eps}")
    dataset_cfg = (config.get("datasets") or {}).get(dataset, {}) or {}
    settings = deep_merge(config["defaults"], dataset_cfg.get("settings") or {})
    settings = deep_merge(settings, _cell_overrides(dataset_cfg, eps))
    if variant:
        settings = deep_merge(settings, variant)
    settings["cell"] = {"dataset": dataset, "eps": eps, "eps_tag": eps_tag(eps), "seed": int(seed)}
    if variant_name:
        settings["cell"]["variant"] = variant_name
    settings["privacy"]["target_eps"] = eps
    settings["device"] = config.get("device", "auto")
    settings["fid"] = copy.deepcopy(config["fid"])
    settings["paths"] = copy.deepcopy(config["paths"])
    return settings


# A pretrain entry's keys left out of the config (dpdm/pretrain.py).
PRETRAIN_DEFAULTS = {"max_steps": None, "batch_size": 128, "lr": 3.0e-4, "ema_decay": 0.999, "ema_rampup": 0.05,
                     "noise_multiplicity": 1, "label_dropout": 0.1, "conditional": True, "seed": 0,
                     "checkpoint_every": 500, "log_every": 50}


def pretrain_settings(config: dict, name: str) -> dict:
    """The settings of public model `name` (config pretrain.<name>): its training keys
    over PRETRAIN_DEFAULTS, and the model / diffusion / data of `defaults` overridden by
    its own `settings`."""
    entries = config.get("pretrain") or {}
    if name not in entries:
        raise DPDMError(f"no public model named {name!r}: config pretrain has {sorted(entries) or 'none'}; add "
                        f"pretrain.{name} or fix train.init.pretrained")
    entry = entries[name]
    base = deep_merge(config["defaults"], entry.get("settings") or {})
    pt = deep_merge(PRETRAIN_DEFAULTS, {k: v for k, v in entry.items() if k != "settings"})
    pt["name"] = name
    return {"pretrain": pt, "model": base["model"], "diffusion": base["diffusion"], "data": base["data"],
            "device": config.get("device", "auto")}


# Settings that fix the network and what its outputs mean: the public model's must equal
# the cell's, except dropout (a training choice; fine-tuning may use its own).
ARCHITECTURE_KEYS = ("model", "diffusion")
FREE_KEYS = {"model.dropout"}


def architecture_difference(public: dict, cell: dict) -> list[str]:
    """The ARCHITECTURE_KEYS settings (as 'model.channels') in which a public model's
    settings differ from a cell's, for the first section that differs; [] if none."""
    for key in ARCHITECTURE_KEYS:
        a, b = public.get(key) or {}, cell.get(key) or {}
        diff = [f"{key}.{k}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k) and f"{key}.{k}" not in FREE_KEYS]
        if diff:
            return diff
    return []


def _check_public_start(config: dict, settings: dict, where: str) -> None:
    """A cell may fine-tune a public model only if the model saw none of the cell's own
    examples: DP-SGD's guarantee covers the fine-tuning, never a start point trained on the
    same people without privacy."""
    from dpdm.data import image_shape, shares_examples

    name = (settings["train"].get("init") or {}).get("pretrained")
    if not name:
        return
    pub = pretrain_settings(config, name)
    public, private = pub["pretrain"]["dataset"], settings["cell"]["dataset"]
    cell = f"cell {private}/{settings['cell']['eps_tag']} fine-tunes the public model {name!r}"
    if shares_examples(public, private):
        raise DPDMError(f"{where}: {cell}, pre-trained WITHOUT privacy on {public}, which holds examples of the "
                        f"cell's own private data ({private}); its DP guarantee would not hold. Pre-train on data "
                        f"disjoint from {private} (e.g. digits_public for digits_private cells)")
    # What dpdm.finetune checks when the cell starts, found before the pre-training runs.
    diff = architecture_difference(pub, settings)
    if diff:
        raise DPDMError(f"{where}: {cell}, whose settings differ from the cell's in {', '.join(diff)}; give "
                        f"pretrain.{name}.settings the cell's values (or the cell the model's)")
    shapes = [image_shape(public, pub)[:2], image_shape(private, settings)[:2]]
    if shapes[0] != shapes[1]:
        raise DPDMError(f"{where}: {cell}, pre-trained on {public} images of (resolution, channels) {shapes[0]}, but "
                        f"the cell's are {shapes[1]}; pre-train on public data of the cell's shape")


def public_models(config: dict, grid: Grid) -> dict[str, str]:
    """{name: public dataset} of every public model a cell of the grid fine-tunes."""
    out = {}
    for plan in grid.cells.values():
        name = (cell_settings(config, plan)["train"].get("init") or {}).get("pretrained")
        if name:
            out.setdefault(name, pretrain_settings(config, name)["pretrain"]["dataset"])
    return out


def _check_pretrained_names(config: dict) -> None:
    """Every train.init.pretrained of the config names an entry of `pretrain`."""
    names = set(config.get("pretrain") or {})

    def walk(tree, path):
        if isinstance(tree, dict):
            init = (tree.get("train") or {}).get("init") if isinstance(tree.get("train"), dict) else None
            name = (init or {}).get("pretrained")
            if name is not None and name not in names:
                raise DPDMError(f"config key '{path + '.' if path else ''}train.init.pretrained': no public model "
                                f"named {name!r} (config pretrain has {sorted(names) or 'none'}); add "
                                f"pretrain.{name} or fix the name")
            for k, v in tree.items():
                walk(v, f"{path}.{k}" if path else str(k))

    walk({k: config.get(k) for k in ("defaults", "datasets", "ablations")}, "")


def iter_cells(config: dict) -> list[tuple[str, float, int]]:
    """Every (dataset, eps, seed) of the grid, in config order."""
    cells = []
    for exp in config.get("experiments", []):
        for eps in exp["eps"]:
            for seed in exp.get("seeds", config["seeds"]):
                cells.append((exp["dataset"], float(eps), int(seed)))
    return cells


def audit_cells(config: dict) -> list[tuple[str, float, int]]:
    """Every (dataset, eps, seed) the config audits (config audit.cells), in config order."""
    audit = config.get("audit") or {}
    return [(c["dataset"], float(eps), int(seed)) for c in audit.get("cells") or [] for eps in c["eps"]
            for seed in c.get("seeds", config["seeds"])]


def fid_splits(config: dict) -> list[str]:
    """The real splits FID is computed against (config fid.reference_split: one name or a
    list); the first is the headline FID of the tables."""
    splits = config["fid"]["reference_split"]
    return [splits] if isinstance(splits, str) else list(splits)


def env_or(config_value: Any, env_name: str) -> Any:
    """An environment variable overrides a config path (DPDM_RAW_DIR, DPDM_FID_WEIGHTS)."""
    return os.environ.get(env_name) or config_value


# ----------------------------------------------------------------------------
# The grid: the main cells and the ablations' variants (paper Tables 3, 5, 6).
#
# An ablation (config key `ablations.<name>`) is a dataset, a list of eps (and seeds),
# and named variants: settings overrides merged last (after `settings`, which applies
# to every variant of the ablation). A variant trains its own model in
#     {results}/{dataset}/eps{eps}/{variant}/seed{seed}/
# unless its training settings equal those of a cell that already exists (a main
# cell, or an earlier variant): then it reuses that model, so e.g. the K = 32 row of the
# noise-multiplicity ablation IS the main MNIST eps = 1 cell and is trained once.
# The samplers an ablation evaluates (`samplers`, default: all of the variant's) are
# added to the cell that holds its model; a sampler with the same settings as one the
# cell already has is the same job.

TRAINING_SECTIONS = ("data", "model", "diffusion", "train", "privacy")
EVAL_SECTIONS = ("sample", "classify")


@dataclasses.dataclass
class CellPlan:
    """One model to train and what to evaluate on it."""

    dataset: str
    eps: float
    seed: int
    variant: str = ""  # "" for a main cell, else the variant's folder name
    overrides: dict = dataclasses.field(default_factory=dict)  # resolve_cell's `variant`
    samplers: dict = dataclasses.field(default_factory=dict)  # name -> sampler settings
    classifiers: dict = dataclasses.field(default_factory=dict)  # sampler name -> [classifier, ...]
    eval_settings: dict = dataclasses.field(default_factory=dict)  # the cell's sample/classify sections

    @property
    def path(self) -> str:
        """The cell's folder relative to paths.results."""
        return cell_dir(self.dataset, self.eps, self.seed, self.variant)


@dataclasses.dataclass
class Grid:
    cells: dict  # path -> CellPlan, main cells first, in config order
    ablations: dict  # name -> manifest for dpdm.report (rows point at cells and samplers)


def _training_signature(dataset: str, eps: float, seed: int, settings: dict) -> str:
    from dpdm.artifacts import sha256_json

    return sha256_json([dataset, float(eps), int(seed), {k: settings[k] for k in TRAINING_SECTIONS}])


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _add_sampler(cell: CellPlan, name: str, options: dict, classifiers: list[str], where: str) -> str:
    """Add sampler `name` to the cell (or find the same settings under another name)."""
    for existing, opts in cell.samplers.items():
        if opts == options:
            name = existing
            break
    else:
        if name in cell.samplers:
            raise DPDMError(f"{where}: sampler '{name}' of cell {cell.path} already exists with other settings "
                            f"({cell.samplers[name]}); give the ablation's sampler another name")
        cell.samplers[name] = copy.deepcopy(options)
    have = cell.classifiers.setdefault(name, [])
    have += [c for c in classifiers if c not in have]
    return name


def plan_grid(config: dict) -> Grid:
    """Every cell to train (main grid and ablations, each model once) and every ablation's rows."""
    from dpdm.data import DATASETS

    cells: dict[str, CellPlan] = {}
    by_signature: dict[str, str] = {}
    for ds, eps, seed in iter_cells(config):
        settings = resolve_cell(config, ds, eps, seed)
        _check_public_start(config, settings, f"config key 'datasets.{ds}'")
        plan = CellPlan(ds, eps, seed, eval_settings={k: settings[k] for k in EVAL_SECTIONS})
        conditional = DATASETS[ds].num_classes > 0
        for name, options in settings["samplers"].items():
            _add_sampler(plan, name, options, settings["classify"]["classifiers"] if conditional else [],
                         f"datasets.{ds}")
        cells[plan.path] = plan
        by_signature[_training_signature(ds, eps, seed, settings)] = plan.path

    ablations = {}
    for name, abl in (config.get("ablations") or {}).items():
        where = f"config key 'ablations.{name}'"
        ds = abl["dataset"]
        conditional = DATASETS[ds].num_classes > 0
        variants = abl.get("variants") or {"default": {}}
        if AUDIT_FOLDER in variants:
            raise DPDMError(f"{where}.variants: a variant named '{AUDIT_FOLDER}' would share the folder "
                            f"{{dataset}}/eps{{eps}}/{AUDIT_FOLDER}/ of the privacy audits (config audit.cells); "
                            "rename the variant")
        rows, used_classifiers = [], []
        for eps in abl["eps"]:
            for seed in abl.get("seeds", config["seeds"]):
                for vname, overrides in variants.items():
                    merged = deep_merge(abl.get("settings") or {}, overrides or {})
                    settings = resolve_cell(config, ds, eps, seed, merged, vname)
                    _check_public_start(config, settings, f"{where}.variants.{vname}")
                    sig = _training_signature(ds, eps, seed, settings)
                    if sig not in by_signature:
                        plan = CellPlan(ds, float(eps), int(seed), vname, merged,
                                        eval_settings={k: settings[k] for k in EVAL_SECTIONS})
                        if plan.path in cells:
                            raise DPDMError(f"{where}: variant '{vname}' names cell {plan.path}, which another "
                                            "ablation already trains with other settings; rename the variant")
                        cells[plan.path] = plan
                        by_signature[sig] = plan.path
                    cell = cells[by_signature[sig]]
                    mine = {k: settings[k] for k in EVAL_SECTIONS}
                    if mine != cell.eval_settings:
                        raise DPDMError(f"{where}: variant '{vname}' shares the model of cell {cell.path} but "
                                        f"changes its {'/'.join(EVAL_SECTIONS)} settings; set those for the whole "
                                        "dataset instead")
                    wanted = abl.get("samplers") or list(settings["samplers"])
                    clf = (abl.get("classifiers") or settings["classify"]["classifiers"]) if conditional else []
                    used_classifiers += [c for c in clf if c not in used_classifiers]
                    for sampler in wanted:
                        if sampler not in settings["samplers"]:
                            raise DPDMError(f"{where}.samplers: variant '{vname}' has no sampler '{sampler}'; "
                                            f"its samplers are {sorted(settings['samplers'])}")
                        actual = _add_sampler(cell, sampler, settings["samplers"][sampler], clf, where)
                        rows.append({
                            "variant": vname, "sampler": sampler, "eps": float(eps), "seed": int(seed),
                            "cell": cell.path, "cell_sampler": actual, "classifiers": clf,
                            "x": _lookup(settings, abl["vary"]) if abl.get("vary") else None,
                        })
        ablations[name] = {
            "name": name,
            "dataset": ds,
            "table": abl.get("table") or f"ablation_{name}",
            "title": abl.get("title") or name.replace("_", " "),
            "vary": abl.get("vary"),
            "classifiers": used_classifiers,
            "fid": bool(config["fid"]["enabled"]),
            "rows": rows,
        }
    _check_table_names(ablations)
    return Grid(cells, ablations)


def _check_table_names(ablations: dict) -> None:
    """Each ablation writes tables/<table>.tex: a name of its own, not one of the report's
    (the schema checks the characters)."""
    seen = {t: "the main report" for t in REPORT_TABLES} | {AUDIT_TABLE: "the privacy audit"}
    for name, abl in ablations.items():
        table = abl["table"]
        if table in seen:
            raise DPDMError(f"config key 'ablations.{name}.table' = {table!r} is already written by {seen[table]}; "
                            "give the ablation a table name of its own")
        seen[table] = f"ablation '{name}'"


def cell_settings(config: dict, plan: CellPlan) -> dict:
    """The resolved settings of a planned cell, with exactly the samplers planned for it."""
    settings = resolve_cell(config, plan.dataset, plan.eps, plan.seed, plan.overrides, plan.variant)
    settings["samplers"] = copy.deepcopy(plan.samplers)
    return settings


def train_resources(config: dict) -> dict:
    """resources.train over resources.default: what each training job asks for."""
    return {**config["resources"].get("default", {}), **config["resources"].get("train", {})}


def grid_summary(config: dict, grid: Grid) -> str:
    """One line: what this config trains (a dry run prints it before anything runs)."""
    main = [c for c in grid.cells.values() if not c.variant]
    extra = len(grid.cells) - len(main)
    datasets = sorted({c.dataset for c in grid.cells.values()})
    runs = sum(len(c.samplers) for c in grid.cells.values())
    train = train_resources(config)
    gpus, runtime = int(train.get("gpu", 0)), float(train.get("runtime", 60))
    budget = (f"; at most {len(grid.cells) * gpus * runtime / 60:.4g} GPU-hours of training "
              f"(resources.train: {gpus} GPU x {runtime:g} min each)" if gpus else "")
    return (f"dpdm: {len(grid.cells)} models to train ({len(main)} cells of the grid + {extra} ablation models) "
            f"on {', '.join(datasets) or 'no dataset'}, {runs} sampler runs{budget}")

