"""Load, merge and validate configs; resolve the settings of one cell.

A config is `dpdm/defaults.yaml` deep-merged with the user's files in order (later
files win; dicts merge key by key, lists and scalars are replaced). The workflow's
`configfile:` plus `--configfile` follow the same rule.

A cell is (dataset, eps, seed[, variant]). Its settings are merged in this order:

    config["defaults"]                        every cell
    config["datasets"][dataset]["settings"]   every cell of one dataset
    config["datasets"][dataset]["cells"][eps] one (dataset, eps)
    variant                                   an ablation's overrides (issue 7)

The result ("resolved settings") is what every `python -m dpdm` command consumes.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from dpdm.artifacts import DPDMError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULTS_FILE = PACKAGE_DIR / "defaults.yaml"
SCHEMA_FILE = PACKAGE_DIR / "config.schema.yaml"  # symlink to workflow/schemas/config.schema.yaml


# A level that names these keys replaces the whole mapping instead of merging into it:
# a dataset that lists its samplers gets exactly those, not the defaults' ones too.
REPLACED_KEYS = frozenset({"samplers"})


def deep_merge(base: dict, override: dict) -> dict:
    """Return base updated by override; nested dicts merge (except REPLACED_KEYS),
    everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED_KEYS:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DPDMError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DPDMError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DPDMError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_override(text: str) -> dict:
    """'train.epochs=2' -> {'train': {'epochs': 2}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise DPDMError(f"override '{text}' must look like key.sub=value")
    key, value = text.split("=", 1)
    node: Any = yaml.safe_load(value)
    for part in reversed(key.strip().split(".")):
        node = {part: node}
    return node


def with_defaults(config: dict) -> dict:
    """The package defaults with `config` merged over them."""
    return deep_merge(read_yaml(DEFAULTS_FILE), config)


def load_config(files: Iterable[str | os.PathLike] = (), overrides: Iterable[str] = ()) -> dict:
    """Defaults, then each file, then each 'a.b=value' override; validated."""
    config = read_yaml(DEFAULTS_FILE)
    for f in files:
        config = deep_merge(config, read_yaml(f))
    for o in overrides:
        config = deep_merge(config, parse_override(o))
    validate(config)
    return config


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

    schema = yaml.safe_load(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors[:10]:
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


# ----------------------------------------------------------------------------
# Cells.


def eps_tag(eps: float) -> str:
    """0.2 -> 'eps0.2', 1.0 -> 'eps1', 10 -> 'eps10' (as the config writes it)."""
    return f"eps{float(eps):g}"


def parse_eps(text: str | float) -> float:
    text = str(text)
    return float(text[3:] if text.startswith("eps") else text)


def _cell_overrides(dataset_cfg: dict, eps: float) -> dict:
    for key, value in (dataset_cfg.get("cells") or {}).items():
        if parse_eps(key) == float(eps):
            return value or {}
    return {}


def resolve_cell(config: dict, dataset: str, eps: float, seed: int, variant: dict | None = None) -> dict:
    """The complete settings of one cell; see the module docstring for the merge order."""
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
    settings["privacy"]["target_eps"] = eps
    settings["device"] = config.get("device", "auto")
    settings["fid"] = copy.deepcopy(config["fid"])
    settings["paths"] = copy.deepcopy(config["paths"])
    return settings


def iter_cells(config: dict) -> list[tuple[str, float, int]]:
    """Every (dataset, eps, seed) of the grid, in config order."""
    cells = []
    for exp in config.get("experiments", []):
        for eps in exp["eps"]:
            for seed in exp.get("seeds", config["seeds"]):
                cells.append((exp["dataset"], float(eps), int(seed)))
    return cells


def env_or(config_value: Any, env_name: str) -> Any:
    """An environment variable overrides a config path (DPDM_RAW_DIR, DPDM_FID_WEIGHTS)."""
    return os.environ.get(env_name) or config_value
