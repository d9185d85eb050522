"""Preconditionings, noise draws, the noise-multiplicity loss, and model.pt."""

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from dpdm.artifacts import DPDMError, save_torch
from dpdm.diffusion import (EDMPrecond, VEPrecond, VPPrecond, VPredPrecond, apply_label_dropout, batch_loss,
                            build_precond, draw_noise, example_loss, load_model, save_model)

MODEL = {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}
DIFFUSION = {"sigma_data": math.sqrt(1 / 3), "p_mean": -1.2, "p_std": 1.2, "logsnr_min": -9.0, "logsnr_max": 13.0,
             "vp_beta_d": 19.9, "vp_beta_min": 0.1, "vp_eps_t": 1e-5, "ve_sigma_min": 0.02, "ve_sigma_max": 100.0}
PRECONDS = ["edm", "v", "vp", "ve"]


def settings_for(kind):
    return {"model": dict(MODEL), "diffusion": {**DIFFUSION, "precond": kind}}


def make(kind, num_classes=3, randomize=True):
    torch.manual_seed(0)
    p = build_precond(settings_for(kind), 8, 1, num_classes)
    if randomize:
        with torch.no_grad():
            for q in p.parameters():
                q.copy_(torch.randn_like(q) * 0.1)
    return p


def test_build_precond_kinds():
    assert isinstance(make("edm"), EDMPrecond)
    assert isinstance(make("v"), VPredPrecond)
    assert isinstance(make("vp"), VPPrecond)
    assert isinstance(make("ve"), VEPrecond)
    with pytest.raises(DPDMError, match="diffusion.precond"):
        build_precond(settings_for("nope"), 8, 1, 3)


@pytest.mark.parametrize("kind", PRECONDS)
def test_scalings_at_small_sigma_are_identity(kind):
    p = make(kind)
    sigma = torch.tensor([1e-4]).reshape(-1, 1, 1, 1)
    c_skip, c_out, _, _ = p.scalings(sigma)
    assert abs(float(c_skip) - 1) < 1e-6 and abs(float(c_out)) < 1e-3
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    d = p(x, 1e-4, torch.tensor([0, 1, 2, 3]))
    assert (d - x).abs().max() < 1e-2


@pytest.mark.parametrize("kind", PRECONDS)
def test_loss_weight_times_c_out_squared_is_one(kind):
    # Every parameterisation reduces to unit-weight regression of F on its target (EDM Eq. 8).
    p = make(kind)
    sigma = torch.logspace(-2.5, 1.8, 20).reshape(-1, 1, 1, 1)
    _, c_out, _, _ = p.scalings(sigma)
    torch.testing.assert_close(p.loss_weight(sigma) * c_out ** 2, torch.ones_like(sigma))


@pytest.mark.parametrize("kind", PRECONDS)
def test_sigma_distribution(kind):
    p = make(kind)
    g = torch.Generator().manual_seed(0)
    s = p.sample_sigma(20000, g)
    assert s.shape == (20000,) and (s > 0).all()
    if kind == "edm":
        assert abs(s.log().mean() + 1.2) < 0.05 and abs(s.log().std() - 1.2) < 0.05
    if kind == "v":  # t uniform on [t(logsnr_max), t(logsnr_min)] with sigma = tan(pi t / 2)
        t = torch.atan(s) * 2 / math.pi
        assert s.min() >= math.exp(-13 / 2) * 0.999 and s.max() <= math.exp(9 / 2) * 1.001
        assert abs(t.mean() - (p.t_min + p.t_max) / 2) < 0.01
    if kind == "ve":
        assert s.min() >= 0.02 * 0.999 and s.max() <= 100 * 1.001
        assert abs(s.log().mean() - (math.log(0.02) + math.log(100)) / 2) < 0.05
    if kind == "vp":
        assert s.min() >= p.sigma_min * 0.999 and s.max() <= p.sigma_max * 1.001


@pytest.mark.parametrize("kind", PRECONDS)
def test_initial_loss_scale(kind):
    # Output layers start near zero, so the loss is E|F_target|^2: exactly 1 for VP / VE
    # (target = noise), ~1 for EDM on data of std sigma_data, in [var(y), 1] for v.
    p = make(kind, randomize=False)
    g = torch.Generator().manual_seed(0)
    y = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1  # std sqrt(1/3) = sigma_data
    draw = draw_noise(p, 64, 8, (1, 8, 8), 3, 0.1, g)
    loss = batch_loss(p, y, torch.randint(3, [64], generator=g), draw).mean().item()
    if kind in ("vp", "ve", "edm"):
        assert 0.9 < loss < 1.1, loss
    else:
        assert 1 / 3 * 0.9 < loss < 1.0, loss


def test_label_dropout_once_per_example_with_the_right_rate():
    p = make("edm")
    g = torch.Generator().manual_seed(0)
    draw = draw_noise(p, 40000, 2, (1, 2, 2), 10, 0.1, g)
    assert draw.sigma.shape == (40000, 2) and draw.noise.shape == (40000, 2, 1, 2, 2)
    assert draw.drop.shape == (40000,) and draw.drop.dtype == torch.bool
    rate = draw.drop.float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 40000)
    # The drop flag is per example: all K rows of batch_loss share one label.
    labels = torch.arange(6) % 3
    drop = torch.tensor([True, False, True, False, False, True])
    torch.testing.assert_close(apply_label_dropout(labels, drop, 3), torch.tensor([3, 1, 3, 0, 1, 3]))
    assert apply_label_dropout(None, drop, 3) is None
    # Unconditional: never dropped; zero rate: never dropped.
    assert not draw_noise(p, 1000, 1, (1, 2, 2), 0, 0.5, g).drop.any()
    assert not draw_noise(p, 1000, 1, (1, 2, 2), 10, 0.0, g).drop.any()


def test_draw_noise_is_reproducible():
    p = make("v")
    a = draw_noise(p, 4, 3, (1, 8, 8), 3, 0.5, torch.Generator().manual_seed(7))
    b = draw_noise(p, 4, 3, (1, 8, 8), 3, 0.5, torch.Generator().manual_seed(7))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("kind,num_classes", [("edm", 3), ("v", 3), ("vp", 0), ("ve", 3)])
def test_example_loss_vmap_equals_batch_loss_and_loop(kind, num_classes):
    p = make(kind, num_classes)
    B, K = 4, 3
    g = torch.Generator().manual_seed(1)
    y = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(3, [B], generator=g) if num_classes else None
    draw = draw_noise(p, B, K, (1, 8, 8), num_classes, 0.5, g)
    dropped = apply_label_dropout(labels, draw.drop, num_classes)
    ref = batch_loss(p, y, labels, draw)
    assert ref.shape == (B,)
    loop = torch.stack([example_loss(p, y[b], None if dropped is None else dropped[b], draw.sigma[b], draw.noise[b])
                        for b in range(B)])
    torch.testing.assert_close(loop, ref, rtol=1e-5, atol=1e-6)

    # The privacy helper's pattern: functional_call with the parameters swapped in, vmap over examples.
    wrapped = _Wrap(p)
    params = {k: v.detach() for k, v in wrapped.named_parameters()}

    def one(prm, yb, lb, sb, nb):
        return functional_call(wrapped, prm, (yb, lb, sb, nb))

    if dropped is None:
        vm = vmap(lambda yb, sb, nb: one(params, yb, None, sb, nb))(y, draw.sigma, draw.noise)
    else:
        vm = vmap(one, in_dims=(None, 0, 0, 0, 0))(params, y, dropped, draw.sigma, draw.noise)
    torch.testing.assert_close(vm, ref, rtol=1e-5, atol=1e-6)

    # Per-example gradients: vmap(grad) equals one autograd pass per example.
    if dropped is not None:
        grads = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(params, y, dropped, draw.sigma, draw.noise)
        for b in [0, B - 1]:
            p.zero_grad()
            example_loss(p, y[b], dropped[b], draw.sigma[b], draw.noise[b]).backward()
            for name, q in p.named_parameters():
                torch.testing.assert_close(grads["precond." + name][b], q.grad, rtol=1e-4, atol=1e-6)


class _Wrap(torch.nn.Module):
    """example_loss as a module whose parameters are the precond's (for functional_call)."""

    def __init__(self, precond):
        super().__init__()
        self.precond = precond

    def forward(self, y, label, sigma, noise):
        return example_loss(self.precond, y, label, sigma, noise)


@pytest.mark.parametrize("kind", PRECONDS)
def test_training_reduces_the_loss(kind):
    torch.manual_seed(0)
    p = build_precond(settings_for(kind), 8, 1, 3)
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float() * 2 - 1
    labels = torch.randint(3, [4], generator=g)
    draw = draw_noise(p, 4, 4, (1, 8, 8), 3, 0.1, g)  # a fixed draw: the loss is a fixed function
    opt = torch.optim.Adam(p.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = batch_loss(p, y, labels, draw).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def spec():
    return {"resolution": 8, "channels": 1, "num_classes": 3}


def test_save_and_load_model(tmp_path):
    p, ema = make("v"), make("v")
    with torch.no_grad():
        for q in ema.parameters():
            q.add_(1.0)
    path = tmp_path / "model.pt"
    save_model(path, p, ema, settings_for("v"), spec(), step=12)
    loaded, settings, meta = load_model(path, "cpu")
    assert isinstance(loaded, VPredPrecond) and not loaded.training
    assert settings == settings_for("v") and meta["step"] == 12 and meta["spec"] == spec()
    for (k, a), b in zip(ema.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(not q.requires_grad for q in loaded.parameters())
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_model_rejects_wrong_format(tmp_path):
    bad = tmp_path / "bad.pt"
    save_torch(bad, {"format": "something-else"})
    with pytest.raises(DPDMError, match="format"):
        load_model(bad)
    with pytest.raises(DPDMError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
