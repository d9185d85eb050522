"""Samplers in EDM's sigma-space, classifier-free guidance, and batched generation.

Every preconditioning of dpdm.diffusion is a denoiser D(x; sigma), so the samplers
integrate the probability-flow ODE / reverse SDE of x = y + sigma n with sigma(t) = t
(Karras et al. 2022, "EDM", Sec. 3-4):

- `ddim`: Euler on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
  (EDM Eq. 3 with sigma(t) = t, s(t) = 1), which is deterministic DDIM (Song et al. 2021).
- `stochastic_ddim`: Euler-Maruyama on the reverse-time SDE of the variance-exploding
  diffusion dx = sqrt(2 sigma) dw, run from sigma_max down to sigma_min:
      dx = -2 sigma grad_x log p(x; sigma) dsigma + sqrt(2 sigma) dw_bar,
      grad_x log p(x; sigma) = (D(x; sigma) - x) / sigma^2,
  i.e. EDM Eq. 6 with beta(t) = 1 / sigma (Langevin term as strong as the ODE term);
  this is DPDM's "stochastic DDIM".
- `edm`: EDM Algorithm 2 (Heun's 2nd-order method with stochastic "churn" S_churn,
  S_tmin, S_tmax, S_noise).

All use the EDM time steps (EDM Eq. 5), rho = 7, over [sigma_min, sigma_max], with
sigma_N = 0 appended; the last step to sigma = 0 is an Euler ODE step, which returns
D(x; sigma_{N-1}) (DPDM's final denoising step). Classifier-free guidance (Ho &
Salimans 2021, as in DPDM) uses D_w = (1 + w) D(x | c) - w D(x | null).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dpdm.artifacts import DPDMError, atomic_path, save_npz
from dpdm.devices import pick_device

log = logging.getLogger("dpdm.sampling")

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]  # (x [N, ...], sigma) -> D(x; sigma) [N, ...]

SAMPLER_DEFAULTS = {
    "steps": 50,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "rho": 7.0,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": float("inf"),
    "s_noise": 1.0,
    "guidance": 0.0,
    "labels": "uniform",
}


# ----------------------------------------------------------------------------
# Noise levels.


def sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                device=None) -> torch.Tensor:
    """EDM Eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    for i < N, and sigma_N = 0. Returns float64 [N + 1], decreasing."""
    if num_steps < 1:
        raise DPDMError(f"a sampler needs at least 1 step, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise DPDMError(f"sampler sigma range must satisfy 0 < sigma_min <= sigma_max, got [{sigma_min}, {sigma_max}]")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


# ----------------------------------------------------------------------------
# Samplers: each maps latents ~ N(0, I) to samples, given a denoiser.


def ddim_sampler(denoise: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Deterministic DDIM = Euler steps of dx/dsigma = (x - D(x; sigma)) / sigma (EDM Eq. 3)."""
    sig = [float(s) for s in sigmas]
    x = latents.to(torch.float64) * sig[0]
    for s_cur, s_next in zip(sig[:-1], sig[1:]):
        d = (x - denoise(x, s_cur)) / s_cur
        x = x + (s_next - s_cur) * d
    return x


def stochastic_ddim_sampler(denoise: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler-Maruyama on dx = -2 sigma grad log p dsigma + sqrt(2 sigma) dw_bar (see module
    docstring): x <- x + 2 (s_next - s) (x - D) / s + sqrt(2 s |s_next - s|) z. The last
    step (to sigma = 0) is noise-free and returns D(x; sigma_{N-1})."""
    sig = [float(s) for s in sigmas]
    x = latents.to(torch.float64) * sig[0]
    for s_cur, s_next in zip(sig[:-1], sig[1:]):
        den = denoise(x, s_cur)
        if s_next > 0:
            dt = s_next - s_cur
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + 2 * dt * (x - den) / s_cur + math.sqrt(2 * s_cur * abs(dt)) * z
        else:
            x = den
    return x


def edm_sampler(denoise: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor,
                generator: torch.Generator | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """EDM Algorithm 2: per step, raise the noise to sigma_hat = (1 + gamma) sigma with
    gamma = min(S_churn / N, sqrt(2) - 1) for sigma in [S_tmin, S_tmax] (adding fresh
    noise of std S_noise sqrt(sigma_hat^2 - sigma^2)), then a Heun step to sigma_next
    (Euler for the final step to sigma = 0)."""
    sig = [float(s) for s in sigmas]
    num_steps = len(sig) - 1
    x = latents.to(torch.float64) * sig[0]
    for i, (s_cur, s_next) in enumerate(zip(sig[:-1], sig[1:])):
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= s_cur <= s_tmax else 0.0
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:  # EDM Alg. 2 lines 5-6
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * s_noise * z
        d = (x - denoise(x, s_hat)) / s_hat  # line 7
        x_next = x + (s_next - s_hat) * d  # line 8
        if i < num_steps - 1:  # 2nd-order correction, lines 9-11
            d_prime = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


SAMPLERS = {"ddim": ddim_sampler, "stochastic_ddim": stochastic_ddim_sampler, "edm": edm_sampler}


# ----------------------------------------------------------------------------
# Guidance and the sampler front end.


class GuidedDenoiser:
    """D_w(x; sigma, c) = (1 + w) D(x; sigma, c) - w D(x; sigma, null) (classifier-free
    guidance, Ho & Salimans 2021), both terms from one forward of 2N rows. With w = 0 or
    no labels it is the plain (conditional or unconditional) denoiser."""

    def __init__(self, precond, class_labels: torch.Tensor | None, guidance: float = 0.0):
        self.precond = precond
        self.class_labels = class_labels
        self.guidance = float(guidance)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.class_labels is None or self.guidance == 0:
            return self.precond(x, sigma, self.class_labels).to(x.dtype)
        null = torch.full_like(self.class_labels, self.precond.num_classes)
        both = self.precond(torch.cat([x, x]), sigma, torch.cat([self.class_labels, null])).to(x.dtype)
        cond, uncond = both.chunk(2)
        return (1 + self.guidance) * cond - self.guidance * uncond


def resolve_sampler(options: dict, precond=None) -> dict:
    """A sampler's settings with defaults filled in; the sigma range is clamped to the
    range the preconditioning was trained on (as EDM's generate.py does)."""
    opts = {**SAMPLER_DEFAULTS, **{k: v for k, v in (options or {}).items() if v is not None}}
    if opts.get("kind") not in SAMPLERS:
        raise DPDMError(f"sampler kind {opts.get('kind')!r} is unknown; choose one of {sorted(SAMPLERS)}")
    if precond is not None:
        opts["sigma_min"] = max(float(opts["sigma_min"]), float(precond.sigma_min))
        opts["sigma_max"] = min(float(opts["sigma_max"]), float(precond.sigma_max))
    return opts


def run_sampler(precond, latents: torch.Tensor, class_labels: torch.Tensor | None, options: dict,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Run one sampler (settings as in config `samplers.<name>`) from latents ~ N(0, I).
    Returns float64 samples [N, C, H, W] (unclipped)."""
    opts = resolve_sampler(options, precond)
    sigmas = sigma_steps(int(opts["steps"]), float(opts["sigma_min"]), float(opts["sigma_max"]),
                         float(opts["rho"]), device=latents.device)
    denoise = GuidedDenoiser(precond, class_labels, float(opts["guidance"]))
    kind = opts["kind"]
    if kind == "edm":
        return edm_sampler(denoise, latents, sigmas, generator, s_churn=float(opts["s_churn"]),
                           s_tmin=float(opts["s_tmin"]), s_tmax=float(opts["s_tmax"]),
                           s_noise=float(opts["s_noise"]))
    return SAMPLERS[kind](denoise, latents, sigmas, generator)


# ----------------------------------------------------------------------------
# Generation: model.pt -> samples_{sampler}.npz + grid_{sampler}.png


def batch_seed(seed: int, sampler_name: str, batch_index: int) -> int:
    """A 63-bit seed from (cell seed, sampler name, batch index): stable across runs and
    machines, different per sampler, independent of how many batches follow."""
    digest = hashlib.sha256(f"dpdm-sample:{int(seed)}:{sampler_name}:{int(batch_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _labels_for(opts: dict, num_classes: int, n: int, generator: torch.Generator, device) -> torch.Tensor | None:
    if num_classes == 0:
        if opts["labels"] != "uniform":
            raise DPDMError(f"sampler asks for class {opts['labels']} but the model is unconditional "
                            "(num_classes = 0); remove 'labels' from the sampler")
        return None
    if opts["labels"] == "uniform":
        return torch.randint(num_classes, [n], generator=generator, device=device)
    c = int(opts["labels"])
    if not 0 <= c < num_classes:
        raise DPDMError(f"sampler key 'labels' = {c} is not a class of this model (0 .. {num_classes - 1})")
    return torch.full([n], c, dtype=torch.long, device=device)


GRID_PAD = 1  # pixels between the grid's images
GRID_PAD_VALUE = 128  # mid grey: visible against black and white backgrounds


def grid_order(labels: np.ndarray, grid_size: int) -> np.ndarray:
    """Indices of the images a grid shows: conditional, one row per class (up to grid_size
    rows), each holding that class's first grid_size samples; unconditional, the first
    grid_size^2."""
    if len(labels) == 0 or labels.min() < 0:
        return np.arange(min(len(labels), grid_size * grid_size))
    rows = [np.flatnonzero(labels == c)[:grid_size] for c in np.unique(labels)[:grid_size]]
    return np.concatenate([np.pad(r, (0, grid_size - len(r)), constant_values=-1) for r in rows])


def save_grid(path, images: np.ndarray, labels: np.ndarray, grid_size: int) -> None:
    """PNG of a grid_size-wide grid (`grid_order`: one row per class when conditional), the
    images separated by GRID_PAD grey pixels, written atomically. A class with fewer than
    grid_size samples leaves its row's end empty."""
    from PIL import Image

    order = grid_order(labels, grid_size)
    h, w, c = images.shape[1:] if len(images) else (1, 1, 1)
    cols = max(1, min(grid_size, len(order)))
    rows = max(1, math.ceil(len(order) / cols))
    step_h, step_w = h + GRID_PAD, w + GRID_PAD
    canvas = np.full([rows * step_h + GRID_PAD, cols * step_w + GRID_PAD, c], GRID_PAD_VALUE, dtype=np.uint8)
    for i, index in enumerate(order):
        r, q = divmod(i, cols)
        top, left = GRID_PAD + r * step_h, GRID_PAD + q * step_w
        canvas[top:top + h, left:left + w] = images[index] if index >= 0 else 0
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _check_same_cell(model_path, trained: dict, wanted: dict) -> None:
    """The model must be the cell's own: samples of another cell's model would be
    reported (and their ε read) under the wrong cell."""
    keys = ("dataset", "eps", "seed", "variant")
    diff = [k for k in keys if k in wanted and trained.get(k, "" if k == "variant" else None) != wanted[k]]
    if diff:
        def show(c):
            return ", ".join(f"{k} {c.get(k)!r}" for k in diff)
        raise DPDMError(f"model {model_path} was trained for another cell ({show(trained)}), not this one "
                        f"({show(wanted)}): pass the cell's own model.pt")


def generate(settings: dict, model_path, sampler_name: str, out_path, grid_path=None,
             num_samples: int | None = None, batch_size: int | None = None) -> dict:
    """Sample settings["sample"]["num_samples"] images from model.pt's EMA weights with
    the sampler settings["samplers"][sampler_name]; write `out_path` (npz: `images` uint8
    NHWC, `labels` int64, -1 when unconditional) and optionally a PNG grid. Deterministic:
    batch b is seeded from (settings["cell"]["seed"], sampler_name, b)."""
    from tqdm import tqdm

    from dpdm.data import to_uint8
    from dpdm.diffusion import load_model

    samplers = settings.get("samplers") or {}
    if sampler_name not in samplers:
        raise DPDMError(f"unknown sampler '{sampler_name}'; this cell's settings.samplers defines: "
                        f"{', '.join(sorted(samplers)) or '(none)'}")
    device = pick_device(settings.get("device", "auto"))
    precond, trained_with, meta = load_model(model_path, device)
    _check_same_cell(model_path, trained_with.get("cell") or {}, settings.get("cell") or {})
    opts = resolve_sampler(samplers[sampler_name], precond)
    spec = meta["spec"]
    from dpdm.config import with_defaults

    sample_cfg = with_defaults("sample", settings.get("sample"))
    n = int(num_samples or sample_cfg["num_samples"])
    bs = int(batch_size or sample_cfg["batch_size"])
    seed = int((settings.get("cell") or {}).get("seed", 0))
    num_classes = int(spec["num_classes"])
    if num_classes == 0 and float(opts["guidance"]) > 0:
        log.warning("sampler %s: guidance %s ignored, the model is unconditional", sampler_name, opts["guidance"])
    shape = [int(spec["channels"]), int(spec["resolution"]), int(spec["resolution"])]
    log.info("sampling %d images with %s (%s) on %s", n, sampler_name, opts, device)

    images, labels = [], []
    num_batches = math.ceil(n / bs)
    with torch.inference_mode():
        for b in tqdm(range(num_batches), desc=f"sample {sampler_name}", unit="batch"):
            m = min(bs, n - b * bs)
            gen = torch.Generator(device=device).manual_seed(batch_seed(seed, sampler_name, b))
            latents = torch.randn([m, *shape], generator=gen, device=device)
            class_labels = _labels_for(opts, num_classes, m, gen, device)
            x = run_sampler(precond, latents, class_labels, opts, generator=gen)
            images.append(to_uint8(x))
            if class_labels is None:
                labels.append(np.full([m], -1, dtype=np.int64))
            else:
                labels.append(class_labels.cpu().numpy().astype(np.int64))
    images = np.concatenate(images)
    labels = np.concatenate(labels)
    save_npz(out_path, images=images, labels=labels)
    if grid_path is not None:
        save_grid(grid_path, images, labels, int(sample_cfg["grid_size"]))
    return {"num_samples": n, "sampler": sampler_name, "options": opts, "model_step": meta["step"],
            "out": str(Path(out_path))}
