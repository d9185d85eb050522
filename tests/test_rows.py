"""Per-example gradients by rows (dpdm.privacy.rows): exact against one autograd pass
per example, on DDPM++ and on torch's own layers; the DP mechanism verifies them and
refuses a model that mixes rows of different examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpdm import diffusion, privacy
from dpdm.artifacts import DPDMError

SETTINGS = {"model": {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
                      "dropout": 0.0}, "diffusion": {"precond": "edm"}}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _ddpmpp_batch(num_classes, k, n=5, seed=1):
    torch.manual_seed(0)
    precond = diffusion.build_precond(SETTINGS, 8, 1, num_classes)
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    draw = diffusion.draw_noise(precond, n, k, (1, 8, 8), num_classes, 0.0, g)
    labels = None
    if num_classes:  # label dropout: examples 0 and 3 get the null class (for all their K rows)
        drop = torch.arange(n) % 3 == 0
        labels = diffusion.apply_label_dropout(torch.randint(num_classes, [n], generator=g), drop, num_classes)
    return precond, (y, labels, draw.sigma, draw.noise)


@pytest.mark.parametrize("num_classes", [10, 0])
@pytest.mark.parametrize("k", [1, 4])
def test_rows_equal_one_autograd_pass_per_example_on_ddpmpp(num_classes, k):
    precond, batch = _ddpmpp_batch(num_classes, k)
    assert privacy.unsupported(precond) == []
    fast, losses = privacy.per_example_grads(precond, diffusion.batch_example_losses, batch, method="rows")
    ref, ref_losses = privacy.per_example_grads_loop(precond, diffusion.example_loss, batch)
    assert set(fast) == set(ref)
    for name in ref:
        assert fast[name].shape == ref[name].shape
        assert _rel(fast[name], ref[name]) < 1e-5, name
    assert torch.allclose(losses, ref_losses, rtol=1e-5)
    # per example, not only in total: the examples' gradients differ from each other
    flat = torch.cat([g.reshape(len(losses), -1) for g in fast.values()], 1)
    assert torch.cdist(flat, flat).add(torch.eye(len(losses))).min() > 0


class TorchLayers(nn.Module):
    """torch's own Linear, Conv2d, GroupNorm and Embedding, K rows per example; the
    convolutions take both paths of the rows method's Conv2d rule: pointwise (1x1, no padding)
    and grouped (3x3, 5x5, and a padded 1x1 that grows the image)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 6)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.GroupNorm(3, 6)
        self.point = nn.Conv2d(6, 4, 1)
        self.wide = nn.Conv2d(4, 4, 5, padding=2, bias=False)
        self.grow = nn.Conv2d(4, 2, 1, padding=1)
        self.lin = nn.Linear(2, 1)

    def forward(self, x, labels):
        h = F.silu(self.norm(self.conv(x) + self.emb(labels)[:, :, None, None]))
        h = self.grow(F.silu(self.wide(self.point(h))))
        return self.lin(h.mean(dim=(2, 3)))


def _torch_loss(model, y, label, noise):  # one example: y [1, 5, 5], label [], noise [K, 1, 5, 5]
    k = noise.shape[0]
    return model(y.unsqueeze(0) + noise, label.expand(k)).pow(2).mean()


def _torch_batch_loss(model, y, labels, noise):
    b, k = noise.shape[:2]
    out = model((y.unsqueeze(1) + noise).flatten(0, 1), labels.repeat_interleave(k))
    return out.reshape(b, -1).pow(2).mean(dim=1)


def test_rows_on_torch_layers():
    torch.manual_seed(0)
    model = TorchLayers()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(4, 1, 5, 5, generator=g), torch.tensor([0, 3, 1, 3]), torch.randn(4, 3, 1, 5, 5, generator=g))
    fast, _ = privacy.per_example_grads(model, _torch_batch_loss, batch, method="rows")
    ref, _ = privacy.per_example_grads_loop(model, _torch_loss, batch)
    for name in ref:
        assert _rel(fast[name], ref[name]) < 1e-5, name


def _mixing_batch_loss(model, y, labels, noise):
    """Subtracts the BATCH mean: every example's loss depends on the others (a bug)."""
    b, k = noise.shape[:2]
    x = (y.unsqueeze(1) + noise).flatten(0, 1)
    out = model(x - x.mean(dim=0, keepdim=True), labels.repeat_interleave(k))
    return out.reshape(b, -1).pow(2).mean(dim=1)


def _dp(batch_loss_fn):
    return privacy.DPSGD(_torch_loss, noise_multiplier=1.0, max_grad_norm=1.0, num_examples=100, sample_rate=0.1,
                         dp_seed=0, batch_loss_fn=batch_loss_fn)


def test_dp_sgd_verifies_rows_and_refuses_a_loss_that_mixes_examples():
    torch.manual_seed(0)
    model = TorchLayers()
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(4, 1, 5, 5, generator=g), torch.tensor([0, 3, 1, 3]), torch.randn(4, 3, 1, 5, 5, generator=g))
    good = _dp(_torch_batch_loss)
    good.step(model, batch)
    assert good.per_example_method == "rows"
    with pytest.raises(DPDMError, match="mixes rows of different examples"):
        _dp(_mixing_batch_loss).step(model, batch)


def test_unsupported_layers_fall_back_to_vmap():
    class WithPReLU(TorchLayers):
        def __init__(self):
            super().__init__()
            self.act = nn.PReLU()  # a trainable layer the rows method has no rule for

        def forward(self, x, labels):
            return self.act(super().forward(x, labels))

    torch.manual_seed(0)
    model = WithPReLU()
    assert privacy.unsupported(model) == ["act.weight"]
    g = torch.Generator().manual_seed(4)
    batch = (torch.randn(3, 1, 5, 5, generator=g), torch.tensor([0, 1, 2]), torch.randn(3, 2, 1, 5, 5, generator=g))
    dp = _dp(_torch_batch_loss)
    dp.step(model, batch)
    assert dp.per_example_method == "vmap"
    with pytest.raises(ValueError, match="act.weight"):
        privacy.per_example_grads(model, _torch_batch_loss, batch, method="rows")


def test_a_registered_rule_adds_a_layer_type(monkeypatch):
    """The per-layer rules are a lookup table keyed by layer type (like Opacus'
    register_grad_sampler): a rule for PReLU makes the rows method exact for it."""
    from dpdm.privacy import rows

    class WithPReLU(TorchLayers):
        def __init__(self):
            super().__init__()
            self.act = nn.PReLU()

        def forward(self, x, labels):
            return self.act(super().forward(x, labels))

    def prelu(m, a, g, b):  # d out / d w = min(a, 0) for the single shared slope
        return {m.weight: (g * a.clamp(max=0)).reshape(b, -1).sum(dim=1, keepdim=True)}

    monkeypatch.setattr(rows, "RULES", dict(rows.RULES))  # registered for this test only
    privacy.register_rule(nn.PReLU)(prelu)
    torch.manual_seed(0)
    model = WithPReLU()
    assert privacy.unsupported(model) == []
    g = torch.Generator().manual_seed(5)
    batch = (torch.randn(3, 1, 5, 5, generator=g), torch.tensor([0, 1, 2]), torch.randn(3, 2, 1, 5, 5, generator=g))
    fast, _ = privacy.per_example_grads(model, _torch_batch_loss, batch, method="rows")
    ref, _ = privacy.per_example_grads_loop(model, _torch_loss, batch)
    for name in ref:
        assert _rel(fast[name], ref[name]) < 1e-5, name
