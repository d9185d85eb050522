"""Benchmarks: the DP-SGD step against the non-private step and a hook-based reference;
sampling and FID feature extraction.

    python -m dpdm bench                      # paper MNIST network; B = 64, K = 4 on CPU
    python -m dpdm bench --dataset celeba32   # CelebA-32's network
    python -m dpdm bench --quick              # ~30 s on 2 CPU cores: a tiny network (CI)
    python -m dpdm bench --json bench.json    # also write the figures as JSON

Training steps, all on the same batch (B examples, K noise draws each, class labels
with label dropout), timed alternately after a warm-up; the median of the repeats:

1. `nonprivate`: one forward/backward of the K-averaged loss over the B x K rows and
   an Adam step (the floor: what the same training costs without privacy);
2. `dp`: our DP-SGD step as training runs it (dpdm.privacy.DPSGD: exact per-example
   gradients of the K-averaged loss by rows, dpdm.privacy.rows; clipping, Gaussian
   noise, Adam); `dp_vmap`: the same step with per-example gradients by torch.func vmap
   (the generic method, for any model);
3. `hooks`: the approach of the paper's released code, for comparison only: stock
   Opacus GradSampleModule hooks compute B x K per-ROW gradients, each example's K rows
   are averaged, then clipped, summed and noised like (2). It holds b x K x P gradient
   numbers for a micro-batch of b examples (P = parameters); (2) holds at most
   grad_chunk_size x P. All three accumulate over micro-batches of --physical-batch
   examples (default on GPU: 256; at B = 4096, K = 32 nothing fits in one pass).

Peak memory of each step is measured on CUDA with torch.cuda.max_memory_allocated, on
CPU as the process's peak RSS (VmHWM, reset after the set-up) during the first step
minus the RSS after the set-up, in a fresh subprocess per method (so it includes the optimizer's state and,
for the hooks, Opacus' wrapper).

Sampling: DDIM with `--sample-steps` steps at a batch of `--sample-batch`, against the
raw network forward at the same batch; `sampling_efficiency` = (images/s x network
evaluations per image) / (forward images/s), 1.0 = no overhead. FID: images/s of the
Inception feature extractor (untrained weights: same cost, no download).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import subprocess
import sys
import time

import torch

from dpdm.artifacts import atomic_path
from dpdm.data import DATASETS
from dpdm.devices import pick_device
from dpdm.memory import freed_memory_kept, release_freed_memory
from dpdm.networks import count_parameters

log = logging.getLogger("dpdm.bench")

NETWORKS = {
    # dataset -> (resolution, channels, classes, model settings)
    "mnist": (28, 1, 10, {"channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 2, "attn_resolutions": [7]}),
    "celeba32": (32, 3, 0, {"channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 2, "attn_resolutions": [8, 16]}),
    "tiny": (16, 1, 10, {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}),
}
METHODS = ("nonprivate", "dp", "dp_vmap", "hooks")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------
# The training steps.


class Setup:
    """A model, an optimizer and one fixed batch (B examples, K draws each)."""

    def __init__(self, dataset: str, batch: int, k: int, device, physical_batch_size=None, grad_chunk_size=None,
                 seed: int = 0):
        from dpdm import diffusion, privacy

        resolution, channels, classes, model = NETWORKS[dataset]
        torch.manual_seed(seed)
        settings = {"model": dict(model, dropout=0.0), "diffusion": {"precond": "edm"}}
        self.device = device
        self.precond = diffusion.build_precond(settings, resolution, channels, classes).to(device)
        self.optimizer = torch.optim.Adam(self.precond.parameters(), lr=3e-4)
        self.params = count_parameters(self.precond)
        self.batch, self.k, self.classes = batch, k, classes
        gen = torch.Generator(device=device).manual_seed(seed)
        self.y = torch.rand([batch, channels, resolution, resolution], generator=gen, device=device) * 2 - 1
        self.labels = torch.randint(classes, [batch], generator=gen, device=device) if classes else None
        self.draw = diffusion.draw_noise(self.precond, batch, k, (channels, resolution, resolution), classes, 0.1, gen)
        self.dropped = diffusion.apply_label_dropout(self.labels, self.draw.drop, classes)
        n = DATASETS["mnist"].expected_counts["train"]  # only q = B / N matters: MNIST's
        mechanism = dict(noise_multiplier=1.0, max_grad_norm=1.0, num_examples=n, sample_rate=batch / n,
                         optimizer=self.optimizer, physical_batch_size=physical_batch_size,
                         grad_chunk_size=grad_chunk_size, dp_seed=seed, device=device)
        # Training's DP step (per-example gradients by rows), and the same with torch.func vmap.
        self.dp = privacy.DPSGD(diffusion.example_loss, batch_loss_fn=diffusion.batch_example_losses, **mechanism)
        self.dp_vmap = privacy.DPSGD(diffusion.example_loss, **mechanism)
        self._hooked = None

    def micro_batches(self):
        """Row ranges of the micro-batches every method uses (physical_batch_size examples)."""
        size = self.dp.physical_batch_size or self.batch
        return [slice(i, min(self.batch, i + size)) for i in range(0, self.batch, size)]

    def nonprivate(self):
        from dpdm import diffusion

        self.optimizer.zero_grad(set_to_none=True)
        for rows in self.micro_batches():  # gradient accumulation: the same memory bound as the DP step
            draw = diffusion.NoiseDraw(*(t[rows] for t in self.draw))
            labels = None if self.labels is None else self.labels[rows]
            (diffusion.batch_loss(self.precond, self.y[rows], labels, draw).sum() / self.batch).backward()
        self.optimizer.step()

    def dp_step(self, dp=None):
        (dp or self.dp).step(self.precond, (self.y, self.dropped, self.draw.sigma, self.draw.noise))

    def hooks_grad(self):
        """p.grad = the noisy clipped sum / B from Opacus per-row gradients, on a copy of
        the model that carries the hooks (no optimizer step)."""
        gsm, model = self._hooked_module()
        params = [p for p in model.parameters() if p.requires_grad]
        totals = [torch.zeros_like(p) for p in params]
        for rows in self.micro_batches():
            y, sigma, noise = self.y[rows], self.draw.sigma[rows], self.draw.noise[rows]
            b, k = sigma.shape
            s = sigma.reshape(b, k, 1, 1, 1)
            x = (y.unsqueeze(1) + s * noise).flatten(0, 1)
            labels = None if self.dropped is None else self.dropped[rows].repeat_interleave(k)
            d = gsm(x, sigma.reshape(-1), labels).reshape(b, k, *y.shape[1:])
            row_loss = (model.loss_weight(s) * (d - y.unsqueeze(1)) ** 2).reshape(b * k, -1).mean(dim=1)
            for p in params:
                p.grad_sample = None
            row_loss.sum().backward()  # loss_reduction="sum": grad_sample[i] = gradient of row i's loss
            # An example's gradient = the mean of its K rows' gradients (its loss is their mean).
            per_example = [p.grad_sample.reshape(b, k, *p.shape).mean(dim=1) for p in params]
            norms = torch.stack([g.reshape(b, -1).pow(2).sum(dim=1) for g in per_example], dim=1).sum(dim=1).sqrt()
            factor = (self.dp.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for total, g in zip(totals, per_example):
                total.add_(torch.tensordot(factor, g, dims=1))
            del per_example
        for p, total in zip(params, totals):
            noise = torch.randn(total.shape, generator=self.dp.noise_generator, device=total.device)
            p.grad = (total + self.dp.noise_multiplier * self.dp.max_grad_norm * noise) / self.dp.expected_batch_size
            p.grad_sample = None

    def hooks_step(self):
        self.hooks_grad()
        self._hooked[2].step()
        self._hooked[2].zero_grad(set_to_none=True)

    def _hooked_module(self):
        """(GradSampleModule, its model, its Adam): a copy of the model, since Opacus
        attaches its hooks to the module it wraps."""
        if self._hooked is None:
            from opacus import GradSampleModule

            _register_grad_samplers()
            model = copy.deepcopy(self.precond)
            self._hooked = (GradSampleModule(model, batch_first=True, loss_reduction="sum"), model,
                            torch.optim.Adam(model.parameters(), lr=3e-4))
        return self._hooked[:2]

    def step(self, method: str):
        return {"nonprivate": self.nonprivate, "dp": self.dp_step, "dp_vmap": lambda: self.dp_step(self.dp_vmap),
                "hooks": self.hooks_step}[method]()


_REGISTERED = False


def _register_grad_samplers():
    """Opacus grad samplers for dpdm.networks' Linear, Conv2d and GroupNorm (the hook
    reference only; our DP path needs none)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch.nn.functional as F
    from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
    from opacus.grad_sample.linear import compute_linear_grad_sample
    from opacus.grad_sample.utils import register_grad_sampler

    from dpdm import networks

    register_grad_sampler(networks.Linear)(compute_linear_grad_sample)  # same weight / bias layout
    register_grad_sampler(networks.GroupNorm)(compute_group_norm_grad_sample)  # same num_groups / eps

    @register_grad_sampler(networks.Conv2d)
    def conv_grad_sample(layer, activations, backprops):
        a = activations[0].to(backprops.dtype)
        n, k = a.shape[0], layer.weight.shape[-1]
        cols = F.unfold(a, k, padding=layer.padding)  # [n, Cin*k*k, HW]
        gw = torch.einsum("noq,npq->nop", backprops.reshape(n, backprops.shape[1], -1), cols)
        return {layer.weight: gw.reshape(n, *layer.weight.shape), layer.bias: backprops.sum(dim=(2, 3))}

    _REGISTERED = True


def time_alternating(steps: dict, repeats: int, warmup: int, device) -> dict:
    """Seconds per call of each step: `warmup` rounds, then `repeats` rounds in which the
    steps alternate (so drift of a shared machine hits all of them alike)."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    _sync(device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _counting_faults(fn, counts: list):
    """fn, also appending the minor page faults of each call to `counts`."""
    import resource

    def counted():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counted


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_peak_memory(args, method: str, device) -> float:
    """MB of memory a step needs beyond the set-up (model, optimizer, batch)."""
    if device.type == "cuda":
        setup = Setup(args.dataset, args.batch, args.k, device, args.physical_batch, args.chunk)
        setup.step(method)  # optimizer state exists before the measurement
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        setup.step(method)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    cmd = [sys.executable, "-m", "dpdm", "bench", "--memory-of", method, "--dataset", args.dataset,
           "--batch", str(args.batch), "--k", str(args.k), "--device", "cpu"]
    if args.physical_batch:
        cmd += ["--physical-batch", str(args.physical_batch)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:  # e.g. killed by the kernel's out-of-memory killer (-9)
        log.warning("memory of %s: the measuring process failed with status %d (out of memory?): %s", method,
                    out.returncode, out.stderr.strip()[-300:])
        return None
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(args, device) -> None:
    """In a fresh process: the peak RSS of one step over the memory in use after the
    set-up (model, optimizer, batch), printed in MB."""
    setup = Setup(args.dataset, args.batch, args.k, device, args.physical_batch, args.chunk)
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    setup.step(args.memory_of)
    print(max(0.0, _status_mb("VmHWM") - base))


# ----------------------------------------------------------------------------
# Sampling and FID features.


def bench_sampling(setup: Setup, batch: int, steps: int, repeats: int) -> dict:
    from dpdm import sampling

    precond, device = setup.precond.eval(), setup.device
    res = precond.net.img_resolution
    shape = [batch, precond.net.in_channels, res, res]
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(shape, generator=gen, device=device)
    labels = torch.randint(setup.classes, [batch], generator=gen, device=device) if setup.classes else None
    opts = {"kind": "ddim", "steps": steps}
    sigma = torch.full([batch], 1.0, device=device)

    def forward():
        precond(latents, sigma, labels)

    def sample():
        sampling.run_sampler(precond, latents, labels, opts, generator=gen)

    with torch.inference_mode():
        t = time_alternating({"forward": forward, "sample": sample}, repeats, 1, device)
    precond.train()
    forward_s, sample_s = statistics.median(t["forward"]), statistics.median(t["sample"])
    nfe = steps  # Euler: one evaluation per step (the last step to sigma = 0 included)
    return {"sample_img_per_s": batch / sample_s, "forward_img_per_s": batch / forward_s,
            "sampling_efficiency": (batch / sample_s) * nfe / (batch / forward_s), "sample_steps": steps,
            "sample_batch": batch}


def bench_fid_features(device, batch: int, repeats: int, resolution: int, channels: int) -> dict:
    import numpy as np

    from dpdm import fid

    features = fid.build_extractor("untrained", device=device)
    images = np.random.default_rng(0).integers(0, 256, [batch, resolution, resolution, channels], dtype=np.uint8)
    t = time_alternating({"fid": lambda: features(images)}, repeats, 1, device)
    return {"fid_img_per_s": batch / statistics.median(t["fid"]), "fid_batch": batch}


# ----------------------------------------------------------------------------
# Entry point.


def run(args) -> dict:
    device = pick_device(args.device)
    if args.memory_of:
        _memory_child(args, device)
        return {}
    setup = Setup(args.dataset, args.batch, args.k, device, args.physical_batch, args.chunk)
    methods = [m for m in args.methods if not (m == "hooks" and args.no_hooks)]
    log.info("bench %s on %s: B = %d, K = %d, %d parameters, methods %s", args.dataset, device, args.batch, args.k,
             setup.params, methods)
    faults = {m: [] for m in methods}
    times = time_alternating({m: _counting_faults(lambda m=m: setup.step(m), faults[m]) for m in methods},
                             args.repeats, args.warmup, device)
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {
        "device": str(device) if device.type == "cpu" else f"cuda:{torch.cuda.get_device_name(device)}",
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "dataset": args.dataset,
        "B": args.batch,
        "K": args.k,
        "physical_batch_size": args.physical_batch,
        "grad_chunk_size": args.chunk,
        "model_params": setup.params,
        "repeats": args.repeats,
        "malloc_keeps_freed_memory": freed_memory_kept(),  # set by the CLI (dpdm.memory.keep_freed_memory)
        "nonprivate_ex_per_s": args.batch / med["nonprivate"],
        "dp_ex_per_s": args.batch / med["dp"],
        "dp_time_ratio": med["dp"] / med["nonprivate"],
    }
    out["dp_method"] = setup.dp.per_example_method
    if "dp_vmap" in med:
        out["dp_vmap_ex_per_s"] = args.batch / med["dp_vmap"]
    if "hooks" in med:
        out["hooks_ex_per_s"] = args.batch / med["hooks"]
        out["dp_over_hooks_speed"] = med["hooks"] / med["dp"]
    for m in methods:  # fresh pages the OS had to fault in per step (memory freed and taken again)
        out[f"{m}_page_faults_per_step"] = statistics.median(faults[m][-args.repeats:])
    if not args.no_memory:
        release_freed_memory()  # the timed steps' peak (vmap's at large K) would crowd out the children
        for m in methods:
            out[f"{m}_peak_mem_mb"] = measure_peak_memory(args, m, device)
    del setup.dp, setup.dp_vmap
    out.update(bench_sampling(setup, args.sample_batch, args.sample_steps, args.repeats))
    res, ch = NETWORKS[args.dataset][:2]
    out.update(bench_fid_features(device, args.fid_batch, args.repeats, res, ch))
    return out


def report(out: dict) -> str:
    lines = [f"device {out['device']}, torch {out['torch_version']}, {out['dataset']} network "
             f"({out['model_params']:,} parameters), B = {out['B']}, K = {out['K']}, median of {out['repeats']}"]
    lines.append(f"  non-private step  {out['nonprivate_ex_per_s']:10.1f} examples/s")
    lines.append(f"  DP-SGD step       {out['dp_ex_per_s']:10.1f} examples/s   time ratio DP / non-private "
                 f"= {out['dp_time_ratio']:.3f} (per-example gradients by {out['dp_method']})")
    if "dp_vmap_ex_per_s" in out:
        lines.append(f"  DP-SGD, vmap      {out['dp_vmap_ex_per_s']:10.1f} examples/s   time ratio "
                     f"{out['nonprivate_ex_per_s'] / out['dp_vmap_ex_per_s']:.3f}")
    if "hooks_ex_per_s" in out:
        lines.append(f"  hooks reference   {out['hooks_ex_per_s']:10.1f} examples/s   speed DP / hooks "
                     f"= {out['dp_over_hooks_speed']:.2f}x")
    lines.append("  page faults per step: " + ", ".join(f"{m} {out[f'{m}_page_faults_per_step']:.0f}" for m in METHODS
                                                     if f"{m}_page_faults_per_step" in out)
                 + f" (freed memory kept: {out['malloc_keeps_freed_memory']})")
    mem = [f"{m} " + ("failed (out of memory?)" if out[f"{m}_peak_mem_mb"] is None else f"{out[f'{m}_peak_mem_mb']:.0f} MB")
           for m in METHODS if f"{m}_peak_mem_mb" in out]
    if mem:
        lines.append("  peak memory of a step: " + ", ".join(mem))
    lines.append(f"  DDIM-{out['sample_steps']} sampling {out['sample_img_per_s']:.1f} images/s, network forward "
                 f"{out['forward_img_per_s']:.1f} images/s (batch {out['sample_batch']}): efficiency "
                 f"{out['sampling_efficiency']:.3f}")
    lines.append(f"  FID features      {out['fid_img_per_s']:10.1f} images/s (batch {out['fid_batch']})")
    return "\n".join(lines)


def _method_list(text: str) -> list[str]:
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    return [m for m in METHODS if m in chosen or m in ("nonprivate", "dp")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", choices=sorted(NETWORKS), help="network to measure (tiny: CI)")
    p.add_argument("--batch", type=int, help="examples per step B (default: 64 on CPU, 4096 on GPU)")
    p.add_argument("--k", type=int, help="noise multiplicity K (default: 4 on CPU, 32 on GPU)")
    p.add_argument("--physical-batch", type=int, help="DP micro-batch (default: B on CPU, 256 on GPU)")
    p.add_argument("--chunk", type=int, help="examples per vmap chunk (default: the micro-batch on CPU, 32 on GPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sample-batch", type=int, help="sampling batch (default: 64 on CPU, 1000 on GPU)")
    p.add_argument("--sample-steps", type=int, help="DDIM steps (default: 50)")
    p.add_argument("--fid-batch", type=int, help="FID feature batch (default: 16 on CPU, 500 on GPU)")
    p.add_argument("--methods", type=_method_list, default=list(METHODS),
                   help=f"comma-separated training steps to time (default: all of {','.join(METHODS)}; "
                        "nonprivate and dp are always included)")
    p.add_argument("--no-hooks", action="store_true", help="skip the hook-based reference (it needs B*K*P memory)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--quick", action="store_true", help="about 30 s on CPU: tiny network, B = 8, K = 2, 2 repeats")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)  # internal: the CPU memory child


def fill_defaults(args, device) -> None:
    """The options left unset: --quick's miniature, else the CPU or the GPU defaults."""
    cuda = device.type == "cuda"
    if args.quick:
        args.dataset, args.repeats = "tiny", min(args.repeats, 2)
        for key, value in (("batch", 8), ("k", 2), ("sample_batch", 8), ("sample_steps", 5), ("fid_batch", 4)):
            setattr(args, key, getattr(args, key) or value)
    defaults = {"batch": (64, 4096), "k": (4, 32), "physical_batch": (None, 256), "chunk": (None, 32),
                "sample_batch": (64, 1000), "sample_steps": (50, 50), "fid_batch": (16, 500)}
    for key, (cpu_value, gpu_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if cuda else cpu_value)


def main(args) -> None:
    fill_defaults(args, pick_device(args.device))
    out = run(args)
    if args.memory_of:
        return
    print(report(out))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=1) + "\n")
