"""The DDPM++ U-Net that DPDM trains (Song et al. 2021; Dockhorn et al. 2023).

DDPM++ is the residual U-Net of "Score-Based Generative Modeling through Stochastic
Differential Equations" (Song et al. 2021) with BigGAN-style resampling residual
blocks and skip connections rescaled by 1/sqrt(2). It is written here in the style of
EDM's `SongUNet` (Karras et al. 2022): small modules, an encoder and a decoder kept
in dicts named by resolution. The DPDM configuration for 28x28 images is 32 base
channels, channel multipliers (1, 2, 2), two residual blocks per level, attention at
7x7 (8x8 and 16x16 for 32x32 images), no dropout, BigGAN-style resampling blocks,
sinusoidal noise embedding and a learned class embedding with one
extra row (the null class for classifier-free guidance): 1.75M parameters.

DP-SGD constraints shape the code:
- GroupNorm only (BatchNorm mixes examples, so per-example gradients would not exist).
- The forward pass is a pure function of (parameters, inputs): no in-place updates of
  activations, no buffers written, no data-dependent Python control flow. The
  privacy helper calls it through `torch.func.functional_call` inside
  `torch.func.vmap(torch.func.grad(...))` over examples, where each example's call
  sees a batch of K noisy copies; GroupNorm and attention act per row, so a row's
  output never depends on the other rows.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Primitives with explicit initialisation (EDM's Linear / Conv2d / GroupNorm).


def _weight_init(shape: Sequence[int], fan_in: int, fan_out: int, scale: float) -> torch.Tensor:
    """Xavier-uniform (= DDPM++'s variance scaling 'fan_avg', 'uniform'), times `scale`."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(*shape) * 2.0 - 1.0) * bound * scale


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, init_scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(_weight_init([out_features, in_features], in_features, out_features, init_scale))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """Same-padding convolution with an odd kernel (1x1 or 3x3)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, init_scale: float = 1.0):
        super().__init__()
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(_weight_init(shape, fan_in, fan_out, init_scale))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


class GroupNorm(nn.Module):
    """GroupNorm with min(32, C // 4) groups, which always divides C when 4 divides C
    (DDPM++ / EDM choice); falls back to the largest divisor of C below that."""

    def __init__(self, num_channels: int, eps: float = 1e-6, max_groups: int = 32, min_channels_per_group: int = 4):
        super().__init__()
        groups = max(1, min(max_groups, num_channels // min_channels_per_group))
        while num_channels % groups:
            groups -= 1
        self.num_groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling (EDM's resample filter [1, 1]); view ops only, vmap-safe."""
    *lead, c, h, w = x.shape
    return x.reshape(*lead, c, h // 2, 2, w // 2, 2).mean(dim=(-3, -1))


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling (EDM's resample filter [1, 1] transposed)."""
    *lead, c, h, w = x.shape
    x = x.unsqueeze(-1).unsqueeze(-3).expand(*lead, c, h, 2, w, 2)
    return x.reshape(*lead, c, 2 * h, 2 * w)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the noise label (Vaswani et al. 2017; DDPM++ 'positional',
    frequencies 1 / max_positions^(k / (n/2 - 1)), k = 0 .. n/2 - 1). No parameters."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / max(half - 1, 1)
        freqs = (1.0 / self.max_positions) ** freqs
        args = x.to(torch.float32).unsqueeze(-1) * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------
# Building blocks.


class SelfAttention(nn.Module):
    """Single-head self-attention over pixels (DDPM++ AttnBlockpp): returns the residual
    update; the caller adds it and rescales."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = GroupNorm(channels)
        self.qkv = Conv2d(channels, channels * 3, kernel=1, init_scale=math.sqrt(0.2))
        self.proj = Conv2d(channels, channels, kernel=1, init_scale=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(*lead, 3, c, h * w).unbind(dim=-3)
        weights = torch.softmax(torch.einsum("...ci,...cj->...ij", q, k) / math.sqrt(c), dim=-1)
        a = torch.einsum("...ij,...cj->...ci", weights, v).reshape(*lead, c, h, w)
        return self.proj(a)


class ResBlock(nn.Module):
    """BigGAN-style residual block of DDPM++ (Song et al. 2021):
    h = Conv(SiLU(GN(Conv(resample(SiLU(GN(x)))) + Dense(emb))));
    out = (h + skip(resample(x))) / sqrt(2), then optional attention with the same rescaling.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, dropout: float = 0.0):
        super().__init__()
        self.up, self.down = up, down
        self.dropout = dropout
        self.skip_scale = np.sqrt(0.5)
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, init_scale=1e-5)
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1)
        self.attn = SelfAttention(out_channels) if attention else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample2x(x)
        if self.down:
            return downsample2x(x)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        h = h + self.affine(emb).unsqueeze(-1).unsqueeze(-1)
        h = F.silu(self.norm1(h))
        if self.dropout > 0:  # a static setting, never data-dependent; DP training uses 0
            h = F.dropout(h, p=self.dropout, training=self.training)
        h = self.conv1(h)
        skip = self._resample(x)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * self.skip_scale
        if self.attn is not None:
            x = (x + self.attn(x)) * self.skip_scale
        return x


# ----------------------------------------------------------------------------
# The U-Net.


class DDPMpp(nn.Module):
    """DDPM++ U-Net F(x; c_noise, label) with output channels = input channels.

    Encoder: a 3x3 input conv, then per level `num_blocks` residual blocks (attention
    when the level's resolution is in `attn_resolutions`) and, between levels, a
    downsampling residual block. Middle: residual block with attention, residual
    block. Decoder: per level `num_blocks + 1` residual blocks fed the concatenated
    encoder skips (attention after the last one where listed), and an upsampling
    residual block between levels. Output: GroupNorm, SiLU, zero-initialised 3x3 conv.

    Conditioning: emb = SiLU(Dense(SiLU(Dense(PE(c_noise) + E[label])))), where E has
    num_classes + 1 rows (row num_classes = the null class, classifier-free guidance,
    Ho & Salimans 2021); num_classes = 0 builds an unconditional net (no E).
    """

    def __init__(self, img_resolution: int, in_channels: int, num_classes: int, model_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (7,), dropout: float = 0.0, channel_mult_emb: int = 4):
        super().__init__()
        levels = len(channel_mult)
        if img_resolution % (2 ** (levels - 1)):
            raise ValueError(f"img_resolution {img_resolution} cannot be halved {levels - 1} times "
                             f"(channel_mult has {levels} levels)")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.num_classes = int(num_classes)
        emb_channels = model_channels * channel_mult_emb
        attn_resolutions = set(int(r) for r in attn_resolutions)
        block = dict(emb_channels=emb_channels, dropout=dropout)

        # Noise and class embedding.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_label = None
        if self.num_classes > 0:
            self.map_label = nn.Embedding(self.num_classes + 1, model_channels)
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = model_channels
        skips = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = ResBlock(cout, cout, down=True, **block)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = ResBlock(cin, cout, attention=res in attn_resolutions, **block)
                skips.append(cout)

        # Middle and decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = ResBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = ResBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = ResBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = ResBlock(cin, cout, attention=attention, **block)
        assert not skips
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, in_channels, kernel=3, init_scale=1e-5)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, C, H, W]; noise_labels: [N] (c_noise); class_labels: long [N] in
        [0, num_classes] (num_classes = null class) or None (= null class)."""
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.full(noise_labels.shape, self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.map_label(class_labels)
        elif class_labels is not None:
            raise ValueError("this network is unconditional (num_classes = 0) but class labels were given")
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        h = x
        for name, module in self.enc.items():
            h = module(h) if name.endswith("_conv") else module(h, emb)
            skips.append(h)
        for name, module in self.dec.items():
            if "_block" in name:
                h = torch.cat([h, skips.pop()], dim=-3)
            h = module(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))


def build_network(settings: dict, resolution: int, channels: int, num_classes: int) -> DDPMpp:
    """The DDPM++ network described by settings["model"] for images [channels, resolution, resolution]."""
    from dpdm.config import with_defaults

    model = with_defaults("model", settings.get("model"))
    return DDPMpp(
        img_resolution=int(resolution),
        in_channels=int(channels),
        num_classes=int(num_classes),
        model_channels=int(model["channels"]),
        channel_mult=tuple(int(m) for m in model["channel_mult"]),
        num_blocks=int(model["num_blocks"]),
        attn_resolutions=tuple(int(r) for r in model["attn_resolutions"]),
        dropout=float(model["dropout"]),
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
