"""The privacy ledger (privacy.json): what was released, under which guarantee, at what epsilon."""

from __future__ import annotations

from dpdm.privacy.accounting import check_privacy_params, epsilon_from_history

NEIGHBOURING = ("add/remove one training example (example-level DP). The number of training examples N is treated "
                "as public (as Opacus does): it sets the sampling rate q = batch_size / N and appears in this ledger")
# What the guarantee covers: the outputs of the mechanism and their post-processing with
# public or test data only. What it does not: anything computed from the private split
# without noise. Every table and figure that shows a non-covered number says so.
GENERATOR_COVERS = (
    "model.pt (raw and EMA weights)",
    "samples_*.npz and grid_*.png (generated from the model)",
    "classify_*.json: classifiers trained on the samples, selected on a synthetic validation split, tested on the "
    "real test set",
    "fid_*.json and precision/recall against the TEST split (samples vs. public test data)",
)
GENERATOR_NOT_COVERED = (
    "FID and precision/recall against the TRAINING split (fid.reference_split: train, the paper's protocol): a "
    "statistic of the private data, not post-processing of the model; labelled in every table and figure",
    "private/ (train_metrics.csv: losses, clipped fractions, gradient norms and realised batch sizes computed on "
    "private data without noise; the hashes of the private inputs)",
    "logs/ and benchmarks/ (the same statistics and the timings of the training job)",
    "checkpoints/ (the secret randomness of the mechanism; deleted when training finishes)",
    "choices made by looking at any of the above: listed under `choices_on_private_data`",
)
PRV_EPS_ERROR = 0.01  # Opacus PRVAccountant default: the reported value is its upper bound

GENERATOR_MECHANISM = "DP-SGD: Poisson-subsampled Gaussian mechanism on per-example clipped gradients"


def privacy_ledger(*, history, num_examples: int, sample_rate: float, noise_multiplier: float, clip: float,
                   noise_multiplicity: int, delta: float, target_eps: float, calibration: str, accountant: str,
                   planned_steps: int, seed: int, provenance: dict | None, secret_randomness: bool = True,
                   covers=GENERATOR_COVERS, not_covered=GENERATOR_NOT_COVERED, choices=(),
                   per_example_gradients: str = "rows", world_size: int = 1,
                   mechanism: str = GENERATOR_MECHANISM, model_selection: str | None = None) -> dict:
    """What privacy.json records: the mechanism's parameters and the epsilon it spent.

    Every epsilon here is recomputed by an accountant from `history` (the steps the
    mechanism actually took, with their sigma and q), by RDP and by PRV. It holds no
    function of the private data beyond N (no hash, no class counts): published files
    must not fingerprint the training set. `choices` lists decisions made by looking at
    numbers the guarantee does not cover (config privacy.choices_on_private_data).
    `per_example_gradients` names how they were computed (rows, vmap, or Opacus' hooks
    for the DP-SGD baselines) and `world_size` the number of processes that trained;
    `mechanism` describes the mechanism in words and `model_selection` (when given) how
    the released model was chosen.
    """
    import opacus

    check_privacy_params(target_eps, delta, num_examples)
    history = [[float(s), float(q), int(n)] for s, q, n in history]
    steps = sum(n for _, _, n in history)
    eps = {"rdp": epsilon_from_history(history, delta, "rdp")}
    errors = {}
    try:
        eps["prv"] = epsilon_from_history(history, delta, "prv")
    except Exception as e:  # PRV can fail numerically; RDP is then the guarantee
        eps["prv"] = None
        errors["prv"] = f"{type(e).__name__}: {e}"
    calibrated = eps.get(accountant)
    ledger = {
        "mechanism": mechanism,
        "neighbouring": NEIGHBOURING,
        "covers": list(covers),
        "not_covered": list(not_covered),
        "choices_on_private_data": list(choices),
        "num_examples": int(num_examples),
        "sample_rate": float(sample_rate),
        "expected_batch_size": float(sample_rate) * int(num_examples),
        "steps": int(steps),
        "planned_steps": int(planned_steps),
        "epochs": steps * float(sample_rate),
        "noise_multiplier": float(noise_multiplier),
        "clip": float(clip),
        "noise_std": float(noise_multiplier) * float(clip),
        "noise_multiplicity": int(noise_multiplicity),
        "delta": float(delta),
        "target_eps": float(target_eps),
        "calibration": {"method": calibration, "accountant": accountant,
                        "tolerance": "relative 1e-3" if calibration == "tight" else "absolute 0.01 (Opacus default)"},
        "eps_rdp": eps["rdp"],
        "eps_prv": eps["prv"],
        "within_target": calibrated is not None and calibrated <= float(target_eps),
        "accountants": {
            "rdp": {"library": "opacus", "version": opacus.__version__, "class": "RDPAccountant",
                    "orders": "Opacus default"},
            "prv": {"library": "opacus", "version": opacus.__version__, "class": "PRVAccountant",
                    "eps_error": PRV_EPS_ERROR, "delta_error": float(delta) / 1000, "reported": "upper bound"},
        },
        "history": history,
        "seed": int(seed),
        "dp_randomness": ("secret: Poisson sampling, DP noise and each example's loss randomness (keyed by a secret "
                          "key, the step and the example's index) seeded from OS entropy, never recorded"
                          if secret_randomness else
                          "REPRODUCIBLE (dp_seed given): Poisson sampling, DP noise and the per-example loss "
                          "randomness follow a known seed; the guarantee holds only against adversaries who do not "
                          "know it"),
        "per_example_gradients": per_example_gradients,
        "world_size": int(world_size),
        "provenance": provenance,
    }
    if errors:
        ledger["accountant_errors"] = errors
    if model_selection is not None:
        ledger["model_selection"] = model_selection
    return ledger
