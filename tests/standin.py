"""A stand-in model and per-example loss for the DP-SGD tests (also run by the
distributed worker, tests/dist_worker.py, in subprocesses)."""

import torch
import torch.nn.functional as F
from torch import nn


class Standin(nn.Module):
    def __init__(self, num_classes=3, ch=4):
        super().__init__()
        self.emb = nn.Embedding(num_classes + 1, ch)   # last row: the null class
        self.conv1 = nn.Conv2d(1, ch, 3, padding=1)
        self.norm = nn.GroupNorm(2, ch)
        self.conv2 = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x, sigma, labels):
        h = self.conv1(x) / (1 + sigma).view(-1, 1, 1, 1) + self.emb(labels)[:, :, None, None]
        return self.conv2(F.silu(self.norm(h)))


def standin_loss(model, y, label, sigma, noise):
    # ONE example: y [C,H,W], label [], sigma [K], noise [K,C,H,W]; mean over K and pixels
    k = sigma.shape[0]
    x = y.unsqueeze(0) + sigma.view(-1, 1, 1, 1) * noise
    d = model(x, sigma, label.expand(k))
    return ((d - y.unsqueeze(0)) ** 2).mean()


def standin_batch(n, k=2, num_classes=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, 1, 6, 6, generator=g) * 2 - 1
    y = y * scale
    labels = torch.randint(0, num_classes + 1, (n,), generator=g)
    sigma = torch.rand(n, k, generator=g) * 2 + 0.1
    noise = torch.randn(n, k, 1, 6, 6, generator=g)
    return y, labels, sigma, noise


def standin_model(seed=0):
    torch.manual_seed(seed)
    return Standin()
