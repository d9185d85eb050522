"""DP-SGD mechanism tests: each one fails if the mechanism (not just a shape) is wrong.

A small stand-in denoiser (conv + GroupNorm + class embedding, K noisy copies per
example inside the loss) exercises the generic code; the exactness of the torch.func
per-example gradients is also checked on a real (tiny) DDPM++ through dpdm.diffusion.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpdm import privacy
from dpdm.artifacts import DPDMError
from helpers import subprocess_env  # tests/helpers.py
from standin import standin_batch, standin_loss, standin_model  # tests/standin.py



def _zero_loss(model, x):
    """A loss whose gradient is exactly zero (isolates the noise)."""
    return (model(x) * 0.0).sum()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _manual_clipped_sum(model, loss_fn, batch, clip):
    """Reference: loop gradients, clip each by hand, sum."""
    grads, _ = privacy.per_example_grads_loop(model, loss_fn, batch)
    names = list(grads)
    n = grads[names[0]].shape[0]
    total = {k: torch.zeros_like(v[0]) for k, v in grads.items()}
    for i in range(n):
        norm = math.sqrt(sum(float(grads[k][i].double().pow(2).sum()) for k in names))
        f = min(1.0, clip / (norm + 1e-6))
        for k in names:
            total[k] += f * grads[k][i]
    return total


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


# ----------------------------------------------------------------------------
# Per-example gradients.


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("chunk", [None, 3])
def test_vmap_per_example_grads_equal_loop(k, chunk):
    model = standin_model()
    batch = standin_batch(7, k=k)
    g_vmap, l_vmap = privacy.per_example_grads(model, standin_loss, batch, chunk_size=chunk)
    g_loop, l_loop = privacy.per_example_grads_loop(model, standin_loss, batch)
    assert set(g_vmap) == {n for n, _ in model.named_parameters()}
    for name in g_loop:
        assert g_vmap[name].shape == (7,) + tuple(dict(model.named_parameters())[name].shape)
        assert _rel_err(g_vmap[name], g_loop[name]) < 1e-5, name
    assert torch.allclose(l_vmap, l_loop, rtol=1e-5)
    # and per example, not just in total: every example differs from the others
    flat = torch.cat([g.reshape(7, -1) for g in g_vmap.values()], 1)
    assert torch.cdist(flat, flat).add(torch.eye(7)).min() > 0


def test_per_example_grad_is_gradient_of_that_example_alone():
    """Example i's gradient must not depend on the other examples in the batch."""
    model = standin_model()
    batch = standin_batch(5, k=3)
    g_all, _ = privacy.per_example_grads(model, standin_loss, batch)
    single = tuple(t[2:3] for t in batch)
    g_one, _ = privacy.per_example_grads(model, standin_loss, single)
    for name in g_all:
        assert _rel_err(g_all[name][2], g_one[name][0]) < 1e-5


def test_vmap_matches_loop_on_ddpmpp():
    """Exactness on the real network: K in {1, 4}, class labels, label dropout."""
    diffusion = pytest.importorskip("dpdm.diffusion")
    settings = {
        "model": {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0},
        "diffusion": {"precond": "edm", "sigma_data": 0.5773502691896258, "p_mean": -1.2, "p_std": 1.2,
                      "logsnr_min": -9.0, "logsnr_max": 13.0, "vp_beta_d": 19.9, "vp_beta_min": 0.1,
                      "vp_eps_t": 1e-5, "ve_sigma_min": 0.02, "ve_sigma_max": 100.0},
    }
    torch.manual_seed(0)
    precond = diffusion.build_precond(settings, 8, 1, 10)
    g = torch.Generator().manual_seed(1)
    y = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.tensor([0, 3, 9, 5])
    for k in (1, 4):
        draw = diffusion.draw_noise(precond, 4, k, (1, 8, 8), 10, 0.5, g)
        lab = diffusion.apply_label_dropout(labels, draw.drop, 10)
        batch = (y, lab, draw.sigma, draw.noise)
        g_vmap, l_vmap = privacy.per_example_grads(precond, diffusion.example_loss, batch, chunk_size=3)
        g_loop, l_loop = privacy.per_example_grads_loop(precond, diffusion.example_loss, batch)
        for name in g_loop:
            assert _rel_err(g_vmap[name], g_loop[name]) < 1e-5, (k, name)
        assert torch.allclose(l_vmap, l_loop, rtol=1e-5)
        # the per-example losses agree with the batched loss of the same draws
        assert torch.allclose(l_loop, diffusion.batch_loss(precond, y, lab, draw).detach(), rtol=1e-4)
    # unconditional network (labels None) and an empty Poisson batch through the full step
    torch.manual_seed(0)
    uncond = diffusion.build_precond(settings, 8, 1, 0)
    draw = diffusion.draw_noise(uncond, 3, 2, (1, 8, 8), 0, 0.0, g)
    batch = (y[:3], None, draw.sigma, draw.noise)
    g_vmap, _ = privacy.per_example_grads(uncond, diffusion.example_loss, batch)
    g_loop, _ = privacy.per_example_grads_loop(uncond, diffusion.example_loss, batch)
    for name in g_loop:
        assert _rel_err(g_vmap[name], g_loop[name]) < 1e-5, name
    dp = privacy.DPSGD(diffusion.example_loss, noise_multiplier=1.0, max_grad_norm=1.0, num_examples=100,
                       sample_rate=0.01)
    empty = diffusion.draw_noise(precond, 0, 2, (1, 8, 8), 10, 0.1, g)
    stats = dp.step(precond, (y[:0], labels[:0], empty.sigma, empty.noise))
    assert stats["batch_size"] == 0 and dp.steps == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in precond.parameters())


# ----------------------------------------------------------------------------
# Clipping.


def test_clipped_norms_at_most_c_and_small_grads_untouched():
    model = standin_model()
    batch = standin_batch(8, k=2, scale=30.0)  # large gradients: most get clipped
    grads, _ = privacy.per_example_grads(model, standin_loss, batch)
    norms = privacy.per_example_norms(grads)
    # the norm is the total L2 norm over ALL parameters
    manual = torch.stack([torch.cat([g[i].reshape(-1) for g in grads.values()]).norm() for i in range(8)])
    assert torch.allclose(norms, manual, rtol=1e-5)
    for clip in (1e-3, float(norms.median()), 1e6):
        f = privacy.clip_factors(norms, clip)
        clipped = norms * f
        assert (clipped <= clip * (1 + 1e-6)).all()
        big = norms > clip
        assert torch.allclose(clipped[big], torch.full_like(clipped[big], clip), rtol=1e-4)  # scaled to C
        assert torch.equal(f[~big], torch.ones_like(f[~big]))  # below C: unchanged
    # and the sum computed in chunks equals the hand-clipped reference
    clip = float(norms.median())
    sums, n2, _ = privacy.clipped_grad_sum(model, standin_loss, batch, clip, chunk_size=3)
    ref = _manual_clipped_sum(model, standin_loss, batch, clip)
    for name in ref:
        assert _rel_err(sums[name], ref[name]) < 1e-5
    assert torch.allclose(n2, norms, rtol=1e-5)


def test_single_example_influence_bounded_by_c():
    """Neighbouring batches (one example added) change the clipped sum by at most C."""
    model = standin_model()
    batch = standin_batch(6, k=2, scale=1.0)
    outlier = standin_batch(1, k=2, seed=9, scale=1e4)  # an enormous-gradient example
    clip = 0.5
    for extra in (outlier, tuple(t[:1] for t in standin_batch(1, k=2, seed=3))):
        s_without, _, _ = privacy.clipped_grad_sum(model, standin_loss, batch, clip)
        with_it = tuple(torch.cat([a, b]) for a, b in zip(batch, extra))
        s_with, _, _ = privacy.clipped_grad_sum(model, standin_loss, with_it, clip)
        diff = torch.cat([(s_with[n] - s_without[n]).reshape(-1) for n in s_with]).norm()
        assert diff <= clip * (1 + 1e-4)
    assert diff > 0


def test_non_finite_example_contributes_zero():
    model = standin_model()
    batch = standin_batch(5, k=2)
    bad = tuple(t.clone() for t in batch)
    bad[0][2] = float("inf")  # example 2's loss and gradient are not finite
    s_bad, norms, _ = privacy.clipped_grad_sum(model, standin_loss, bad, 0.5, chunk_size=2)
    keep = torch.tensor([0, 1, 3, 4])
    s_ref, _, _ = privacy.clipped_grad_sum(model, standin_loss, tuple(t[keep] for t in batch), 0.5)
    assert not torch.isfinite(norms[2])
    for name in s_ref:
        assert torch.isfinite(s_bad[name]).all()
        assert _rel_err(s_bad[name], s_ref[name]) < 1e-5


# ----------------------------------------------------------------------------
# The step.


def _dp(sigma=0.0, clip=1.0, n=100, q=0.1, **kw):
    return privacy.DPSGD(standin_loss, noise_multiplier=sigma, max_grad_norm=clip, num_examples=n,
                         sample_rate=q, **kw)


def test_sigma0_update_is_clipped_sum_over_expected_batch():
    model = standin_model()
    batch = standin_batch(13, k=3, scale=5.0)
    clip = 0.3
    dp = _dp(0.0, clip=clip, n=100, q=0.1)  # expected batch 10, realised 13
    stats = dp.step(model, batch)
    ref = _manual_clipped_sum(model, standin_loss, batch, clip)
    for name, p in model.named_parameters():
        assert _rel_err(p.grad, ref[name] / 10.0) < 1e-5
        # NOT the mean over the realised batch
        assert _rel_err(p.grad, ref[name] / 13.0) > 0.2
    assert stats["batch_size"] == 13 and stats["step"] == 1
    assert 0 < stats["frac_clipped"] <= 1
    assert dp.steps == 1 and dp.history == [[0.0, 0.1, 1]]


def test_noise_std_is_sigma_c_over_expected_batch():
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 100)  # 10,100 noise coordinates per step
    sigma, clip, n, q = 2.0, 3.0, 1000, 0.05
    dp = privacy.DPSGD(_zero_loss, noise_multiplier=sigma, max_grad_norm=clip, num_examples=n, sample_rate=q)
    x = torch.randn(40, 100)
    draws = []
    for i in range(20):
        batch = (x[: (i % 3) * 20],)  # empty, 20 and 40 examples: zero gradient either way
        stats = dp.step(model, batch)
        assert stats["batch_size"] == (i % 3) * 20
        draws.append(_flat_grad(model).clone())
    noise = torch.stack(draws)
    expected = sigma * clip / (q * n)  # 0.12
    assert abs(float(noise.std()) / expected - 1) < 0.01
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.numel())
    # fresh noise every step (not one draw reused), independent across steps
    corr = torch.corrcoef(noise[:5])
    assert (corr - torch.eye(5)).abs().max() < 0.05
    assert dp.steps == 20 and dp.history == [[sigma, q, 20]]


def test_empty_batch_is_a_noise_only_step():
    model = standin_model()
    before = [p.detach().clone() for p in model.parameters()]
    dp = _dp(1.0, clip=1.0, n=100, q=0.1, optimizer=torch.optim.Adam(model.parameters(), lr=3e-4))
    empty = tuple(t[:0] for t in standin_batch(3))
    stats = dp.step(model, empty)
    assert stats["batch_size"] == 0 and math.isnan(stats["loss"])
    assert dp.steps == 1  # counted by the accountant like any other step
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_microbatching_does_not_change_the_step():
    batch = standin_batch(11, k=2, scale=3.0)
    grads = []
    for phys, chunk in [(None, None), (3, None), (4, 2), (11, 1)]:
        model = standin_model()
        dp = _dp(0.7, clip=0.2, n=100, q=0.1, physical_batch_size=phys, grad_chunk_size=chunk, dp_seed=5)
        stats = dp.step(model, batch)
        grads.append((_flat_grad(model).clone(), stats))
    for g, s in grads[1:]:
        assert torch.allclose(g, grads[0][0], rtol=1e-5, atol=1e-7)
        assert s["batch_size"] == 11 and abs(s["loss"] - grads[0][1]["loss"]) < 1e-5
        assert s["frac_clipped"] == grads[0][1]["frac_clipped"]


def test_poisson_sampling_rate_is_q():
    n, q, draws = 2000, 0.1, 300
    dp = _dp(1.0, n=n, q=q, dp_seed=1)
    counts = torch.zeros(n)
    sizes = []
    for _ in range(draws):
        idx = dp.poisson_batch()
        assert idx.dtype == torch.long and len(set(idx.tolist())) == len(idx)  # no duplicates
        counts[idx] += 1
        sizes.append(len(idx))
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert abs(float(sizes.mean()) - n * q) < 4 * math.sqrt(n * q * (1 - q) / draws)
    assert abs(float(sizes.var()) / (n * q * (1 - q)) - 1) < 0.3  # binomial, not fixed-size
    assert abs(float(counts.mean()) / draws - q) < 0.005
    # every example is eligible (no example is never or always drawn)
    assert counts.min() > 0 and counts.max() < draws
    # empty batches happen at small q and are returned as empty
    small = _dp(1.0, n=10, q=0.05, dp_seed=2)
    sizes = [len(small.poisson_batch()) for _ in range(200)]
    assert 0.4 < sizes.count(0) / 200 < 0.8  # P(empty) = 0.95^10 = 0.60


def test_sampling_reproducible_from_seed_and_state():
    a, b = _dp(1.0, n=500, q=0.2, dp_seed=3), _dp(1.0, n=500, q=0.2, dp_seed=3)
    assert all(torch.equal(a.poisson_batch(), b.poisson_batch()) for _ in range(5))
    c = _dp(1.0, n=500, q=0.2, dp_seed=4)
    assert not torch.equal(a.poisson_batch(), c.poisson_batch())
    # by default the sampling and noise randomness is secret: fresh per instance, flagged
    d, e = _dp(1.0, n=500, q=0.2), _dp(1.0, n=500, q=0.2)
    assert d.secret_randomness and not a.secret_randomness
    assert not torch.equal(d.poisson_batch(), e.poisson_batch())
    assert not torch.equal(d.noise_generator.get_state(), e.noise_generator.get_state())


def test_examples_outside_the_batch_do_not_affect_the_step():
    data = standin_batch(60, k=2, seed=7)

    def run(dataset):
        model = standin_model()
        dp = _dp(1.0, clip=0.5, n=60, q=0.2, dp_seed=11,
                 optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
        picked = []
        for _ in range(3):
            idx = dp.poisson_batch()
            picked.append(idx)
            dp.step(model, tuple(t[idx] for t in dataset))
        return [p.detach().clone() for p in model.parameters()], picked

    ref, picked = run(data)
    used = torch.unique(torch.cat(picked))
    assert 0 < len(used) < 60
    unused = torch.ones(60, dtype=torch.bool)
    unused[used] = False
    scrambled = tuple(t.clone() for t in data)
    scrambled[0][unused] = 1e3 * torch.randn_like(scrambled[0][unused])
    scrambled[1][unused] = 0
    out, picked2 = run(scrambled)
    assert all(torch.equal(a, b) for a, b in zip(picked, picked2))
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    # positive control: changing one SAMPLED example does change the step
    changed = tuple(t.clone() for t in data)
    changed[0][used[0]] += 1.0
    out2, _ = run(changed)
    assert not all(torch.equal(a, b) for a, b in zip(ref, out2))


def test_state_dict_resumes_sampling_and_noise_exactly():
    batch = standin_batch(6)
    m1, m2 = standin_model(), standin_model()
    a = _dp(1.0, n=50, q=0.2, dp_seed=8)
    a.step(m1, batch)
    state = a.state_dict()
    b = _dp(1.0, n=50, q=0.2, dp_seed=999)  # a different seed: the state must override it
    b.load_state_dict(state)
    m2.load_state_dict(m1.state_dict())
    assert torch.equal(a.poisson_batch(), b.poisson_batch())
    a.step(m1, batch)
    b.step(m2, batch)
    assert torch.equal(_flat_grad(m1), _flat_grad(m2))
    assert a.history == b.history == [[1.0, 0.2, 2]]
    with pytest.raises(DPDMError, match="noise_multiplier"):
        _dp(2.0, n=50, q=0.2).load_state_dict(state)


def test_invalid_mechanism_parameters():
    with pytest.raises(DPDMError, match="sampling rate"):
        _dp(1.0, n=100, q=1.5)
    with pytest.raises(DPDMError, match="clip"):
        _dp(1.0, clip=0.0)
    with pytest.raises(DPDMError, match="noise multiplier"):
        _dp(-1.0)


# ----------------------------------------------------------------------------
# Distributed: same batch on every rank, shards, one noise draw in the all_reduced sum.



def test_distributed_two_ranks_match_single_process(tmp_path):
    script = Path(__file__).with_name("dist_worker.py")
    init = f"file://{tmp_path / 'rendezvous'}"
    env = subprocess_env()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", init, str(tmp_path / f"rank{r}.pt")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    import dist_worker

    dist_worker.run(str(tmp_path / "single.pt"))
    single = torch.load(tmp_path / "single.pt")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # every rank holds the identical model after each step
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    # and it is the single-process model: noise added exactly once, sums complete
    for a, b in zip(r0["params"], single["params"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    for s0, s in zip(r0["stats"], single["stats"]):
        assert s0["batch_size"] == s["batch_size"] and abs(s0["loss"] - s["loss"]) < 1e-5
    # only rank 0 draws noise
    assert torch.equal(r0["noise_state"], single["noise_state"])
    assert not torch.equal(r1["noise_state"], single["noise_state"])
    assert r0["history"] == r1["history"] == [[1.5, 0.3, 3]]
    # with secret randomness too, every rank samples the same batches (and a fresh run differs)
    assert all(torch.equal(a, b) for a, b in zip(r0["secret_batches"], r1["secret_batches"]))
    assert not all(torch.equal(a, b) for a, b in zip(r0["secret_batches"], single["secret_batches"]))


# ----------------------------------------------------------------------------
# Accounting and the ledger.


@pytest.mark.parametrize("eps, opacus_sigma, tight_sigma", [(10, 2.488, 2.488), (1, 18.28, 18.14), (0.2, 85.0, 80.6)])
def test_calibration_mnist_paper_setting(eps, opacus_sigma, tight_sigma):
    """MNIST, q = 1/15, 4,500 steps, delta = 1e-5, RDP (NOTES-dpsgd.md)."""
    q, steps, delta = 1 / 15, 4500, 1e-5
    s_opacus = privacy.noise_multiplier_for(eps, delta, q, steps, accountant="rdp", calibration="opacus")
    s_tight = privacy.noise_multiplier_for(eps, delta, q, steps, accountant="rdp", calibration="tight")
    assert s_opacus == pytest.approx(opacus_sigma, rel=2e-3)
    assert s_tight == pytest.approx(tight_sigma, rel=2e-3)
    for s in (s_opacus, s_tight):
        assert privacy.spent_epsilon(s, q, steps, delta, "rdp") <= eps
    # tight is tight: 1 % less noise would overshoot the target
    assert privacy.spent_epsilon(0.99 * s_tight, q, steps, delta, "rdp") > eps
    assert s_tight <= s_opacus * (1 + 2e-3)


def test_check_privacy_params_errors():
    with pytest.raises(DPDMError, match="1/N"):
        privacy.check_privacy_params(1.0, 1e-3, 1000)
    with pytest.raises(DPDMError, match="> 0"):
        privacy.check_privacy_params(0.0, 1e-5, 1000)
    privacy.check_privacy_params(1.0, 1e-5, 1000)
    with pytest.raises(DPDMError, match="calibration"):
        privacy.noise_multiplier_for(1.0, 1e-5, 0.1, 10, calibration="magic")


def test_ledger_recomputes_epsilon_from_steps_taken():
    sigma, q, n, delta = 1.1, 0.05, 2000, 1e-5
    dp = privacy.DPSGD(_zero_loss, noise_multiplier=sigma, max_grad_norm=1.0, num_examples=n, sample_rate=q)
    model = torch.nn.Linear(2, 1)
    for _ in range(30):
        dp.step(model, (torch.zeros(0, 2),))
    ledger = privacy.privacy_ledger(
        history=dp.history, num_examples=n, sample_rate=q, noise_multiplier=sigma, clip=1.0, noise_multiplicity=4,
        delta=delta, target_eps=5.0, calibration="tight", accountant="rdp", planned_steps=100,
        seed=0, provenance={"x": 1}, choices=["lr tuned on the training loss"])
    assert ledger["steps"] == 30 and ledger["planned_steps"] == 100
    assert ledger["epochs"] == pytest.approx(30 * q)
    assert ledger["expected_batch_size"] == pytest.approx(100.0)
    assert ledger["eps_rdp"] == pytest.approx(privacy.spent_epsilon(sigma, q, 30, delta, "rdp"))
    assert ledger["eps_rdp"] < privacy.spent_epsilon(sigma, q, 100, delta, "rdp")  # not the planned run
    assert ledger["eps_prv"] == pytest.approx(privacy.spent_epsilon(sigma, q, 30, delta, "prv"))
    assert 0 < ledger["eps_prv"] < ledger["eps_rdp"]
    assert ledger["within_target"] is (ledger["eps_rdp"] <= 5.0)
    assert ledger["noise_std"] == pytest.approx(1.1)
    for key in ("num_examples", "sample_rate", "noise_multiplier", "clip", "noise_multiplicity", "delta",
                "target_eps", "calibration", "accountants", "seed", "provenance", "history", "neighbouring",
                "covers", "not_covered"):
        assert key in ledger
    # no fingerprint of the private data; what is and is not covered, and choices made on non-covered numbers
    assert not any("sha256" in key for key in ledger)
    assert "N" in ledger["neighbouring"] and "public" in ledger["neighbouring"]
    assert any("model.pt" in c for c in ledger["covers"]) and any("TEST split" in c for c in ledger["covers"])
    assert any("TRAINING split" in c for c in ledger["not_covered"])
    assert any("train_metrics" in c for c in ledger["not_covered"])
    assert ledger["choices_on_private_data"] == ["lr tuned on the training loss"]
    assert ledger["accountants"]["rdp"]["version"]
    assert ledger["dp_randomness"].startswith("secret")
    # the cached RDP path is exactly Opacus' RDPAccountant, also for a multi-segment history
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.1, 0.05, 10), (2.0, 0.05, 5), (1.1, 0.02, 7)]
    assert privacy.epsilon_from_history(acc.history, delta) == acc.get_epsilon(delta=delta)
    with pytest.raises(DPDMError, match="1/N"):
        privacy.privacy_ledger(
            history=dp.history, num_examples=n, sample_rate=q, noise_multiplier=sigma, clip=1.0,
            noise_multiplicity=4, delta=1e-3, target_eps=5.0, calibration="tight", accountant="rdp",
            planned_steps=100, seed=0, provenance=None)


# ----------------------------------------------------------------------------
# The loss's own randomness (noise levels, noise, label dropout) is part of the mechanism.


def _digits_like_precond(num_classes=10):
    from dpdm import diffusion

    settings = {
        "model": {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "diffusion": {"precond": "edm", "sigma_data": 0.5773502691896258, "p_mean": -1.2, "p_std": 1.2},
    }
    torch.manual_seed(0)
    return diffusion.build_precond(settings, 8, 1, num_classes)


def test_adding_one_example_changes_the_clipped_sum_by_at_most_c_now_and_nothing_later():
    """The sensitivity premise of the accountant, on the real training inputs: with the
    secret per-example draws (train.private_batch), adding x* to a batch (even at its
    front) leaves every other example's noise levels, noise and label dropout as they
    were, so the clipped sum moves by x*'s clipped gradient alone (<= C); and a later
    step's batch draws exactly as it would have without x*. (With draws handed out by
    position from one stream, the sums moved by 1.27 C and 6.06.)"""
    from dpdm import diffusion, train

    precond = _digits_like_precond()
    n, clip, k = 40, 0.05, 3  # a small C: every gradient is clipped, so any shifted draw shows
    g = torch.Generator().manual_seed(3)
    images = torch.rand(n + 1, 1, 8, 8, generator=g) * 2 - 1  # index n is x*
    labels = torch.randint(0, 10, (n + 1,), generator=g)

    def world():
        return privacy.DPSGD(diffusion.example_loss, noise_multiplier=1.0, max_grad_norm=clip, num_examples=n + 1,
                             sample_rate=0.2, dp_seed=11, batch_loss_fn=diffusion.batch_example_losses)

    def inputs(dp, idx):
        idx = torch.as_tensor(idx)
        return train.private_batch(dp, precond, images[idx], labels[idx], idx, k, 0.5)

    others = [2, 5, 9, 17, 30, 33]
    with_x, without = world(), world()
    a = inputs(with_x, [n] + others)  # x* first: positional draws would shift every other example
    b = inputs(without, others)
    for t_a, t_b in zip(a[1:], b[1:]):
        assert torch.equal(t_a[1:], t_b), "the other examples' draws changed when x* joined the batch"
    s_a, norms_a, _ = privacy.clipped_grad_sum(precond, diffusion.example_loss, a, clip)
    s_b, norms_b, _ = privacy.clipped_grad_sum(precond, diffusion.example_loss, b, clip)
    assert (norms_a > clip).all()
    diff = torch.cat([(s_a[name] - s_b[name]).reshape(-1) for name in s_a]).norm()
    assert 0 < diff <= clip * (1 + 1e-4)
    # the next step, x* not sampled: identical draws, identical clipped sums
    for dp in (with_x, without):
        dp.accountant.step(dp.noise_multiplier, dp.sample_rate)  # as if the step's update were applied
    later = [1, 5, 6, 22]
    c, d = inputs(with_x, later), inputs(without, later)
    for t_c, t_d in zip(c, d):
        assert torch.equal(t_c, t_d)


def test_per_example_draws_are_secret_unless_seeded_and_survive_resume():
    from dpdm import diffusion

    def dp(seed=None):
        return privacy.DPSGD(diffusion.example_loss, noise_multiplier=1.0, max_grad_norm=1.0, num_examples=10,
                             sample_rate=0.5, dp_seed=seed)

    assert dp().example_key != dp().example_key  # OS entropy, never the public cell seed
    assert dp(5).example_key == dp(5).example_key != dp(6).example_key
    a, b = dp(), dp()
    b.load_state_dict(a.state_dict())  # the key lives in the (private) checkpoint
    assert a.example_key == b.example_key
    idx = torch.tensor([0, 3])
    assert [g.initial_seed() for g in a.example_generators(idx)] == [g.initial_seed() for g in b.example_generators(idx)]
    # keyed by (step, index): another step or another index gives another stream
    seeds = privacy.example_seeds(123, 0, [0, 1])
    assert len(set(seeds + privacy.example_seeds(123, 1, [0]) + privacy.example_seeds(124, 0, [0]))) == 4
    assert all(0 <= s < 2 ** 63 for s in seeds)
