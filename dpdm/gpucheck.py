"""`python -m dpdm gpu-check`: the GPU measurements the project needs, in one command.

1. The step benchmark (dpdm.bench) at the paper's B = 4096, K = 32: non-private vs our
   DP step vs the hook-based reference: examples/s, ratios, peak memory.
2. DP training steps of each dataset of the paper grid with its real settings (network,
   K, batch, sigma from config/config.yaml; random images of the dataset's shape: the
   time of a step does not depend on the pixels), timed and projected to the hours of
   every cell (its planned steps) and of the whole grid, on one device; likewise the
   non-private pre-training of each public model the grid fine-tunes (config `pretrain`).
3. DDIM-50 sampling of 10,000 images in fp32 and with TF32, bf16 autocast,
   channels-last and torch.compile: images/s, and each variant's FID against the fp32
   samples from the same latents (the untrained extractor when no Inception weights are
   given: enough to see whether a variant changes the samples).

`--quick` runs a miniature of all three on CPU in about a minute (CI); variants a device
cannot run are listed with the reason. The full form is meant to finish in under 8
minutes on one modern GPU (`--budget-s` caps the training part).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from dpdm.data import image_shape

log = logging.getLogger("dpdm")

FULL = {"bench": ["--batch", "4096", "--k", "32", "--physical-batch", "256", "--chunk", "32", "--repeats", "3"],
        "config": ["config/config.yaml"], "steps": 200, "sample_images": 10000, "sample_steps": 50,
        "sample_batch": 1000}
QUICK = {"bench": ["--quick", "--no-memory", "--no-hooks"],
         "config": ["config/smoke.yaml", "config/smoke-finetune.yaml"], "steps": 3, "sample_images": 32,
         "sample_steps": 4, "sample_batch": 16}
VARIANTS = ("fp32", "tf32", "bf16", "channels_last", "compile")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a CPU miniature of every part (about a minute; CI)")
    p.add_argument("--config", nargs="+", help="the grid to project: config files, later ones layered on earlier "
                   "ones (default: config/config.yaml; --quick: config/smoke.yaml config/smoke-finetune.yaml)")
    p.add_argument("--steps", type=int, help="DP steps timed per dataset (default 200; --quick: 3)")
    p.add_argument("--budget-s", type=float, default=240.0, help="stop timing a dataset's steps after this long")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", help="Inception weights for the sampling FIDs (default: the untrained extractor)")
    p.add_argument("--model", help="a trained model.pt to sample (default: the first dataset's network, randomly "
                                   "initialised and perturbed so its output is not zero)")
    p.add_argument("--json", help="write the figures to this JSON file")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------
# 2. Training steps, projected.


def _num_train(dataset: str) -> int:
    from dpdm.data import DATASETS, DIGITS_HALVES

    if dataset in DIGITS_HALVES:
        return 1438 // 2  # about half of digits' train split each
    return int(DATASETS[dataset].expected_counts.get("train") or 1438)  # digits: 1,438 after our split


def _median_step_s(one_step, device, steps: int, budget_s: float) -> tuple[float, int]:
    """(median seconds of `one_step()`, steps timed): up to `steps` timed after an untimed
    first one (compilation, the rows check), at least 5, then stopping once past budget_s."""
    times, started = [], time.time()
    for step in range(int(steps) + 1):
        _sync(device)
        t0 = time.time()
        one_step()
        _sync(device)
        if step:
            times.append(time.time() - t0)
        if step >= 5 and time.time() - started > budget_s:
            break
    return statistics.median(times), len(times)


def time_training(settings: dict, device, steps: int, budget_s: float) -> dict:
    """Seconds per DP step of this cell's real training step (dpdm.train's private_batch,
    DPSGD.step, the EMA update) on random images, median over the timed steps."""
    import torch

    from dpdm import diffusion, privacy, train

    res, ch, classes = image_shape(settings["cell"]["dataset"], settings)
    n = _num_train(settings["cell"]["dataset"])
    p = train.plan(settings, n)
    tr = settings["train"]
    torch.manual_seed(0)
    precond = diffusion.build_precond(settings, res, ch, classes).to(device)
    ema = diffusion.build_precond(settings, res, ch, classes).to(device).requires_grad_(False)
    opt = torch.optim.Adam(precond.parameters(), lr=float(tr["lr"]))
    dp = privacy.DPSGD(diffusion.example_loss, noise_multiplier=p["noise_multiplier"],
                       max_grad_norm=float(settings["privacy"]["clip"]), num_examples=n, sample_rate=p["sample_rate"],
                       optimizer=opt, physical_batch_size=tr["physical_batch_size"],
                       grad_chunk_size=tr["grad_chunk_size"], dp_seed=0, device=device,
                       batch_loss_fn=diffusion.batch_example_losses)
    gen = torch.Generator(device=device).manual_seed(0)

    def one_step():
        idx = dp.poisson_batch()
        y = torch.rand([len(idx), ch, res, res], generator=gen, device=device) * 2 - 1
        labels = torch.randint(classes, [len(idx)], generator=gen, device=device) if classes else None
        dp.step(precond, train.private_batch(dp, precond, y, labels, idx, int(tr["noise_multiplicity"]),
                                             float(tr["label_dropout"])))
        train.update_ema(ema, precond, 0.999)

    s, timed = _median_step_s(one_step, device, steps, budget_s)
    return {"dataset": settings["cell"]["dataset"], "s_per_step": s, "steps_timed": timed,
            "expected_batch": p["sample_rate"] * n, "K": int(tr["noise_multiplicity"]),
            "per_example_method": dp.per_example_method,
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}


def time_pretraining(settings: dict, device, steps: int, budget_s: float) -> dict:
    """Seconds per step of a public model's non-private training (dpdm.pretrain's step:
    K noise draws per example, the mean loss, one Adam step, the EMA) on random images of
    its dataset's shape, median over the timed steps, and its planned steps and hours."""
    import torch

    from dpdm import diffusion, pretrain, train

    pt = settings["pretrain"]
    res, ch, classes = image_shape(pt["dataset"], settings)
    classes = classes if pt["conditional"] else 0
    p = pretrain.plan(settings, _num_train(pt["dataset"]))
    torch.manual_seed(0)
    precond = diffusion.build_precond(settings, res, ch, classes).to(device)
    ema = diffusion.build_precond(settings, res, ch, classes).to(device).requires_grad_(False)
    opt = torch.optim.Adam(precond.parameters(), lr=float(pt["lr"]))
    gen, b = torch.Generator(device=device).manual_seed(0), p["batch_size"]

    def one_step():
        y = torch.rand([b, ch, res, res], generator=gen, device=device) * 2 - 1
        labels = torch.randint(classes, [b], generator=gen, device=device) if classes else None
        draw = diffusion.draw_noise(precond, b, int(pt["noise_multiplicity"]), (ch, res, res), classes,
                                    float(pt["label_dropout"]), gen)
        loss = diffusion.batch_loss(precond, y, labels, draw).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train.update_ema(ema, precond, 0.999)

    s, timed = _median_step_s(one_step, device, steps, budget_s)
    return {"model": pt["name"], "dataset": pt["dataset"], "s_per_step": s, "steps_timed": timed,
            "batch": b, "K": int(pt["noise_multiplicity"]), "planned_steps": p["steps"],
            "gpu_hours": p["steps"] * s / 3600}


def project(config: dict, seconds_per_step: dict, pretraining: dict | None = None) -> dict:
    """Hours of every model of the grid (main cells and ablation variants): planned steps
    x the measured seconds per step of its dataset; plus the public models' pre-training
    (time_pretraining's hours), each counted once however many cells share it."""
    from dpdm import config as cfg
    from dpdm import train

    cells, total = [], 0.0
    for plan in cfg.plan_grid(config).cells.values():
        settings = cfg.cell_settings(config, plan)
        steps = train.plan(settings, _num_train(plan.dataset))["planned_steps"]
        hours = steps * seconds_per_step[plan.dataset] / 3600
        cells.append({"cell": plan.path, "planned_steps": steps, "gpu_hours": hours})
        total += hours
    pre = [{k: t[k] for k in ("model", "dataset", "planned_steps", "gpu_hours")} for t in (pretraining or {}).values()]
    total += sum(t["gpu_hours"] for t in pre)
    return {"cells": cells, "pretrain": pre, "total_gpu_hours": total}


# ----------------------------------------------------------------------------
# 3. Sampling variants.


def _variant(name: str, precond, device):
    """(the network to sample with, a context manager, or a reason it cannot run here)."""
    import contextlib

    import torch

    if name == "fp32":
        return precond, contextlib.nullcontext(), None
    if name == "tf32":
        if device.type != "cuda":
            return None, None, "TF32 is a CUDA matmul mode"
        return precond, _tf32(), None
    if name == "bf16":
        return precond, torch.autocast(device.type, dtype=torch.bfloat16), None
    if name == "channels_last":
        return precond.to(memory_format=torch.channels_last), contextlib.nullcontext(), None
    if name == "compile":
        if device.type != "cuda":
            return None, None, "torch.compile is measured on CUDA only (on CPU it compiles for minutes)"
        return torch.compile(precond), contextlib.nullcontext(), None
    raise ValueError(name)


class _tf32:
    def __enter__(self):
        import torch

        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _sampling_network(settings: dict, device, model_path=None):
    """A trained model, or the cell's network at random weights. DDPM++ initialises its
    last layer to zero, so an untrained network denoises to exactly its input's skip
    part whatever the precision: every weight gets N(0, 0.02^2) added, so the variants
    have something to differ on."""
    import torch

    from dpdm import diffusion

    if model_path:
        precond, trained, _ = diffusion.load_model(model_path, device)
        return precond, trained
    res, ch, classes = image_shape(settings["cell"]["dataset"], settings)
    torch.manual_seed(0)
    precond = diffusion.build_precond(settings, res, ch, classes).to(device).eval()
    with torch.no_grad():
        for p in precond.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return precond, settings


def time_sampling(settings: dict, device, images: int, steps: int, batch: int, weights=None,
                  model_path=None) -> dict:
    """images/s of DDIM-`steps` per variant, and FID of each variant's samples against
    the fp32 samples of the same latents and labels."""
    import copy

    import numpy as np
    import torch

    from dpdm import fid, sampling

    base, settings = _sampling_network(settings, device, model_path)
    res, ch, classes = image_shape(settings["cell"]["dataset"], settings)
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn([images, ch, res, res], generator=gen, device=device)
    labels = torch.arange(images, device=device) % classes if classes else None
    extractor = fid.build_extractor("inception" if weights else "untrained", weights, device)
    out, reference = {}, None
    for name in VARIANTS:
        net, ctx, reason = _variant(name, copy.deepcopy(base), device)
        if reason:
            out[name] = {"skipped": reason}
            continue
        chunks, t0 = [], None
        with torch.inference_mode(), ctx:
            for i, start in enumerate(range(0, images, batch)):
                if i == 1 or (i == 0 and images <= batch):
                    _sync(device)
                    t0, timed = time.time(), start if i == 1 else 0
                lab = None if labels is None else labels[start:start + batch]
                x = sampling.run_sampler(net, latents[start:start + batch], lab, {"kind": "ddim", "steps": steps})
                chunks.append(x.float().clamp(-1, 1).cpu())
            _sync(device)
        seconds = time.time() - t0
        samples = ((torch.cat(chunks) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        mu, sigma = fid.activation_statistics(samples, extractor, batch_size=min(batch, 500), desc=name)
        reference = reference or (mu, sigma)
        out[name] = {"img_per_s": (images - timed) / seconds, "fid_vs_fp32": fid.frechet_distance(mu, sigma,
                                                                                               *reference),
                     "max_abs_pixel_diff_vs_fp32": None}
        if name == "fp32":
            fp32_samples = samples
        else:
            out[name]["max_abs_pixel_diff_vs_fp32"] = int(np.abs(samples.astype(int) - fp32_samples).max())
    out["extractor"] = extractor.identity["name"]
    out["model"] = str(model_path) if model_path else "random weights (perturbed)"
    out["images"], out["steps"], out["batch"] = images, steps, batch
    return out


# ----------------------------------------------------------------------------
# Entry point.


def run(args) -> dict:
    import torch

    from dpdm import bench
    from dpdm import config as cfg
    from dpdm.devices import device_name, pick_device

    mode = QUICK if args.quick else FULL
    device = pick_device(args.device)
    started = time.time()
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bench_args = parser.parse_args(mode["bench"] + ["--device", str(device)])
    bench.fill_defaults(bench_args, device)
    result = {"device": device_name(device), "torch_version": torch.__version__, "quick": bool(args.quick),
              "bench": bench.run(bench_args)}
    log.info("gpu-check: benchmark done (%.0f s)", time.time() - started)
    config = cfg.load_config(args.config or mode["config"])
    cells, public = {}, []  # a dataset's first model (a cell or an ablation variant) stands for its
    for plan in cfg.plan_grid(config).cells.values():  # step time (sigma does not change it)
        settings = cfg.cell_settings(config, plan)
        cells.setdefault(plan.dataset, settings)
        name = (settings["train"].get("init") or {}).get("pretrained")  # a public model it fine-tunes
        if name and name not in public:
            public.append(name)
    datasets = list(cells)
    timed = {}
    for ds in datasets:
        timed[ds] = time_training(cells[ds], device, args.steps or mode["steps"], args.budget_s)
        log.info("gpu-check: %s DP step %.3f s (%d steps timed)", ds, timed[ds]["s_per_step"],
                 timed[ds]["steps_timed"])
    result["training"] = timed
    pretraining = {}
    for name in public:
        pretraining[name] = time_pretraining(cfg.pretrain_settings(config, name), device,
                                             args.steps or mode["steps"], args.budget_s)
        log.info("gpu-check: pre-training %s step %.3f s (%d steps timed)", name, pretraining[name]["s_per_step"],
                 pretraining[name]["steps_timed"])
    result["pretraining"] = pretraining
    result["projection"] = project(config, {ds: t["s_per_step"] for ds, t in timed.items()}, pretraining)
    result["sampling"] = time_sampling(cells[datasets[0]], device, mode["sample_images"],
                                       mode["sample_steps"], mode["sample_batch"], args.weights, args.model)
    result["wall_s"] = time.time() - started
    return result


def main(args) -> None:
    import json

    from dpdm.artifacts import save_json

    result = run(args)
    if args.json:
        save_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "bench"}, indent=1, default=str)[:4000])
