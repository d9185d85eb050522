"""The DP training loop: DP-SGD steps, EMA, metrics, checkpoints, exact resume, signals.

`train(settings, data_dir, out_dir)` trains one cell (dataset, eps, seed):

* N = number of training images, q = train.batch_size / N (Poisson sampling rate),
  planned steps T = ceil(train.epochs / q), capped by train.max_steps;
  sigma is calibrated for (target eps, delta, q, T) by privacy.calibration / accountant.
* every step is one DP-SGD step (dpdm.privacy.DPSGD): Poisson batch, K noise draws
  per example, per-example clipped gradients of the K-averaged loss, Gaussian noise,
  division by the expected batch size, Adam; then an EMA of the weights.
* outputs, written into a staging folder and moved into the cell only when all are
  complete (so a finished cell is never removed before its replacement is whole), in this order:
      {out}/private/train_metrics.csv  per logged step (means over the steps since the last row)
      {out}/private/run.json           sha256 of the training data read, timings (private)
      {out}/model.pt           raw + EMA weights, settings, spec, step (diffusion.save_model)
      {out}/privacy.json       the ledger: epsilon recomputed from the steps ACTUALLY taken
  privacy.json is written last: its presence marks a finished cell.

Checkpoints ({checkpoint_dir}/checkpoint.pt; default {out}/checkpoints/, not a workflow
output) are written every train.checkpoint_every steps and when SIGTERM or SIGUSR1
arrives (SLURM sends one before the time limit: `--signal=TERM@600` in the train rule's slurm_extra). The handler only
sets a flag; the current step finishes, the checkpoint is saved, and the process exits
with status EXIT_CHECKPOINTED (75, EX_TEMPFAIL of sysexits.h: "temporary failure, try
again") so the scheduler retries; the retry resumes exactly: same weights, EMA,
optimizer state, random streams, metrics and accountant history, each step counted
once. A checkpoint written with different training settings is refused with an error
naming it. The checkpoint is deleted after a successful finish.

Randomness: the initial weights follow the cell seed (they do not depend on the data).
Everything else that training draws is part of the mechanism and secret (OS entropy)
unless a DP seed is given (`dp_seed=` or the environment variable DPDM_DP_SEED): the
Poisson sampling, the DP noise, and the diffusion loss's noise levels, noise and label
dropout, which each example draws from its own generator keyed by the secret key, the
step and its index (`private_batch`; see dpdm.privacy). Checkpoints hold the generator
states and the key, so treat checkpoints as private as the training data.

EMA: the decay ramps up as in NVlabs/edm (`ema_decay_at`, config train.ema_rampup) to
the paper's train.ema_decay, so short runs sample from trained weights.

The cell's private/ folder holds what is NOT covered by the DP guarantee and must not
be published: train_metrics.csv (loss, fraction clipped, gradient norms and realised batch
sizes, computed on the private data WITHOUT noise; a diagnostic for the data owner) and
the hashes of the private inputs (a hash of train.npz would fingerprint the training
set). privacy.json lists what is covered and what is not.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpdm.artifacts import (DPDMError, atomic_path, check_writable, exclusive_lock, provenance,
                            save_json, save_torch, seed_everything, sha256_file, sha256_json, staged_outputs,
                            torch_load_error)
from dpdm.devices import pick_device
from dpdm.layout import CELL_FILES

log = logging.getLogger("dpdm.train")

EXIT_CHECKPOINTED = 75  # exit status after a signal-triggered checkpoint (EX_TEMPFAIL: retry me)
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # SIGINT: Ctrl-C checkpoints too; a second one aborts
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "dpdm-train-checkpoint-v2"  # v2: secret per-example loss randomness
MODEL_FILE, LEDGER_FILE = CELL_FILES["model"], CELL_FILES["privacy"]
METRICS_FILE = CELL_FILES["metrics"]  # not covered by the DP guarantee: private
PRIVATE_RUN_FILE = CELL_FILES["run"]  # sha256 of the data read, timings
METRICS_COLUMNS = ("step", "epoch", "loss", "batch_size", "frac_clipped", "grad_norm", "eps_rdp", "lr", "seconds")

# Settings that cannot change what training computes (they are excluded from the
# checkpoint's settings hash, so changing them does not invalidate a checkpoint).
# physical_batch_size and grad_chunk_size bound memory only: the mechanism is the
# same, only float summation order (last-bit rounding) can differ after a change.
NON_TRAINING_KEYS = ("samplers", "sample", "classify", "baseline", "fid", "paths", "device")
NON_TRAINING_TRAIN_KEYS = ("checkpoint_every", "log_every", "physical_batch_size", "grad_chunk_size")


def training_settings(settings: dict) -> dict:
    """The part of a cell's settings that determines the trained weights."""
    s = {k: copy.deepcopy(v) for k, v in settings.items() if k not in NON_TRAINING_KEYS}
    s["train"] = {k: v for k, v in (s.get("train") or {}).items() if k not in NON_TRAINING_TRAIN_KEYS}
    return s


def training_settings_hash(settings: dict) -> str:
    return sha256_json(training_settings(settings))


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _differing_keys(a: dict, b: dict) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<unset>") != fb.get(k, "<unset>"))


# ----------------------------------------------------------------------------
# Signals.


class StopFlag:
    """SIGTERM / SIGUSR1 / SIGINT handler: remember the signal; the loop acts at the end
    of a step (checkpoint, exit EXIT_CHECKPOINTED). A second Ctrl-C aborts at once."""

    def __init__(self, watch_parent: bool = False):
        self.signum = None
        self._previous = {}
        self._parent = os.getppid() if watch_parent else 0

    def reason(self) -> str | None:
        """Why training should stop now: a signal's name, the parent's death (Snakemake
        killed: a job must not train on as an orphan that a rerun would duplicate), or None."""
        if self.signum is not None:
            return signal.Signals(self.signum).name
        if self._parent > 1 and os.getppid() != self._parent:
            return f"the death of the parent process (pid {self._parent})"
        return None

    def __call__(self, signum, frame):
        if signum == self.signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopped without a checkpoint of this step")
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: finishing this step, then checkpointing (press Ctrl-C again to abort at once)")
        self.signum = signum

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self)
        return self

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------
# Random state.


def _rng_state() -> dict:
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------
# Metrics.


def _metrics_rows(records: list[dict], log_every: int, planned: int) -> list[dict]:
    """One row per logged step (every log_every steps and the last): means over the
    steps since the previous row (loss, clip fraction and norm weighted by batch size)."""
    rows, window = [], []
    for r in records:
        window.append(r)
        if r["step"] % log_every == 0 or r["step"] == planned:
            n = sum(w["batch_size"] for w in window)

            def wmean(key):
                vals = [(w[key], w["batch_size"]) for w in window if w["batch_size"] > 0]
                return sum(v * b for v, b in vals) / n if n else float("nan")

            rows.append({
                "step": r["step"],
                "epoch": r["epoch"],
                "loss": wmean("loss"),
                "batch_size": n / len(window),
                "frac_clipped": wmean("frac_clipped"),
                "grad_norm": wmean("grad_norm"),
                "eps_rdp": r["eps_rdp"],
                "lr": r["lr"],
                "seconds": r["seconds"],
            })
            window = []
    return rows


def write_metrics_csv(path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(METRICS_COLUMNS))
            w.writeheader()
            for row in rows:
                w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in METRICS_COLUMNS})


# ----------------------------------------------------------------------------
# The loop.


def ema_decay_at(step: int, expected_batch: float, decay: float, rampup: float | None) -> float:
    """The EMA decay after DP step `step` (1-based), with NVlabs/edm's warm-up.

    EDM keeps an EMA whose half-life, counted in images, is at most `rampup` times the
    images seen so far (`ema_rampup_ratio`, default 0.05): early in training the average
    forgets the random initial weights within a few steps instead of holding 0.999^n of
    them (64 % after 450 steps, 98 % after 23). In steps, with B images per step, that
    half-life is rampup * step, i.e. beta = 0.5^(1 / (rampup * step)); the paper's
    `decay` (0.999, a half-life of 693 steps) is the limit: min(decay, beta).
    The batch size cancels out; it is a parameter so the formula reads as EDM's.
    rampup None or 0: the constant `decay` (no warm-up)."""
    if not rampup:
        return float(decay)
    halflife_images = float(rampup) * step * expected_batch
    beta = 0.5 ** (expected_batch / max(halflife_images, 1e-8))
    return min(float(decay), beta)


def update_ema(ema, model, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied."""
    import torch

    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def _dataset_checksum(data_dir: Path, meta: dict) -> str:
    """sha256 of the train.npz actually read, checked against meta.json's record."""
    path = data_dir / "train.npz"
    digest = sha256_file(path)
    recorded = (meta.get("npz_sha256") or {}).get("train.npz") or (meta.get("files") or {}).get("train.npz")
    if recorded and recorded != digest:
        raise DPDMError(f"{path} has sha256 {digest} but {data_dir / 'meta.json'} records {recorded}: the data "
                        f"changed after it was prepared; run python -m dpdm prepare again for {data_dir}")
    return digest


def _check_data_matches(settings: dict, meta: dict, data_dir: Path) -> None:
    """The prepared data must be the cell's: its dataset, and for digits the size the
    settings ask for (data.digits_size); otherwise the ledger would describe other data."""
    cell_ds = (settings.get("cell") or {}).get("dataset")
    if cell_ds and meta.get("dataset") != cell_ds:
        raise DPDMError(f"{data_dir} holds the prepared {meta.get('dataset')!r} data, but this cell trains on "
                        f"{cell_ds!r}: pass --data for {cell_ds}")
    from dpdm import data

    size = (settings.get("data") or {}).get("digits_size")
    if data.is_digits(str(meta.get("dataset"))) and size is not None and int(size) != int(meta["resolution"]):
        raise DPDMError(f"the settings ask for data.digits_size {size} but {data_dir} holds {meta['resolution']}x"
                        f"{meta['resolution']} digits: prepare them again with --digits-size {size} (or set "
                        f"data.digits_size: {meta['resolution']})")


def private_batch(dp, precond, images, labels, indices, k: int, label_dropout: float,
                  augment: dict | None = None) -> tuple:
    """The DP step's per-example inputs (y, label, sigma [B, K], noise [B, K, C, H, W]) for
    the Poisson batch `indices`: images in [-1, 1] (with augmentation multiplicity, y is
    each draw's augmented copy [B, K, C, H, W]: dpdm.augment), and the loss's randomness
    drawn per example from the mechanism's secret per-example generators
    (DPSGD.example_generators), so each example's draws depend only on the secret key,
    the step and its index."""
    from dpdm import augment as aug
    from dpdm import diffusion

    num_classes = precond.num_classes
    generators = dp.example_generators(indices, images.device)
    draw = diffusion.draw_example_noise(precond, generators, k, tuple(images.shape[1:]), num_classes, label_dropout,
                                        device=images.device)
    lab = None if labels is None else diffusion.apply_label_dropout(labels.to(images.device), draw.drop,
                                                                    num_classes)
    # each example's K augmentations: from its generator, after its noise (dpdm.augment)
    y = images if augment is None else aug.apply(images, aug.draw_batch(generators, k, augment, images.device),
                                                 augment["translate"])
    return y, lab, draw.sigma, draw.noise


def plan(settings: dict, num_examples: int) -> dict:
    """Sampling rate, planned steps and the calibrated noise multiplier of a cell."""
    from dpdm import privacy

    tr, pr = settings["train"], settings["privacy"]
    target_eps, delta = pr.get("target_eps"), float(pr["delta"])
    if target_eps is None:
        raise DPDMError("settings.privacy.target_eps is not set; resolve the cell with dpdm.config.resolve_cell")
    privacy.check_privacy_params(float(target_eps), delta, num_examples)
    batch = int(tr["batch_size"])
    if batch > num_examples:
        raise DPDMError(f"train.batch_size = {batch} exceeds the {num_examples} training examples; lower it")
    q = batch / num_examples
    steps = privacy.steps_for(float(tr["epochs"]), q)
    if tr.get("max_steps"):
        steps = min(steps, int(tr["max_steps"]))
    sigma = privacy.noise_multiplier_for(float(target_eps), delta, q, steps,
                                         accountant=pr["accountant"], calibration=pr["calibration"])
    return {"sample_rate": q, "planned_steps": steps, "noise_multiplier": sigma, "target_eps": float(target_eps),
            "delta": delta, "num_examples": int(num_examples)}


def train(settings: dict, data_dir, out_dir, checkpoint_dir=None, *, dp_seed: int | None = None,
          stop_with_parent: bool = False, init_path=None) -> dict:
    """Train one cell; write model.pt, privacy.json, private/train_metrics.csv. Returns a summary.

    dp_seed: seed of the Poisson sampling and DP noise (default: $DPDM_DP_SEED if set,
    else secret OS entropy). A known seed makes runs reproducible but not private
    against anyone who knows it; privacy.json records which.
    Raises SystemExit(EXIT_CHECKPOINTED) after checkpointing when SIGTERM/SIGUSR1/SIGINT
    arrives, or (stop_with_parent: the workflow's jobs) when the parent process dies, so
    a killed Snakemake leaves no orphan training that a rerun would duplicate; off by
    default, so `nohup python -m dpdm train ... &` outlives its shell. init_path: the public
    model of train.init.pretrained (dpdm.finetune). Before any compute, rank 0 checks that the cell
    and checkpoint folders are writable and takes the cell's lock (one training per cell).
    """
    from dpdm import privacy

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    init_path = Path(init_path) if init_path else None
    rank, world, distributed = privacy.rank_world()
    if rank != 0:
        return _train(settings, data_dir, out_dir, checkpoint_dir, dp_seed, stop_with_parent, init_path)
    check_writable(out_dir, "cell folder")
    with exclusive_lock(out_dir, "cell"):  # one training per cell at a time
        check_writable(checkpoint_dir, "checkpoint folder")
        return _train(settings, data_dir, out_dir, checkpoint_dir, dp_seed, stop_with_parent, init_path)


@dataclasses.dataclass
class TrainState:
    """What a training run carries from step to step, and a checkpoint holds: the
    denoiser, its EMA, Adam, the mechanism (its Poisson-sampling and noise generators,
    the per-example key and the accountant's history), the metrics so far and the
    seconds spent. `checkpoint` and `restore` are exact inverses (with the global RNG
    states), so a resumed run continues bit for bit."""

    precond: Any
    ema: Any
    optimizer: Any
    dp: Any
    records: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def checkpoint(self, guard: dict) -> dict:
        """The checkpoint: `guard` (what a resume must match: settings, data, plan) and the state."""
        return {"format": CHECKPOINT_FORMAT, **guard, "step": self.dp.steps,
                "model": self.precond.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "dp": self.dp.state_dict(), "rng": _rng_state(),
                "metrics": self.records, "seconds": self.seconds}

    def restore(self, ck: dict) -> None:
        self.precond.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.dp.load_state_dict(ck["dp"])
        _set_rng_state(ck["rng"])
        self.records = list(ck["metrics"])
        self.seconds = float(ck["seconds"])


def _stop_reason(stop: StopFlag, distributed: bool, device) -> str | None:
    """Why to stop after this step (a signal, the parent's death), agreed by all ranks."""
    import torch
    import torch.distributed as dist

    reason = stop.reason()
    if distributed:  # any rank stopping -> all stop together
        flag = torch.tensor([0.0 if reason is None else 1.0], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and reason is None:
            reason = "a stop signal on another rank"
    return reason


# Longer than most functions here on purpose: the whole loop reads top to bottom in one place.
def _train(settings: dict, data_dir: Path, out_dir: Path, checkpoint_dir: Path, dp_seed: int | None,
           stop_with_parent: bool = False, init_path: Path | None = None) -> dict:
    """The loop of DPDM's Algorithm 1: sample a Poisson batch, take a DP-SGD step on its
    K-noised copies, update the EMA; checkpoint every train.checkpoint_every steps or on
    a stop request; write the outputs at the end."""
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from dpdm import augment as aug
    from dpdm import data, diffusion, privacy

    started = time.time()
    ckpt_path = checkpoint_dir / CHECKPOINT_NAME
    rank, world, distributed = privacy.rank_world()
    tr, pr = settings["train"], settings["privacy"]
    d = _load_training_data(settings, data_dir)
    p, n, device = plan(settings, d["n"]), d["n"], pick_device(settings["device"])
    if world > p["sample_rate"] * n:
        raise DPDMError(f"{world} processes for an expected logical batch of {p['sample_rate'] * n:.1f} examples: "
                        "most ranks would have nothing to compute; use at most as many processes (GPUs) as "
                        "examples per batch (resources.train.gpu / processes), or a larger train.batch_size")
    if distributed and rank == 0:
        log.info("%d processes (world size %d, %s): each computes a shard of every logical batch, rank 0 adds "
                 "the noise and writes the outputs", world, world, device)
    q, planned, sigma, delta = p["sample_rate"], p["planned_steps"], p["noise_multiplier"], p["delta"]
    k, label_dropout, log_every = int(tr["noise_multiplicity"]), float(tr["label_dropout"]), int(tr["log_every"])
    augment = aug.check(tr.get("augment"), d["resolution"])  # augmentation multiplicity (None: off)

    seed_everything(int(settings["cell"]["seed"]))  # the initial weights: public, from the cell seed
    precond = diffusion.build_precond(settings, d["resolution"], d["channels"], d["num_classes"]).to(device)
    public_init, trained = _initialise(precond, settings, init_path, d)  # fine-tuning: public weights, a subset
    optimizer = torch.optim.Adam([t for t in precond.parameters() if t.requires_grad], lr=float(tr["lr"]))
    dp = privacy.DPSGD(diffusion.example_loss, noise_multiplier=sigma, max_grad_norm=float(pr["clip"]),
                       num_examples=n, sample_rate=q, optimizer=optimizer,
                       physical_batch_size=tr["physical_batch_size"], grad_chunk_size=tr["grad_chunk_size"],
                       dp_seed=privacy.dp_seed_from_env(dp_seed), device=device, batch_loss_fn=diffusion.batch_example_losses)
    state = TrainState(precond, copy.deepcopy(precond).requires_grad_(False).eval(), optimizer, dp)
    guard = {"settings_hash": training_settings_hash(settings), "training_settings": training_settings(settings),
             "dataset_sha256": d["sha256"], "device_type": device.type, "planned_steps": planned,
             "noise_multiplier": sigma, "init_sha256": public_init and public_init["model_sha256"]}
    _log_plan(settings, p, n, k, precond, device, dp.secret_randomness)
    if ckpt_path.exists():
        state.restore(_load_checkpoint(ckpt_path, settings, guard))
        log.info("resumed from %s at step %d/%d", ckpt_path, dp.steps, planned)
    elif (out_dir / LEDGER_FILE).exists():
        log.warning("%s holds a finished cell: it stays until this run's outputs are complete, then is replaced",
                    out_dir)

    def save_checkpoint():
        if rank == 0:
            save_torch(ckpt_path, state.checkpoint(guard))
            log.info("checkpoint at step %d -> %s", dp.steps, ckpt_path)
        if distributed:
            dist.barrier()

    images, labels = torch.from_numpy(d["images"]), torch.from_numpy(d["labels"]) if d["num_classes"] else None
    stop = StopFlag(watch_parent=stop_with_parent).install()
    bar = tqdm(total=planned, initial=dp.steps, desc=f"train {settings['cell']['eps_tag']}", unit="step",
               disable=rank != 0, dynamic_ncols=True)
    try:
        precond.train()
        while dp.steps < planned:
            t0 = time.time()
            idx = dp.poisson_batch()
            y = data.to_model_range(images[idx]).to(device)
            stats = dp.step(precond, private_batch(dp, precond, y, None if labels is None else labels[idx], idx, k,
                                                   label_dropout, augment))
            update_ema(state.ema, precond, ema_decay_at(dp.steps, q * n, float(tr["ema_decay"]), tr["ema_rampup"]))
            state.seconds += time.time() - t0
            _record_step(state, stats, p, bar, log_every)
            reason = _stop_reason(stop, distributed, device)
            if reason is not None and dp.steps == planned:
                log.warning("received a stop signal during the last step: writing the outputs instead of a checkpoint")
            elif reason is not None:
                save_checkpoint()
                log.warning("received %s: checkpointed at step %d/%d; exiting with status %d so the job is retried",
                            reason, dp.steps, planned, EXIT_CHECKPOINTED)
                raise SystemExit(EXIT_CHECKPOINTED)
            if dp.steps % int(tr["checkpoint_every"]) == 0 and dp.steps < planned:
                save_checkpoint()
    finally:
        bar.close()
        stop.restore()

    summary = {"steps": dp.steps, "noise_multiplier": sigma, "sample_rate": q, "model": str(out_dir / MODEL_FILE),
               "privacy": str(out_dir / LEDGER_FILE), "metrics": str(out_dir / METRICS_FILE)}
    if rank == 0:
        with staged_outputs(out_dir, marker=LEDGER_FILE) as stage:  # the old cell stays until this is whole
            ledger = _write_outputs(stage, settings, p, state, d, data_dir=data_dir, device=device, world=world,
                                    started=started, init=(public_init, trained))
        _remove_checkpoint(ckpt_path)
        log.info("done: %d steps, eps_rdp = %.4f, eps_prv = %s (target %g, delta %g) -> %s", dp.steps,
                 ledger["eps_rdp"], ledger["eps_prv"], p["target_eps"], delta, out_dir)
        summary.update(eps_rdp=ledger["eps_rdp"], eps_prv=ledger["eps_prv"])
    if distributed:
        dist.barrier()
    return summary


def _initialise(precond, settings: dict, init_path: Path | None, d: dict) -> tuple[dict | None, dict]:
    """train.init / train.finetune (dpdm.finetune): load the public model into `precond`
    and freeze what DP-SGD does not train. Returns (the public model's record or None,
    the trained parameters' record)."""
    from dpdm import finetune

    tr = settings["train"]
    name = (tr.get("init") or {}).get("pretrained")
    selection = tr.get("finetune", "all")
    if name is None:
        if init_path is not None:
            raise DPDMError(f"--init {init_path} given, but the cell's train.init.pretrained is not set; set it to "
                            "the public model's name (the ledger must say where the weights came from)")
        if selection != "all":
            raise DPDMError(f"config key 'train.finetune' is {selection!r} but train.init.pretrained is not set: a "
                            "random network would train with parts frozen at random; set train.init.pretrained "
                            "or train.finetune: all")
        return None, finetune.freeze_all_but(precond, "all")
    if init_path is None:
        raise DPDMError(f"the cell's train.init.pretrained is {name!r}: pass its model with --init "
                        f"(results/pretrain/{name}/model.pt)")
    spec = {k: d[k] for k in ("resolution", "channels", "num_classes")}
    record = finetune.initialise(precond, init_path, settings, spec)
    always = {finetune.CLASS_EMBEDDING} if record["class_embedding"].startswith("fresh") else set()
    trained = finetune.freeze_all_but(precond, selection, always=always)
    log.info("fine-tuning %d of %d parameters (%s) with DP-SGD", trained["trained_parameters"],
             trained["total_parameters"], selection)
    return record, trained


def _load_training_data(settings: dict, data_dir: Path) -> dict:
    """The prepared train split (only it: the test split is never read here), checked
    against meta.json and the settings."""
    from dpdm import data

    meta = data.load_meta(data_dir)
    images, labels = data.load_split(data_dir, "train")
    resolution, channels = int(meta["resolution"]), int(meta["channels"])
    if images.shape[1:] != (resolution, resolution, channels):
        raise DPDMError(f"{data_dir}/train.npz holds images {images.shape[1:]}, meta.json says "
                        f"{(resolution, resolution, channels)}; prepare the dataset again")
    _check_data_matches(settings, meta, data_dir)
    return {"images": images, "labels": labels, "n": len(images), "resolution": resolution, "channels": channels,
            "num_classes": int(meta.get("num_classes") or 0), "sha256": _dataset_checksum(data_dir, meta)}


def _log_plan(settings: dict, p: dict, n: int, k: int, precond, device, secret: bool) -> None:
    from dpdm.networks import count_parameters

    pr = settings["privacy"]
    q = p["sample_rate"]
    log.info("cell %s: N = %d, q = %.6g (expected batch %.1f), planned steps %d (%.4g epochs), sigma = %.6g "
             "(%s calibration, %s accountant), C = %g, K = %d, %d parameters, device %s", settings["cell"], n, q,
             q * n, p["planned_steps"], p["planned_steps"] * q, p["noise_multiplier"], pr["calibration"],
             pr["accountant"], float(pr["clip"]), k, count_parameters(precond), device)
    if not secret:
        from dpdm.privacy import DP_SEED_ENV

        log.warning("Poisson sampling, DP noise and per-example loss randomness follow a fixed seed (dp_seed / %s): "
                    "reproducible, but NOT secret", DP_SEED_ENV)


def _record_step(state: TrainState, stats: dict, p: dict, bar, log_every: int) -> None:
    """Append the step's metrics (private: computed without noise), advance the bar, log."""
    step, q, planned = state.dp.steps, p["sample_rate"], p["planned_steps"]
    logged = step % log_every == 0 or step == planned
    state.records.append({
        "step": step, "epoch": step * q, "loss": stats["loss"], "batch_size": stats["batch_size"],
        "frac_clipped": stats["frac_clipped"], "grad_norm": stats["grad_norm"],
        "eps_rdp": state.dp.epsilon(p["delta"], "rdp") if logged else None,
        "lr": state.optimizer.param_groups[0]["lr"], "seconds": state.seconds,
    })
    bar.update(1)
    if logged:
        eps = state.records[-1]["eps_rdp"]
        bar.set_postfix(loss=f"{stats['loss']:.4f}", eps=f"{eps:.3f}")
        log.info("step %d/%d epoch %.3f loss %.5f batch %d clipped %.3f grad_norm %.4g eps_rdp %.4f", step, planned,
                 step * q, stats["loss"], stats["batch_size"], stats["frac_clipped"], stats["grad_norm"], eps)


def _remove_checkpoint(ckpt_path: Path) -> None:
    """A finished cell needs no checkpoint (it holds the mechanism's secret randomness)."""
    if ckpt_path.exists():
        ckpt_path.unlink()
        try:
            ckpt_path.parent.rmdir()
        except OSError:
            pass


def _write_outputs(stage: Path, settings: dict, p: dict, state: TrainState, d: dict, data_dir: Path, device,
                   world: int, started: float, init: tuple = (None, None)) -> dict:
    """Write a finished cell's files into `stage` (dpdm.artifacts.staged_outputs): metrics,
    model, the private run record, then the ledger. Returns the ledger."""
    from dpdm import augment as aug
    from dpdm import diffusion, privacy

    tr, pr, dp = settings["train"], settings["privacy"], state.dp
    sigma, q, n, delta, planned = (p["noise_multiplier"], p["sample_rate"], p["num_examples"], p["delta"],
                                   p["planned_steps"])
    seed, k = int(settings["cell"]["seed"]), int(tr["noise_multiplicity"])
    write_metrics_csv(stage / METRICS_FILE, _metrics_rows(state.records, int(tr["log_every"]), planned))
    spec = {"resolution": d["resolution"], "channels": d["channels"], "num_classes": d["num_classes"]}
    diffusion.save_model(stage / MODEL_FILE, state.precond, state.ema, settings, spec, dp.steps)
    ledger = privacy.privacy_ledger(
        history=dp.history, num_examples=n, sample_rate=q, noise_multiplier=sigma, clip=float(pr["clip"]),
        noise_multiplicity=k, delta=delta, target_eps=p["target_eps"],
        calibration=pr["calibration"], accountant=pr["accountant"], planned_steps=planned, seed=seed, secret_randomness=dp.secret_randomness,
        choices=pr["choices_on_private_data"], per_example_gradients=dp.per_example_method, world_size=world,
        provenance=provenance(cell=settings.get("cell"), settings=settings,
                              private_inputs=[data_dir / "train.npz", data_dir / "meta.json"], device=device))
    public_init, trained = init
    ledger["initialisation"] = public_init or {"kind": "random: the network's initial weights from the cell seed"}
    ledger["private_parameters"] = trained  # what DP-SGD trained (clipped and noised); the rest is frozen
    ledger["augmentation_multiplicity"] = aug.check(tr.get("augment"), d["resolution"])  # None: off
    # Timings depend on the realised (secret) batch sizes: private, with the input hashes.
    save_json(stage / PRIVATE_RUN_FILE, {"inputs": {"train.npz": d["sha256"],
                                                    "meta.json": sha256_file(data_dir / "meta.json")},
                                         "data_dir": str(data_dir), "training_seconds": round(state.seconds, 3),
                                         "wall_time_s": round(time.time() - started, 3)})
    save_json(stage / LEDGER_FILE, ledger)
    return ledger


def _load_checkpoint(path: Path, settings: dict, guard: dict) -> dict:
    """The checkpoint at `path`, refused (with the fix) unless it matches `guard`: the
    same training settings, the same train.npz, the same device type and plan."""
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DPDMError(f"checkpoint {path} cannot be read ({torch_load_error(e)}); delete it to start "
                        "this cell over") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise DPDMError(f"checkpoint {path} is not a dpdm training checkpoint ({CHECKPOINT_FORMAT}); delete it")
    if ck["settings_hash"] != guard["settings_hash"]:
        keys = _differing_keys(ck.get("training_settings") or {}, training_settings(settings))
        raise DPDMError(
            f"checkpoint {path} is from a different config (training settings differ: "
            f"{', '.join(keys[:8]) or 'unknown keys'}). Delete {path} to train this config from scratch, "
            "or pass a different --checkpoint-dir.")
    if ck["dataset_sha256"] != guard["dataset_sha256"]:
        raise DPDMError(f"checkpoint {path} was trained on a different train.npz (sha256 {ck['dataset_sha256']}, "
                        f"now {guard['dataset_sha256']}); delete {path} to start over")
    if ck["device_type"] != guard["device_type"]:
        raise DPDMError(f"checkpoint {path} was written on {ck['device_type']} and cannot be resumed exactly on "
                        f"{guard['device_type']}; run on {ck['device_type']} (settings device) or delete {path}")
    if ck.get("init_sha256") != guard["init_sha256"]:
        raise DPDMError(f"checkpoint {path} started from another initialisation (public model sha256 "
                        f"{ck.get('init_sha256')}, now {guard['init_sha256']}); delete {path} to start over")
    if ck["planned_steps"] != guard["planned_steps"] or ck["noise_multiplier"] != guard["noise_multiplier"]:
        raise DPDMError(f"checkpoint {path} planned {ck['planned_steps']} steps at sigma {ck['noise_multiplier']}, "
                        f"this run {guard['planned_steps']} at {guard['noise_multiplier']}; delete {path}")
    return ck
