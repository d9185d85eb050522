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
import logging
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np

from dpdm.artifacts import (DPDMError, atomic_path, check_writable, exclusive_lock, pick_device, provenance,
                            save_json, save_torch, seed_everything, sha256_file, sha256_json, staged_outputs,
                            torch_load_error)

log = logging.getLogger("dpdm.train")

EXIT_CHECKPOINTED = 75  # exit status after a signal-triggered checkpoint (EX_TEMPFAIL: retry me)
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # SIGINT: Ctrl-C checkpoints too; a second one aborts
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "dpdm-train-checkpoint-v2"  # v2: secret per-example loss randomness
METRICS_FILE = "private/train_metrics.csv"  # not covered by the DP guarantee: private
PRIVATE_RUN_FILE = "private/run.json"  # sha256 of the data read, timings
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
    size = (settings.get("data") or {}).get("digits_size")
    if meta.get("dataset") == "digits" and size is not None and int(size) != int(meta["resolution"]):
        raise DPDMError(f"the settings ask for data.digits_size {size} but {data_dir} holds {meta['resolution']}x"
                        f"{meta['resolution']} digits: prepare them again with --digits-size {size} (or set "
                        f"data.digits_size: {meta['resolution']})")


def private_batch(dp, precond, images, labels, indices, k: int, label_dropout: float) -> tuple:
    """The DP step's per-example inputs (y, label, sigma [B, K], noise [B, K, C, H, W]) for
    the Poisson batch `indices`: images in [-1, 1], and the loss's randomness drawn per
    example from the mechanism's secret per-example generators (DPSGD.example_generators),
    so each example's draws depend only on the secret key, the step and its index."""
    from dpdm import diffusion

    num_classes = precond.num_classes
    draw = diffusion.draw_example_noise(precond, dp.example_generators(indices, images.device), k,
                                        tuple(images.shape[1:]), num_classes, label_dropout, device=images.device)
    lab = None if labels is None else diffusion.apply_label_dropout(labels.to(images.device), draw.drop,
                                                                    num_classes)
    return images, lab, draw.sigma, draw.noise


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
                                         accountant=pr.get("accountant", "rdp"),
                                         calibration=pr.get("calibration", "tight"))
    return {"sample_rate": q, "planned_steps": steps, "noise_multiplier": sigma, "target_eps": float(target_eps),
            "delta": delta, "num_examples": int(num_examples)}


def train(settings: dict, data_dir, out_dir, checkpoint_dir=None, *, dp_seed: int | None = None,
          stop_with_parent: bool = False) -> dict:
    """Train one cell; write model.pt, privacy.json, private/train_metrics.csv. Returns a summary.

    dp_seed: seed of the Poisson sampling and DP noise (default: $DPDM_DP_SEED if set,
    else secret OS entropy). A known seed makes runs reproducible but not private
    against anyone who knows it; privacy.json records which.
    Raises SystemExit(EXIT_CHECKPOINTED) after checkpointing when SIGTERM/SIGUSR1/SIGINT
    arrives, or (stop_with_parent: the workflow's jobs) when the parent process dies, so
    a killed Snakemake leaves no orphan training that a rerun would duplicate; off by
    default, so `nohup python -m dpdm train ... &` outlives its shell. Before any compute, rank 0 checks that the cell
    and checkpoint folders are writable and takes the cell's lock (one training per cell).
    """
    from dpdm import privacy

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    rank, world, distributed = privacy.rank_world()
    if rank != 0:
        return _train(settings, data_dir, out_dir, checkpoint_dir, dp_seed, stop_with_parent)
    check_writable(out_dir, "cell folder")
    with exclusive_lock(out_dir, "cell"):  # one training per cell at a time
        check_writable(checkpoint_dir, "checkpoint folder")
        return _train(settings, data_dir, out_dir, checkpoint_dir, dp_seed, stop_with_parent)


def _train(settings: dict, data_dir: Path, out_dir: Path, checkpoint_dir: Path, dp_seed: int | None,
           stop_with_parent: bool = False) -> dict:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from dpdm import data, diffusion, privacy

    started = time.time()
    ckpt_path = checkpoint_dir / CHECKPOINT_NAME
    rank, world, distributed = privacy.rank_world()
    tr, pr = settings["train"], settings["privacy"]
    seed = int(settings.get("cell", {}).get("seed", 0))
    dp_seed = privacy.dp_seed_from_env(dp_seed)

    # Data (train split only) and the plan.
    meta = data.load_meta(data_dir)
    images, labels = data.load_split(data_dir, "train")
    dataset_sha = _dataset_checksum(data_dir, meta)
    n = len(images)
    p = plan(settings, n)
    q, planned, sigma = p["sample_rate"], p["planned_steps"], p["noise_multiplier"]
    resolution, channels = int(meta["resolution"]), int(meta["channels"])
    num_classes = int(meta.get("num_classes", 0) or 0)
    if images.shape[1:] != (resolution, resolution, channels):
        raise DPDMError(f"{data_dir}/train.npz holds images {images.shape[1:]}, meta.json says "
                        f"{(resolution, resolution, channels)}; prepare the dataset again")
    _check_data_matches(settings, meta, data_dir)
    k = int(tr["noise_multiplicity"])
    device = pick_device(settings.get("device", "auto"))
    settings_hash = training_settings_hash(settings)

    # Model, EMA, optimizer, mechanism, random streams.
    seed_everything(seed)
    precond = diffusion.build_precond(settings, resolution, channels, num_classes).to(device)
    ema = copy.deepcopy(precond).requires_grad_(False).eval()
    optimizer = torch.optim.Adam(precond.parameters(), lr=float(tr["lr"]))
    dp = privacy.DPSGD(diffusion.example_loss, noise_multiplier=sigma, max_grad_norm=float(pr["clip"]),
                       num_examples=n, sample_rate=q, optimizer=optimizer,
                       physical_batch_size=tr.get("physical_batch_size"), grad_chunk_size=tr.get("grad_chunk_size"),
                       dp_seed=dp_seed, device=device, batch_loss_fn=diffusion.examples_loss)
    if not dp.secret_randomness:
        log.warning("Poisson sampling, DP noise and per-example loss randomness follow a fixed seed (dp_seed / %s): "
                    "reproducible, but NOT secret",
                    privacy.DP_SEED_ENV)
    images_t = torch.from_numpy(images)
    labels_t = torch.from_numpy(labels) if num_classes > 0 else None
    records: list[dict] = []
    train_seconds = 0.0

    log.info("cell %s: N = %d, q = %.6g (expected batch %.1f), planned steps %d (%.4g epochs), sigma = %.6g "
             "(%s calibration, %s accountant), C = %g, K = %d, %d parameters, device %s",
             settings.get("cell"), n, q, q * n, planned, planned * q, sigma, pr.get("calibration", "tight"),
             pr.get("accountant", "rdp"), float(pr["clip"]), k, sum(t.numel() for t in precond.parameters()), device)

    if ckpt_path.exists():
        ck = _load_checkpoint(ckpt_path, settings, settings_hash, dataset_sha, device)
        if ck["planned_steps"] != planned or ck["noise_multiplier"] != sigma:
            raise DPDMError(f"checkpoint {ckpt_path} planned {ck['planned_steps']} steps at sigma "
                            f"{ck['noise_multiplier']}, this run {planned} at {sigma}; delete {ckpt_path}")
        precond.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        optimizer.load_state_dict(ck["optimizer"])
        dp.load_state_dict(ck["dp"])
        _set_rng_state(ck["rng"])
        records = list(ck["metrics"])
        train_seconds = float(ck["seconds"])
        log.info("resumed from %s at step %d/%d", ckpt_path, dp.steps, planned)
    elif (out_dir / "privacy.json").exists():
        log.warning("%s holds a finished cell: it stays until this run's outputs are complete, then is replaced",
                    out_dir)

    def save_checkpoint():
        if rank == 0:
            save_torch(ckpt_path, {
                "format": CHECKPOINT_FORMAT,
                "settings_hash": settings_hash,
                "training_settings": training_settings(settings),
                "dataset_sha256": dataset_sha,
                "device_type": device.type,
                "step": dp.steps,
                "planned_steps": planned,
                "noise_multiplier": sigma,
                "model": precond.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "dp": dp.state_dict(),  # Poisson-sampling and DP-noise generators, accountant history
                "rng": _rng_state(),
                "metrics": records,
                "seconds": train_seconds,
            })
            log.info("checkpoint at step %d -> %s", dp.steps, ckpt_path)
        if distributed:
            dist.barrier()

    stop = StopFlag(watch_parent=stop_with_parent).install()
    decay, ema_rampup = float(tr["ema_decay"]), tr["ema_rampup"]
    label_dropout = float(tr["label_dropout"])
    log_every, ckpt_every = int(tr["log_every"]), int(tr["checkpoint_every"])
    delta = p["delta"]
    try:
        precond.train()
        bar = tqdm(total=planned, initial=dp.steps, desc=f"train {settings.get('cell', {}).get('eps_tag', '')}",
                   unit="step", disable=rank != 0, dynamic_ncols=True)
        while dp.steps < planned:
            t0 = time.time()
            idx = dp.sample()
            y = data.to_model_range(images_t[idx]).to(device)
            stats = dp.step(precond, private_batch(dp, precond, y, None if labels_t is None else labels_t[idx],
                                                   idx, k, label_dropout))
            update_ema(ema, precond, ema_decay_at(dp.steps, q * n, decay, ema_rampup))
            train_seconds += time.time() - t0
            step = dp.steps
            logged = step % log_every == 0 or step == planned
            records.append({
                "step": step, "epoch": step * q, "loss": stats["loss"], "batch_size": stats["batch_size"],
                "frac_clipped": stats["frac_clipped"], "grad_norm": stats["grad_norm"],
                "eps_rdp": dp.epsilon(delta, "rdp") if logged else None,
                "lr": optimizer.param_groups[0]["lr"], "seconds": train_seconds,
            })
            bar.update(1)
            if logged:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", eps=f"{records[-1]['eps_rdp']:.3f}")
                log.info("step %d/%d epoch %.3f loss %.5f batch %d clipped %.3f grad_norm %.4g eps_rdp %.4f",
                         step, planned, step * q, stats["loss"], stats["batch_size"], stats["frac_clipped"],
                         stats["grad_norm"], records[-1]["eps_rdp"])
            reason = stop.reason()
            signalled = reason is not None
            if distributed:  # any rank signalled -> all stop together
                flag = torch.tensor([1.0 if signalled else 0.0], device=device if dist.get_backend() == "nccl"
                                    else "cpu")
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                signalled = bool(flag.item() > 0)
            if signalled and step == planned:
                log.warning("received a stop signal during the last step: writing the outputs instead of a checkpoint")
            elif signalled:
                save_checkpoint()
                bar.close()
                log.warning("received %s: checkpointed at step %d/%d; exiting with status %d so the job is retried",
                            reason or "a stop signal on another rank",
                            step, planned, EXIT_CHECKPOINTED)
                raise SystemExit(EXIT_CHECKPOINTED)
            if step % ckpt_every == 0 and step < planned:
                save_checkpoint()
        bar.close()
    finally:
        stop.restore()

    # Outputs: metrics, model, then the ledger (last: marks the cell finished).
    summary = {"steps": dp.steps, "noise_multiplier": sigma, "sample_rate": q}
    if rank == 0:
        with staged_outputs(out_dir, marker="privacy.json") as stage:  # the old cell stays until this is whole
            ledger = _write_outputs(stage, settings, p, records, precond, ema, dp, spec={
                "resolution": resolution, "channels": channels, "num_classes": num_classes},
                data_dir=data_dir, dataset_sha=dataset_sha, device=device, world=world,
                train_seconds=train_seconds, started=started)
        if ckpt_path.exists():
            ckpt_path.unlink()
            try:
                checkpoint_dir.rmdir()
            except OSError:
                pass
        log.info("done: %d steps, eps_rdp = %.4f, eps_prv = %s (target %g, delta %g) -> %s", dp.steps,
                 ledger["eps_rdp"], ledger["eps_prv"], p["target_eps"], delta, out_dir)
        summary.update(eps_rdp=ledger["eps_rdp"], eps_prv=ledger["eps_prv"])
    if distributed:
        dist.barrier()
    summary.update(model=str(out_dir / "model.pt"), privacy=str(out_dir / "privacy.json"),
                   metrics=str(out_dir / METRICS_FILE))
    return summary


def _write_outputs(stage: Path, settings: dict, p: dict, records: list, precond, ema, dp, spec: dict, data_dir: Path,
                   dataset_sha: str, device, world: int, train_seconds: float, started: float) -> dict:
    """Write a finished cell's files into `stage` (dpdm.artifacts.staged_outputs): metrics,
    model, the private run record, then the ledger. Returns the ledger."""
    from dpdm import diffusion, privacy

    tr, pr = settings["train"], settings["privacy"]
    sigma, q, n, delta, planned = (p["noise_multiplier"], p["sample_rate"], p["num_examples"], p["delta"],
                                   p["planned_steps"])
    seed, k = int(settings.get("cell", {}).get("seed", 0)), int(tr["noise_multiplicity"])
    write_metrics_csv(stage / METRICS_FILE, _metrics_rows(records, int(tr["log_every"]), planned))
    diffusion.save_model(stage / "model.pt", precond, ema, settings, spec, dp.steps)
    ledger = privacy.privacy_ledger(
        history=dp.history, num_examples=n, sample_rate=q, noise_multiplier=sigma, clip=float(pr["clip"]),
        noise_multiplicity=k, delta=delta, target_eps=p["target_eps"],
        calibration=pr.get("calibration", "tight"), accountant=pr.get("accountant", "rdp"),
        planned_steps=planned, seed=seed, secret_randomness=dp.secret_randomness,
        choices=pr["choices_on_private_data"], per_example_gradients=dp.per_example_method, world_size=world,
        provenance=provenance(cell=settings.get("cell"), settings=settings,
                              private_inputs=[data_dir / "train.npz", data_dir / "meta.json"], device=device))
    # Timings depend on the realised (secret) batch sizes: private, with the input hashes.
    save_json(stage / PRIVATE_RUN_FILE, {"inputs": {"train.npz": dataset_sha,
                                                    "meta.json": sha256_file(data_dir / "meta.json")},
                                         "data_dir": str(data_dir), "training_seconds": round(train_seconds, 3),
                                         "wall_time_s": round(time.time() - started, 3)})
    save_json(stage / "privacy.json", ledger)
    return ledger


def _load_checkpoint(path: Path, settings: dict, settings_hash: str, dataset_sha: str, device) -> dict:
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DPDMError(f"checkpoint {path} cannot be read ({torch_load_error(e)}); delete it to start "
                        "this cell over") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise DPDMError(f"checkpoint {path} is not a dpdm training checkpoint ({CHECKPOINT_FORMAT}); delete it")
    if ck["settings_hash"] != settings_hash:
        keys = _differing_keys(ck.get("training_settings") or {}, training_settings(settings))
        raise DPDMError(
            f"checkpoint {path} is from a different config (training settings differ: "
            f"{', '.join(keys[:8]) or 'unknown keys'}). Delete {path} to train this config from scratch, "
            "or pass a different --checkpoint-dir.")
    if ck["dataset_sha256"] != dataset_sha:
        raise DPDMError(f"checkpoint {path} was trained on a different train.npz (sha256 {ck['dataset_sha256']}, "
                        f"now {dataset_sha}); delete {path} to start over")
    if ck["device_type"] != device.type:
        raise DPDMError(f"checkpoint {path} was written on {ck['device_type']} and cannot be resumed exactly on "
                        f"{device.type}; run on {ck['device_type']} (settings device) or delete {path}")
    return ck
