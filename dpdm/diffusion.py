"""Preconditionings, noise-level distributions and the noise-multiplicity loss.

Every parameterisation is written as a denoiser in EDM's sigma-space (Karras et al.
2022, "EDM"): data y, noisy x = y + sigma * n with n ~ N(0, I), and

    D(x; sigma, label) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), label)   (EDM Eq. 7)

so one set of samplers (dpdm.sampling) serves them all. The training loss is

    E_{sigma, n} [ lambda(sigma) || D(y + sigma n; sigma) - y ||^2 ]                          (EDM Eq. 2, 8)

with the sigma distribution and weighting lambda of each parameterisation (EDM Table 1;
v-prediction as in DPDM's code). For all four, lambda(sigma) c_out(sigma)^2 = 1, i.e. the
loss is the plain regression loss of F against its effective target.

Noise multiplicity (DPDM Sec. 3.2): each example's loss averages K independent
noise draws before its gradient is clipped, which lowers the variance of the clipped
per-example gradient at no privacy cost. Randomness is split from computation:
`draw_noise` draws sigma, n and the label-dropout flags for a batch (DP training:
`draw_example_noise`, each example from its own secret generator); `example_loss`
(one example, vmap-able) and `batch_loss` (all examples in one forward) are
deterministic functions of those draws, so per-example gradients are exact and
reproducible.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from dpdm.artifacts import DPDMError, save_torch, torch_load_error
from dpdm.networks import DDPMpp, build_network

MODEL_FORMAT = "dpdm-model-v1"

# ----------------------------------------------------------------------------
# Preconditionings.


class Precond(nn.Module):
    """Base class: D(x; sigma, label) from a network F (EDM Eq. 7).

    Subclasses define `scalings(sigma) -> (c_skip, c_out, c_in, c_noise)`,
    `sample_sigma(n, generator)` (training noise levels) and `loss_weight(sigma)`,
    and set `sigma_min` / `sigma_max` (the noise range the model is trained for; the
    samplers clamp their grid to it, as EDM's generate.py does).
    """

    name = "base"
    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, net: DDPMpp):
        super().__init__()
        self.net = net
        self.num_classes = net.num_classes

    def scalings(self, sigma: torch.Tensor):
        raise NotImplementedError

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, C, H, W]; sigma: a number, [] or [N]; class_labels: long [N] or None."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        x32 = x.to(torch.float32)
        noise_labels = c_noise.reshape(-1).expand(x.shape[0])
        f = self.net(c_in * x32, noise_labels, class_labels)
        return (c_skip * x32 + c_out * f.to(torch.float32)).to(x.dtype)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class EDMPrecond(Precond):
    """EDM (Karras et al. 2022, Table 1 "ours"): c_skip = s_d^2 / (sigma^2 + s_d^2),
    c_out = sigma s_d / sqrt(sigma^2 + s_d^2), c_in = 1 / sqrt(sigma^2 + s_d^2),
    c_noise = ln(sigma) / 4; ln sigma ~ N(P_mean, P_std^2); lambda = 1 / c_out^2.
    DPDM uses s_d = sqrt(1/3), the std of uniform data in [-1, 1]."""

    name = "edm"

    def __init__(self, net, sigma_data: float = math.sqrt(1 / 3), p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(net)
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def scalings(self, sigma):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, n, generator=None):
        z = torch.randn([n], generator=generator, device=_generator_device(generator))
        return (z * self.p_std + self.p_mean).exp()

    def loss_weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


class VPredPrecond(Precond):
    """v-prediction (Salimans & Ho 2022) as DPDM defines it (its VDenoiser / VLoss).

    Cosine schedule: alpha_t = cos(pi t / 2), so sigma = tan(pi t / 2) in EDM's
    sigma-space and logSNR(t) = -2 ln sigma = -2 ln tan(pi t / 2). The network
    predicts v = alpha n - sigma_t y (sigma_t = sin(pi t / 2)) from the
    variance-normalised input, which is the EDM form with unit data scale:
    c_skip = 1 / (sigma^2 + 1), c_out = sigma / sqrt(sigma^2 + 1),
    c_in = 1 / sqrt(sigma^2 + 1), c_noise = t = (2 / pi) arctan(sigma).
    Training draws t ~ U[t(logsnr_max), t(logsnr_min)] (uniform in t, i.e. the cosine
    schedule's logSNR density, truncated to [logsnr_min, logsnr_max]; NOT uniform in
    logSNR) and weights lambda = (sigma^2 + 1) / sigma^2 = 1 / c_out^2 (the v-loss).
    """

    name = "v"

    def __init__(self, net, logsnr_min: float = -9.0, logsnr_max: float = 13.0):
        super().__init__(net)
        if not logsnr_min < logsnr_max:
            raise DPDMError(f"diffusion.logsnr_min ({logsnr_min}) must be below diffusion.logsnr_max ({logsnr_max})")
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)
        self.t_min = self._t_of_logsnr(self.logsnr_max)
        self.t_max = self._t_of_logsnr(self.logsnr_min)
        self.sigma_min = float(np.exp(-self.logsnr_max / 2))
        self.sigma_max = float(np.exp(-self.logsnr_min / 2))

    @staticmethod
    def _t_of_logsnr(logsnr: float) -> float:
        return float(2 / np.pi * np.arctan(np.exp(-logsnr / 2)))

    def scalings(self, sigma):
        c_skip = 1 / (sigma ** 2 + 1)
        c_out = sigma / (sigma ** 2 + 1).sqrt()
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = torch.atan(sigma) * (2 / np.pi)
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, n, generator=None):
        u = torch.rand([n], generator=generator, device=_generator_device(generator))
        t = self.t_min + (self.t_max - self.t_min) * u
        return torch.tan(t * (np.pi / 2))

    def loss_weight(self, sigma):
        return (sigma ** 2 + 1) / sigma ** 2


class VPPrecond(Precond):
    """EDM's VP (Song et al. 2021 VP-SDE; EDM Table 1): sigma(t) = sqrt(exp(beta_d t^2 / 2
    + beta_min t) - 1); c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = (M - 1) sigma^-1(sigma) with M = 1000; t ~ U(eps_t, 1); lambda = 1 / sigma^2."""

    name = "vp"

    def __init__(self, net, beta_d: float = 19.9, beta_min: float = 0.1, eps_t: float = 1e-5, M: int = 1000):
        super().__init__(net)
        self.beta_d, self.beta_min, self.eps_t, self.M = float(beta_d), float(beta_min), float(eps_t), int(M)
        self.sigma_min = float(self._sigma(torch.tensor(self.eps_t, dtype=torch.float64)))
        self.sigma_max = float(self._sigma(torch.tensor(1.0, dtype=torch.float64)))

    def _sigma(self, t):
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def _sigma_inv(self, sigma):
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def scalings(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self._sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, n, generator=None):
        u = torch.rand([n], generator=generator, device=_generator_device(generator))
        return self._sigma(self.eps_t + (1 - self.eps_t) * u)

    def loss_weight(self, sigma):
        return 1 / sigma ** 2


class VEPrecond(Precond):
    """EDM's VE (Song et al. 2021 VE-SDE; EDM Table 1): c_skip = 1, c_out = sigma,
    c_in = 1, c_noise = ln(sigma / 2); ln sigma ~ U(ln sigma_min, ln sigma_max);
    lambda = 1 / sigma^2."""

    name = "ve"

    def __init__(self, net, sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(net)
        if not 0 < sigma_min < sigma_max:
            raise DPDMError(f"diffusion.ve_sigma_min ({sigma_min}) must be in (0, ve_sigma_max = {sigma_max})")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def scalings(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, n, generator=None):
        u = torch.rand([n], generator=generator, device=_generator_device(generator))
        lo, hi = np.log(self.sigma_min), np.log(self.sigma_max)
        return (lo + (hi - lo) * u).exp()

    def loss_weight(self, sigma):
        return 1 / sigma ** 2


# config `diffusion.precond` -> (class, {constructor argument: config key of `diffusion`}).
PRECONDS = {
    "edm": (EDMPrecond, {"sigma_data": "sigma_data", "p_mean": "p_mean", "p_std": "p_std"}),
    "v": (VPredPrecond, {"logsnr_min": "logsnr_min", "logsnr_max": "logsnr_max"}),
    "vp": (VPPrecond, {"beta_d": "vp_beta_d", "beta_min": "vp_beta_min", "eps_t": "vp_eps_t"}),
    "ve": (VEPrecond, {"sigma_min": "ve_sigma_min", "sigma_max": "ve_sigma_max"}),
}


def build_precond(settings: dict, resolution: int, channels: int, num_classes: int) -> Precond:
    """The preconditioned denoiser of settings["diffusion"] around the network of settings["model"]."""
    from dpdm.config import with_defaults

    d = with_defaults("diffusion", settings.get("diffusion"))
    if d["precond"] not in PRECONDS:
        raise DPDMError(f"config key 'diffusion.precond': unknown preconditioning '{d['precond']}'; "
                        f"choose one of {sorted(PRECONDS)}")
    cls, keys = PRECONDS[d["precond"]]
    net = build_network(settings, resolution, channels, num_classes)
    return cls(net, **{arg: d[key] for arg, key in keys.items()})


# ----------------------------------------------------------------------------
# The noise-multiplicity loss (DPDM Sec. 3.2).


class NoiseDraw(NamedTuple):
    """All randomness of one batch's loss: sigma [B, K], noise [B, K, C, H, W], and
    drop [B] (bool: the example's label is replaced by the null class for all K draws)."""

    sigma: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor


def draw_noise(precond: Precond, batch_size: int, K: int, image_shape, num_classes: int, label_dropout: float,
               generator: torch.Generator | None = None) -> NoiseDraw:
    """Draw sigma ~ p(sigma) and n ~ N(0, I) K times per example, and label dropout once
    per example (DPDM: the label is dropped with probability `label_dropout` to train
    the unconditional model for classifier-free guidance). Tensors live on the
    generator's device. Draw order is fixed (sigma, noise, drop) for reproducibility."""
    device = _generator_device(generator)
    sigma = precond.sample_sigma(batch_size * K, generator).reshape(batch_size, K)
    noise = torch.randn([batch_size, K, *image_shape], generator=generator, device=device)
    u = torch.rand([batch_size], generator=generator, device=device)
    drop = (u < label_dropout) & (num_classes > 0)
    return NoiseDraw(sigma=sigma, noise=noise, drop=drop)


def draw_example_noise(precond: Precond, generators, K: int, image_shape, num_classes: int,
                       label_dropout: float, device=None) -> NoiseDraw:
    """`draw_noise` for a batch in which example i draws ONLY from generators[i] (in the
    same order: its K sigmas, its K noise images, its dropout flag), so its draws do not
    depend on the other examples of the batch. DP training passes generators keyed by
    the secret key, the step and the example's index (dpdm.privacy.example_seeds)."""
    draws = [draw_noise(precond, 1, K, image_shape, num_classes, label_dropout, g) for g in generators]
    if not draws:  # an empty Poisson batch
        device = torch.device(device or "cpu")
        return NoiseDraw(sigma=torch.zeros([0, K], device=device), noise=torch.zeros([0, K, *image_shape],
                         device=device), drop=torch.zeros([0], dtype=torch.bool, device=device))
    return NoiseDraw(*(torch.cat(parts) for parts in zip(*draws)))


def apply_label_dropout(labels: torch.Tensor | None, drop: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Replace dropped labels by the null class `num_classes` (idempotent)."""
    if labels is None:
        return None
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def example_loss(precond: Precond, y: torch.Tensor, label: torch.Tensor | None, sigma: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    """One example's noise-multiplicity loss (DPDM Sec. 3.2, with the precond's weighting):

        (1/K) sum_k mean_pixels lambda(sigma_k) (D(y + sigma_k n_k; sigma_k, label) - y)^2

    y: [C, H, W], or [K, C, H, W] with augmentation multiplicity (draw k's own augmented
    copy of the image, dpdm.augment); label: long [] (already dropped) or None; sigma: [K];
    noise: [K, C, H, W]. The K noisy copies go through the network as one batch of K rows.
    Pure function of its inputs: safe under torch.func.vmap / grad (the mean, not the
    sum, fixes the scale the clipping bound C refers to).
    """
    k = sigma.shape[0]
    s = sigma.reshape(k, 1, 1, 1)
    y = y if y.dim() == 4 else y.unsqueeze(0)
    x = y + s * noise
    labels = None if label is None else label.expand(k)
    d = precond(x, sigma, labels)
    return (precond.loss_weight(s) * (d - y) ** 2).mean()


def batch_loss(precond: Precond, y: torch.Tensor, labels: torch.Tensor | None, draw: NoiseDraw) -> torch.Tensor:
    """Per-example losses [B] of `example_loss` for a whole batch in one forward of B*K
    rows (the non-private path and the reference). `labels` are the raw labels [B] (or
    None); draw.drop is applied here (applying it twice changes nothing)."""
    b, k = draw.sigma.shape
    s = draw.sigma.reshape(b, k, 1, 1, 1)
    y = y if y.dim() == 5 else y.unsqueeze(1)  # [B, K, C, H, W]: augmented copies, or one image
    x = y + s * draw.noise
    if labels is not None:
        labels = apply_label_dropout(labels, draw.drop, precond.num_classes).repeat_interleave(k)
    d = precond(x.flatten(0, 1), draw.sigma.reshape(-1), labels).reshape(x.shape)
    loss = precond.loss_weight(s) * (d - y) ** 2
    return loss.reshape(b, -1).mean(dim=1)


def batch_example_losses(precond: Precond, y: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
    """`example_loss` of a whole batch in one forward of B*K rows (example-major), [B]:
    the batched twin that dpdm.privacy.DPSGD uses for per-example gradients by rows.
    labels: long [B] already dropped, or None; sigma: [B, K]; noise: [B, K, C, H, W]."""
    drop = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    return batch_loss(precond, y, labels, NoiseDraw(sigma=sigma, noise=noise, drop=drop))


# ----------------------------------------------------------------------------
# model.pt


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_model(path, precond: Precond, ema_precond: Precond, settings: dict, spec_dict: dict, step: int,
               extra: dict | None = None) -> None:
    """Write model.pt atomically: {"format": "dpdm-model-v1", "settings", "spec":
    {"resolution", "channels", "num_classes"}, "ema", "model", "step"} and `extra`
    (e.g. dpdm.pretrain's "pretrain" record; readers ignore keys they do not know)."""
    spec = {key: int(spec_dict[key]) for key in ("resolution", "channels", "num_classes")}
    save_torch(path, {
        "format": MODEL_FORMAT,
        "settings": settings,
        "spec": spec,
        "ema": _cpu_state(ema_precond),
        "model": _cpu_state(precond),
        "step": int(step),
        **(extra or {}),
    })


def load_model(path, device="cpu"):
    """Rebuild the EMA denoiser from model.pt: returns (precond in eval mode without
    gradients on `device`, the settings it was trained with, meta {format, spec, step, path})."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise DPDMError(f"model file {path} does not exist; train the cell first (python -m dpdm train)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or not a torch file
        raise DPDMError(f"model file {path} cannot be read ({torch_load_error(e)}); delete it and train again") from e
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DPDMError(f"model file {path} has format {found!r}, expected {MODEL_FORMAT!r}; "
                        "it was not written by dpdm train")
    settings, spec = obj["settings"], obj["spec"]
    precond = build_precond(settings, spec["resolution"], spec["channels"], spec["num_classes"])
    precond.load_state_dict(obj["ema"])
    precond.to(device).eval().requires_grad_(False)
    meta = {"format": obj["format"], "spec": dict(spec), "step": int(obj.get("step", 0)), "path": str(path)}
    return precond, settings, meta
