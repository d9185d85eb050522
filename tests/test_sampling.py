"""Samplers (checked against an analytic denoiser), guidance, and generate() end to end."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dpdm.artifacts import DPDMError
from dpdm.diffusion import build_precond, save_model
from dpdm.sampling import (GuidedDenoiser, ddim_sampler, edm_sampler, generate, resolve_sampler, run_sampler,
                           sigma_steps, stochastic_ddim_sampler)


# ----------------------------------------------------------------------------
# An exact denoiser: data ~ N(mu_c, s^2) per pixel for class c gives
# D(x; sigma) = E[y | x] = (s^2 x + sigma^2 mu_c) / (s^2 + sigma^2).


class GaussianDenoiser:
    """Quacks like a Precond: precond(x, sigma, class_labels); num_classes; sigma range."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, means, s, null_mean=0.0):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.num_classes = len(self.means)
        self.s = s
        self.null_mean = null_mean
        self.calls = 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if class_labels is None:
            mu = torch.full([x.shape[0]], float(self.means[0]), dtype=torch.float64)
        else:
            table = torch.cat([self.means, torch.tensor([self.null_mean], dtype=torch.float64)])
            mu = table[class_labels]
        mu = mu.reshape(-1, *([1] * (x.ndim - 1)))
        return (self.s ** 2 * x + sigma ** 2 * mu) / (self.s ** 2 + sigma ** 2)


MU, S = 0.3, 0.5


def run(sampler, n=20000, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn([n, 1, 2, 2], generator=g, dtype=torch.float64)
    den = GaussianDenoiser([MU], S)
    return sampler(lambda x, s: den(x, s), latents, sigma_steps(kw.pop("steps", 50)), generator=g, **kw)


@pytest.mark.parametrize("sampler,kw,tol", [
    (ddim_sampler, {"steps": 400}, 0.02),  # Euler is first order: 50 steps shrink the std by 5.6%
    (stochastic_ddim_sampler, {"steps": 300}, 0.04),
    (edm_sampler, {"steps": 80}, 0.02),
    (edm_sampler, {"steps": 100, "s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0}, 0.03),
])
def test_samplers_recover_a_gaussian(sampler, kw, tol):
    x = run(sampler, **kw)
    assert abs(x.mean().item() - MU) < tol * 2, x.mean()
    assert abs(x.std().item() / S - 1) < tol, x.std()


def test_deterministic_samplers_converge_to_the_exact_ode_with_their_order():
    # For Gaussian data the probability-flow ODE maps x(sigma_max) to
    # mu + (x - mu) sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma_max^2); then the final
    # step returns D(x; sigma_min). Heun (edm, no churn) is 2nd order, Euler (ddim) 1st.
    g = torch.Generator().manual_seed(0)
    latents = torch.randn([100, 1, 2, 2], generator=g, dtype=torch.float64)
    den = GaussianDenoiser([MU], S)
    x_min = MU + (latents * 80 - MU) * math.sqrt(S ** 2 + 0.002 ** 2) / math.sqrt(S ** 2 + 80 ** 2)
    exact = den(x_min, 0.002)

    def err(sampler, n):
        return (sampler(lambda x, s: den(x, s), latents, sigma_steps(n)) - exact).abs().max().item()

    heun = [err(edm_sampler, n) for n in (64, 128)]
    euler = [err(ddim_sampler, n) for n in (64, 128)]
    assert heun[1] < 2e-3 and 3.5 < heun[0] / heun[1] < 4.5, heun
    assert euler[1] < 5e-2 and 1.8 < euler[0] / euler[1] < 2.2, euler


def test_stochastic_samplers_use_the_generator():
    a = run(stochastic_ddim_sampler, n=10, seed=1, steps=10)
    b = run(stochastic_ddim_sampler, n=10, seed=1, steps=10)
    assert torch.equal(a, b)
    den = GaussianDenoiser([MU], S)
    latents = torch.zeros([10, 1, 2, 2], dtype=torch.float64)
    c = stochastic_ddim_sampler(lambda x, s: den(x, s), latents, sigma_steps(10), torch.Generator().manual_seed(2))
    d = stochastic_ddim_sampler(lambda x, s: den(x, s), latents, sigma_steps(10), torch.Generator().manual_seed(3))
    assert not torch.equal(c, d)


def test_sigma_grid():
    s = sigma_steps(18, 0.002, 80.0, 7.0)
    assert s.shape == (19,) and s.dtype == torch.float64
    assert math.isclose(s[0].item(), 80.0) and math.isclose(s[-2].item(), 0.002) and s[-1].item() == 0
    assert (s[1:] < s[:-1]).all()
    # EDM Eq. 5 at i = 1
    i1 = (80 ** (1 / 7) + 1 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(s[1].item(), i1, rel_tol=1e-12)
    assert sigma_steps(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    with pytest.raises(DPDMError):
        sigma_steps(0)


def test_sampler_range_is_clamped_to_the_precond():
    ve = build_precond({"model": {"channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []},
                        "diffusion": {"precond": "ve"}}, 4, 1, 0)
    opts = resolve_sampler({"kind": "ddim"}, ve)
    assert opts["sigma_min"] == 0.02 and opts["sigma_max"] == 80.0 and opts["steps"] == 50
    with pytest.raises(DPDMError, match="kind"):
        resolve_sampler({"kind": "heun"})


def test_guidance():
    den = GaussianDenoiser([-0.5, 0.5], S, null_mean=0.0)
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    # w = 0 is the conditional denoiser, one forward.
    den.calls = 0
    torch.testing.assert_close(GuidedDenoiser(den, labels, 0.0)(x, 1.3), den(x, 1.3, labels))
    assert den.calls == 2
    # w > 0: (1 + w) D(x|c) - w D(x|null), from ONE batched call of 2N rows.
    den.calls = 0
    guided = GuidedDenoiser(den, labels, 2.0)(x, 1.3)
    assert den.calls == 1
    expected = 3.0 * den(x, 1.3, labels) - 2.0 * den(x, 1.3, torch.full_like(labels, 2))
    torch.testing.assert_close(guided, expected)


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_guided_sampling_moves_class_means(w):
    # Guidance with Gaussians is exact: samples of class c have mean mu_c + w (mu_c - mu_null).
    den = GaussianDenoiser([-0.5, 0.5], S, null_mean=0.1)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4000) % 2
    latents = torch.randn([4000, 1, 2, 2], generator=g, dtype=torch.float64)
    x = run_sampler(den, latents, labels, {"kind": "edm", "steps": 30, "guidance": w}, generator=g)
    for c, mu in enumerate([-0.5, 0.5]):
        target = mu + w * (mu - 0.1)
        assert abs(x[labels == c].mean().item() - target) < 0.03
        assert abs(x[labels == c].std().item() / S - 1) < 0.05


def test_uint8_conversion_used_by_generate():
    from dpdm.data import to_uint8

    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 0.999], dtype=torch.float64).reshape(1, 1, 2, 3)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3, 1)
    assert out.ravel().tolist() == [0, 0, 128, 255, 255, 255]


# ----------------------------------------------------------------------------
# generate(): model.pt -> npz + grid.

MODEL = {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def cell_settings(num_classes=3, **sampler):
    return {
        "model": MODEL,
        "diffusion": {"precond": "edm"},
        "device": "cpu",
        "cell": {"dataset": "digits", "eps": 10.0, "eps_tag": "eps10", "seed": 0},
        "sample": {"num_samples": 6, "batch_size": 4, "grid_size": 2},
        "samplers": {
            "fast": {"kind": "ddim", "steps": 3},
            "churn": {"kind": "edm", "steps": 3, "s_churn": 5.0, "guidance": 1.0},
            "sdd": {"kind": "stochastic_ddim", "steps": 3, "labels": 1},
            **({"custom": sampler} if sampler else {}),
        },
    }


def write_model(tmp_path, num_classes=3, seed=0, name="model.pt"):
    torch.manual_seed(0)
    settings = cell_settings(num_classes)
    settings["cell"]["seed"] = seed
    p = build_precond(settings, 8, 1, num_classes)
    with torch.no_grad():  # make the output depend on the weights
        for q in p.parameters():
            q.copy_(torch.randn_like(q) * 0.1)
    path = tmp_path / name
    save_model(path, p, p, settings, {"resolution": 8, "channels": 1, "num_classes": num_classes}, step=1)
    return path, settings


def read(path):
    with np.load(path) as f:
        return f["images"], f["labels"]


def test_generate_end_to_end(tmp_path):
    model, settings = write_model(tmp_path)
    out, grid = tmp_path / "samples_fast.npz", tmp_path / "grid_fast.png"
    generate(settings, model, "fast", out, grid_path=grid)
    images, labels = read(out)
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert labels.dtype == np.int64 and labels.shape == (6,) and labels.min() >= 0 and labels.max() < 3
    with Image.open(grid) as im:  # 2 x 2 images of 8 px with 1 px grey borders
        assert im.size == (19, 19) and im.mode == "L"
        assert np.asarray(im)[0].tolist() == [128] * 19
    # Deterministic: same cell seed and sampler -> identical file contents.
    out2 = tmp_path / "again.npz"
    generate(settings, model, "fast", out2)
    np.testing.assert_array_equal(read(out2)[0], images)
    np.testing.assert_array_equal(read(out2)[1], labels)
    # Another seed's cell (same weights) draws other samples.
    model1, other = write_model(tmp_path, seed=1, name="model_seed1.pt")
    generate(other, model1, "fast", tmp_path / "seed1.npz")
    assert not np.array_equal(read(tmp_path / "seed1.npz")[0], images)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("key,value", [("dataset", "mnist"), ("eps", 1.0), ("seed", 1), ("variant", "K1")])
def test_generate_refuses_another_cells_model(tmp_path, key, value):
    model, settings = write_model(tmp_path)
    wanted = {**settings, "cell": {**settings["cell"], key: value}}
    with pytest.raises(DPDMError, match=f"another cell .*{key}"):
        generate(wanted, model, "fast", tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_generate_stochastic_guided_and_fixed_class(tmp_path):
    model, settings = write_model(tmp_path)
    generate(settings, model, "churn", tmp_path / "a.npz", num_samples=3, batch_size=2)
    generate(settings, model, "churn", tmp_path / "b.npz", num_samples=3, batch_size=2)
    np.testing.assert_array_equal(read(tmp_path / "a.npz")[0], read(tmp_path / "b.npz")[0])
    generate(settings, model, "sdd", tmp_path / "c.npz", num_samples=3)
    assert read(tmp_path / "c.npz")[1].tolist() == [1, 1, 1]


def test_generate_unconditional(tmp_path):
    model, settings = write_model(tmp_path, num_classes=0)
    generate(settings, model, "fast", tmp_path / "u.npz", grid_path=tmp_path / "u.png", num_samples=3)
    images, labels = read(tmp_path / "u.npz")
    assert images.shape == (3, 8, 8, 1) and labels.tolist() == [-1, -1, -1]
    with pytest.raises(DPDMError, match="unconditional"):
        generate(settings, model, "sdd", tmp_path / "x.npz", num_samples=1)


def test_generate_errors(tmp_path):
    model, settings = write_model(tmp_path)
    with pytest.raises(DPDMError, match="unknown sampler 'nope'.*churn, fast, sdd"):
        generate(settings, model, "nope", tmp_path / "x.npz")
    bad = cell_settings(kind="ddim", steps=2, labels=7)
    with pytest.raises(DPDMError, match="labels"):
        generate(bad, model, "custom", tmp_path / "x.npz", num_samples=1)
    assert not (tmp_path / "x.npz").exists()


def test_grid_shows_one_row_per_class():
    from dpdm.sampling import grid_order

    labels = np.array([2, 0, 1, 0, 2, 2, 1, 0])
    assert grid_order(labels, 2).tolist() == [1, 3, 2, 6]  # rows: class 0, class 1 (at most grid_size rows)
    assert grid_order(labels, 3).tolist() == [1, 3, 7, 2, 6, -1, 0, 4, 5]
    assert grid_order(np.array([1, 0]), 3).tolist() == [1, -1, -1, 0, -1, -1]  # short classes leave gaps
    assert grid_order(np.full(20, -1), 3).tolist() == list(range(9))  # unconditional: the first 9
