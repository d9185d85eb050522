"""DP fine-tuning of a publicly pre-trained denoiser (Ghalebikesabi et al. 2023, arXiv
2302.13861): start a cell's DP-SGD from the weights of `python -m dpdm pretrain`, and
choose which parameters DP-SGD trains.

- `train.init: {pretrained: NAME}` starts from results/pretrain/NAME/model.pt (its EMA
  weights, into both the model and its EMA). The public model costs no privacy: it saw
  only public data. Its architecture and resolution must be the cell's. When the label
  spaces differ (an unconditional public model, or another number of classes), the class
  embedding is fresh (the cell seed's initial weights) and is always trained.
- `train.finetune` selects the parameters DP-SGD trains; the others are frozen
  (requires_grad False), so the mechanism clips and noises exactly the trained ones
  (dpdm.privacy trains `p.requires_grad` parameters only): `all` (the paper), `attention`
  (the self-attention blocks), `bias_norm` (biases and normalisation scales, as in
  BitFit / DP-LDM's cheapest variant), or a list of glob patterns of parameter names
  (`fnmatch`, e.g. ["net.dec.*", "*.attn.*"]).
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

from dpdm.config import architecture_difference
from dpdm.errors import DPDMError

log = logging.getLogger("dpdm.finetune")

CLASS_EMBEDDING = "net.map_label.weight"
SUBSETS = {
    "all": lambda name: True,
    "attention": lambda name: ".attn." in name,
    # biases, and the scales of every GroupNorm (modules named norm0, norm1, attn.norm, out_norm)
    "bias_norm": lambda name: name.endswith(".bias") or "norm" in name.split(".")[-2],
}


def select(names: list[str], finetune) -> set[str]:
    """The parameter names `finetune` (a SUBSETS key or a list of glob patterns) selects."""
    if isinstance(finetune, str):
        if finetune not in SUBSETS:
            raise DPDMError(f"config key 'train.finetune': unknown subset {finetune!r}; choose one of "
                            f"{sorted(SUBSETS)} or give a list of parameter-name patterns (e.g. ['*.attn.*'])")
        chosen = {n for n in names if SUBSETS[finetune](n)}
    else:
        patterns = list(finetune)
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise DPDMError(f"config key 'train.finetune': the pattern(s) {unmatched} match no parameter of the "
                            f"network (names look like {names[1]!r}, {names[-1]!r}); fix the pattern or use one "
                            f"of {sorted(SUBSETS)}")
        chosen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not chosen:
        raise DPDMError(f"config key 'train.finetune': {finetune!r} selects no parameter of this network; "
                        f"choose another of {sorted(SUBSETS)} or a list of parameter-name patterns")
    return chosen


def freeze_all_but(precond, finetune, always: set[str] = frozenset()) -> dict:
    """Freeze every parameter that `finetune` does not select (nor `always`); returns
    {"selection", "trained_tensors", "total_tensors", "trained_parameters",
    "total_parameters"} for the ledger, and the trained tensors' names when not all train
    (a named subset's meaning would otherwise depend on the code version)."""
    names = [n for n, _ in precond.named_parameters()]
    trained = select(names, finetune) | (set(always) & set(names))
    for n, p in precond.named_parameters():
        p.requires_grad_(n in trained)
    sizes = {n: p.numel() for n, p in precond.named_parameters()}
    out = {"selection": finetune, "trained_tensors": len(trained), "total_tensors": len(names),
           "trained_parameters": sum(sizes[n] for n in trained), "total_parameters": sum(sizes.values())}
    if len(trained) < len(names):
        out["trained_names"] = sorted(trained)
    return out


def pretrained_path(results_dir: str | Path, name: str) -> Path:
    return Path(results_dir) / "pretrain" / name / "model.pt"


def load_pretrained(path: Path, settings: dict, spec: dict) -> tuple[dict, dict]:
    """The public model's EMA state dict, checked against the cell (architecture, image
    shape), with its class embedding removed when the label spaces differ; and a record
    for the ledger. spec: the cell's {resolution, channels, num_classes}."""
    import torch

    from dpdm.artifacts import sha256_file, torch_load_error
    from dpdm.diffusion import MODEL_FORMAT

    path = Path(path)
    if not path.is_file():
        raise DPDMError(f"train.init.pretrained: the public model {path} does not exist; run the pretrain stage "
                        f"first (snakemake {path}, or python -m dpdm pretrain) or fix the name")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DPDMError(f"train.init.pretrained: {path} cannot be read ({torch_load_error(e)}); run the pretrain "
                        "stage again") from e
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT or "pretrain" not in obj:
        raise DPDMError(f"train.init.pretrained: {path} is not a model written by `python -m dpdm pretrain`; a DP "
                        "cell's model cannot be a public initialisation")
    diff = architecture_difference(obj["settings"], settings)
    if diff:
        key = diff[0].split(".")[0]
        raise DPDMError(f"train.init.pretrained: {path} has another {key} than this cell (differing keys: "
                        f"{', '.join(diff)}); pre-train with the cell's {key} settings, or set the cell's to the "
                        "public model's")
    for key in ("resolution", "channels"):
        if int(obj["spec"][key]) != int(spec[key]):
            raise DPDMError(f"train.init.pretrained: {path} was trained on {key} {obj['spec'][key]}, this cell's "
                            f"data has {spec[key]}; pre-train on public data of the cell's {key}")
    from dpdm.data import shares_examples

    public_data, private_data = obj["pretrain"]["dataset"], (settings.get("cell") or {}).get("dataset")
    if private_data and shares_examples(public_data, private_data):
        raise DPDMError(f"train.init.pretrained: {path} was pre-trained without privacy on {public_data}, which "
                        f"holds examples of this cell's private data ({private_data}); the cell's DP guarantee "
                        f"would not hold. Pre-train on public data disjoint from {private_data}")
    state = dict(obj["ema"])
    fresh_labels = int(obj["spec"]["num_classes"]) != int(spec["num_classes"])
    if fresh_labels:
        state = {k: v for k, v in state.items() if not k.endswith("map_label.weight")}
    record = {"name": obj["pretrain"]["name"], "dataset": obj["pretrain"]["dataset"],
              "public_dataset_sha256": obj["pretrain"]["dataset_sha256"], "steps": int(obj["step"]),
              "model_sha256": sha256_file(path), "public_num_classes": int(obj["spec"]["num_classes"]),
              "class_embedding": "fresh (label spaces differ; trained privately)" if fresh_labels else "pre-trained",
              "privacy_cost": "none: trained on public data only, before and apart from the private data"}
    return state, record


def initialise(precond, path: Path, settings: dict, spec: dict) -> dict:
    """Load the public model into `precond` (the cell's own initial weights stay only where
    the public model has none: a fresh class embedding). Returns the record."""
    state, record = load_pretrained(path, settings, spec)
    missing, unexpected = precond.load_state_dict(state, strict=False)
    allowed = {CLASS_EMBEDDING} if record["class_embedding"].startswith("fresh") else set()
    if unexpected or set(missing) - allowed:
        raise DPDMError(f"train.init.pretrained: {path} does not fit this network (missing {sorted(missing)[:4]}, "
                        f"unexpected {sorted(unexpected)[:4]}); pre-train it with the cell's model settings")
    log.info("initialised from the public model %s (%s, %d steps; class embedding %s)", path, record["dataset"],
             record["steps"], record["class_embedding"])
    return record
