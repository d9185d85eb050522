"""Non-private pre-training of the denoiser on a PUBLIC dataset (Ghalebikesabi et al.
2023, Sec. 3: pre-train on ImageNet 32x32, then DP fine-tune; dpdm.finetune).

Ordinary minibatch training: shuffled epochs, the same loss as the DP cells
(dpdm.diffusion.batch_loss, K noise draws per example averaged, label dropout for
guidance), Adam, the EMA with its warm-up (dpdm.train.ema_decay_at). Its data must be
public: nothing here is clipped or noised and no privacy is accounted, so the config
names the dataset in `pretrain.<name>.dataset` and a cell refers to the model by name.

Outputs under results/pretrain/{name}/: model.pt (dpdm.diffusion's format plus a
`pretrain` record: name, dataset, sha256 of its train.npz), pretrain.json (the public
record) and train_metrics.csv. A stop signal (SIGTERM / SIGUSR1 / Ctrl-C) checkpoints
and exits with status 75 (as `train`), and the rerun resumes exactly.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
from pathlib import Path

from dpdm.artifacts import (DPDMError, atomic_path, check_writable, exclusive_lock, provenance, save_json,
                            save_torch, seed_everything, sha256_file, staged_outputs, torch_load_error)
from dpdm.devices import pick_device

log = logging.getLogger("dpdm.pretrain")

CHECKPOINT_FORMAT = "dpdm-pretrain-checkpoint-v1"
RECORD_FILE = "pretrain.json"
METRICS_FILE = "train_metrics.csv"
METRICS_COLUMNS = ("step", "epoch", "loss", "lr", "seconds")


def plan(settings: dict, num_examples: int) -> dict:
    pt = settings["pretrain"]
    batch = int(pt["batch_size"])
    if not 0 < batch <= num_examples:
        raise DPDMError(f"pretrain.{pt['name']}.batch_size = {batch}: must be in [1, {num_examples}] (the public "
                        "training examples)")
    per_epoch = math.ceil(num_examples / batch)  # the last batch of an epoch is the remainder
    steps = math.ceil(float(pt["epochs"]) * per_epoch)
    if pt.get("max_steps"):
        steps = min(steps, int(pt["max_steps"]))
    return {"batch_size": batch, "steps": steps, "steps_per_epoch": per_epoch}


def pretrain(settings: dict, data_dir, out_dir, *, stop_with_parent: bool = False) -> dict:
    """Pre-train on the public data in `data_dir`; write out_dir/model.pt, pretrain.json,
    train_metrics.csv (checkpoints in out_dir/checkpoints while it runs)."""
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    check_writable(out_dir, "pretrain folder")
    with exclusive_lock(out_dir, "pretrain"):
        return _pretrain(settings, data_dir, out_dir, stop_with_parent)


def _pretrain(settings: dict, data_dir: Path, out_dir: Path, stop_with_parent: bool) -> dict:
    import torch

    from dpdm import data, diffusion
    from dpdm.train import EXIT_CHECKPOINTED, StopFlag, _rng_state, _set_rng_state, ema_decay_at, update_ema

    started = time.time()
    pt = settings["pretrain"]
    meta = data.load_meta(data_dir)
    if meta["dataset"] != pt["dataset"]:
        raise DPDMError(f"{data_dir} holds {meta['dataset']!r}, but pretrain.{pt['name']}.dataset is "
                        f"{pt['dataset']!r}: pass --data for {pt['dataset']}")
    images, labels = data.load_split(data_dir, "train")
    n, res, ch = len(images), int(meta["resolution"]), int(meta["channels"])
    num_classes = int(meta.get("num_classes") or 0) if pt["conditional"] else 0
    if pt["conditional"] and not num_classes:
        raise DPDMError(f"pretrain.{pt['name']}.conditional is true but {pt['dataset']} has no labels; set it to false")
    p, device = plan(settings, n), pick_device(settings.get("device", "auto"))
    data_sha = sha256_file(data_dir / "train.npz")

    seed_everything(int(pt["seed"]))
    precond = diffusion.build_precond(settings, res, ch, num_classes).to(device)
    ema = copy.deepcopy(precond).requires_grad_(False).eval()
    opt = torch.optim.Adam(precond.parameters(), lr=float(pt["lr"]))
    gen = torch.Generator(device="cpu").manual_seed(int(pt["seed"]))  # the epochs' shuffles (public data)
    noise_gen = torch.Generator(device=device).manual_seed(int(pt["seed"]) + 1)
    step, records, seconds = 0, [], 0.0
    ckpt_path = out_dir / "checkpoints" / "checkpoint.pt"
    guard = {"format": CHECKPOINT_FORMAT, "settings": settings, "dataset_sha256": data_sha, "steps": p["steps"]}
    if ckpt_path.exists():
        ck = _load_checkpoint(ckpt_path, guard)
        precond.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["shuffle_rng"])
        noise_gen.set_state(ck["noise_rng"])
        _set_rng_state(ck["rng"])
        step, records, seconds, order = int(ck["step"]), list(ck["metrics"]), float(ck["seconds"]), ck["order"]
        log.info("resumed from %s at step %d/%d", ckpt_path, step, p["steps"])
    else:
        order = torch.randperm(n, generator=gen)
    log.info("pretrain %s on %s (public): N = %d, batch %d, %d steps (%.4g epochs), %s, %d classes, device %s",
             pt["name"], pt["dataset"], n, p["batch_size"], p["steps"], p["steps"] / p["steps_per_epoch"],
             settings["diffusion"]["precond"], num_classes, device)

    def checkpoint():
        save_torch(ckpt_path, {**guard, "step": step, "model": precond.state_dict(), "ema": ema.state_dict(),
                               "optimizer": opt.state_dict(), "shuffle_rng": gen.get_state(),
                               "noise_rng": noise_gen.get_state(), "rng": _rng_state(), "metrics": records,
                               "seconds": seconds, "order": order})

    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    stop = StopFlag(watch_parent=stop_with_parent).install()
    precond.train()
    try:
        while step < p["steps"]:
            t0 = time.time()
            pos = (step % p["steps_per_epoch"]) * p["batch_size"]
            idx = order[pos:pos + p["batch_size"]]
            y = data.to_model_range(x_all[idx]).to(device)
            lab = y_all[idx].to(device) if num_classes else None
            draw = diffusion.draw_noise(precond, len(idx), int(pt["noise_multiplicity"]), tuple(y.shape[1:]),
                                        num_classes, float(pt["label_dropout"]), noise_gen)
            loss = diffusion.batch_loss(precond, y, lab, draw).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss = float(loss.detach())
            step += 1
            update_ema(ema, precond, ema_decay_at(step, p["batch_size"], float(pt["ema_decay"]), pt["ema_rampup"]))
            if step % p["steps_per_epoch"] == 0:
                order = torch.randperm(n, generator=gen)
            seconds += time.time() - t0
            records.append({"step": step, "epoch": step / p["steps_per_epoch"], "loss": loss,
                            "lr": opt.param_groups[0]["lr"], "seconds": seconds})
            if step % int(pt["log_every"]) == 0 or step == p["steps"]:
                log.info("step %d/%d loss %.5f", step, p["steps"], loss)
            reason = stop.reason()
            if reason is not None and step < p["steps"]:
                checkpoint()
                log.warning("received %s: checkpointed at step %d/%d; exiting with status %d", reason, step,
                            p["steps"], EXIT_CHECKPOINTED)
                raise SystemExit(EXIT_CHECKPOINTED)
            if step % int(pt["checkpoint_every"]) == 0 and step < p["steps"]:
                checkpoint()
    finally:
        stop.restore()

    record = {"name": pt["name"], "dataset": pt["dataset"], "dataset_sha256": data_sha,
              "public": "trained on public data only: no privacy mechanism, no privacy cost to any cell",
              "num_examples": n, "conditional": bool(num_classes), "steps": step, "batch_size": p["batch_size"],
              "epochs": step / p["steps_per_epoch"], "final_loss": records[-1]["loss"] if records else None,
              "training_seconds": round(seconds, 3), "wall_time_s": round(time.time() - started, 3),
              "provenance": provenance(settings=settings, inputs=[data_dir / "train.npz", data_dir / "meta.json"],
                                       device=device)}
    spec = {"resolution": res, "channels": ch, "num_classes": num_classes}
    with staged_outputs(out_dir, marker=RECORD_FILE) as stage:
        _write_metrics(stage / METRICS_FILE, records, int(pt["log_every"]), p["steps"])
        diffusion.save_model(stage / "model.pt", precond, ema, settings, spec, step,
                             extra={"pretrain": {k: record[k] for k in ("name", "dataset", "dataset_sha256")}})
        save_json(stage / RECORD_FILE, record)
    if ckpt_path.exists():
        ckpt_path.unlink()
        ckpt_path.parent.rmdir()
    log.info("done: %d steps, loss %.5f -> %s", step, record["final_loss"] or float("nan"), out_dir)
    return record


def _write_metrics(path: Path, records: list[dict], log_every: int, steps: int) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(METRICS_COLUMNS))
            w.writeheader()
            for r in records:
                if r["step"] % log_every == 0 or r["step"] == steps:
                    w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in METRICS_COLUMNS})


def _load_checkpoint(path: Path, guard: dict) -> dict:
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DPDMError(f"checkpoint {path} cannot be read ({torch_load_error(e)}); delete it to start over") from e
    for key in ("format", "settings", "dataset_sha256", "steps"):
        if ck.get(key) != guard[key]:
            raise DPDMError(f"checkpoint {path} is from another pre-training ({key} differs); delete it to start "
                            "over with this config")
    return ck
