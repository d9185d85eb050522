"""Augmentation multiplicity (De et al. 2022; Ghalebikesabi et al. 2023, Sec. 3): each of
an example's K noise draws also sees its own random augmentation of the image, and the
example's loss averages the K (augmented, noised) copies before its gradient is clipped:

    l_i = (1/K) sum_k lambda(sigma_k) || D(a_k(y_i) + sigma_k n_k; sigma_k) - a_k(y_i) ||^2

The K copies all derive from the one example, so the gradient of l_i is still that
example's contribution, clipped as one unit: the sensitivity, and the privacy guarantee,
are unchanged. Augmentations (config train.augment, default off): a horizontal flip with
probability 1/2, and a translation by up to `translate` pixels in each direction
(reflection padding). Their parameters are drawn from the example's own generator
(dpdm.privacy.example_seeds), so they depend only on the secret key, the step and the
example's index, like its noise.
"""

from __future__ import annotations

import torch

from dpdm.errors import DPDMError


def check(spec: dict | None, resolution: int) -> dict | None:
    """The augmentation spec, validated (None or all off: no augmentation)."""
    if not spec or not (spec.get("flip") or spec.get("translate")):
        return None
    t = int(spec.get("translate") or 0)
    if not 0 <= t < resolution // 2:
        raise DPDMError(f"config key 'train.augment.translate' = {t}: must be in [0, {resolution // 2 - 1}] for "
                        f"{resolution}x{resolution} images")
    return {"flip": bool(spec.get("flip")), "translate": t}


def draw(generator: torch.Generator, k: int, spec: dict) -> torch.Tensor:
    """[K, 3] int64 (flip 0/1, dx, dy) for one example's K draws, from its generator."""
    device = generator.device
    flip = (torch.rand(k, generator=generator, device=device) < 0.5) if spec["flip"] else torch.zeros(
        k, dtype=torch.bool, device=device)
    t = spec["translate"]
    shift = torch.randint(0, 2 * t + 1, (k, 2), generator=generator, device=device) if t else torch.full(
        (k, 2), 0, dtype=torch.int64, device=device)
    return torch.cat([flip.long()[:, None], shift], dim=1)


def draw_batch(generators, k: int, spec: dict, device=None) -> torch.Tensor:
    """[B, K, 3]: `draw` for each example from its own generator (in batch order)."""
    generators = list(generators)
    if not generators:
        return torch.zeros([0, k, 3], dtype=torch.long, device=device)
    return torch.stack([draw(g, k, spec) for g in generators])


def apply(y: torch.Tensor, params: torch.Tensor, translate: int) -> torch.Tensor:
    """Images y [B, C, H, W] and params [B, K, 3] -> the augmented copies [B, K, C, H, W]:
    copy (b, k) is y[b] flipped left-right when params[b, k, 0], then shifted so that its
    pixel (i, j) is the reflection-padded pixel (i + dy - t, j + dx - t) (t = translate)."""
    b, c, h, w = y.shape
    t = int(translate)
    padded = torch.nn.functional.pad(y, (t, t, t, t), mode="reflect") if t else y
    flip, dx, dy = params[..., 0].bool(), params[..., 1], params[..., 2]
    cols = torch.arange(w, device=y.device)
    cols = torch.where(flip[..., None], w - 1 - cols, cols) + dx[..., None]  # [B, K, W]
    rows = torch.arange(h, device=y.device) + dy[..., None]  # [B, K, H]
    bi = torch.arange(b, device=y.device)[:, None, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, :, None], cols[:, :, None, :]]  # [B, K, H, W, C]
    return out.permute(0, 1, 4, 2, 3).contiguous()
