"""The DP fast path against a naive per-example loop and against the benchmark's
hook-based reference (the same clipped, summed gradient), and the benchmark's quick mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dpdm import bench, diffusion, privacy
from helpers import REPO  # tests/helpers.py



def _clipped_sum_loop(model, batch):
    """The obviously right way: one autograd pass per example, then clip to C = the
    median norm (so some examples are clipped and some are not) and sum."""
    grads, _ = privacy.per_example_grads_loop(model, diffusion.example_loss, batch)
    norms = privacy.per_example_norms(grads)
    clip = float(norms.median())
    factor = privacy.clip_factors(norms, clip)
    return {name: torch.tensordot(factor, g, dims=1) for name, g in grads.items()}, norms, clip


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("k", [1, 4])
def test_fast_path_equals_naive_loop_clipped_sum(k):
    """DPSGD's step without noise (sigma = 0) is the naive loop's clipped sum / (q N), for
    the DDPM++ network with class labels and label dropout; chunking and micro-batching
    do not change it."""
    setup = bench.Setup("tiny", 6, k, torch.device("cpu"), physical_batch_size=4, grad_chunk_size=3)
    setup.draw = setup.draw._replace(drop=torch.tensor([True, False, False, True, False, False]))
    setup.dropped = diffusion.apply_label_dropout(setup.labels, setup.draw.drop, setup.classes)
    batch = (setup.y, setup.dropped, setup.draw.sigma, setup.draw.noise)
    ref, norms, clip = _clipped_sum_loop(setup.precond, batch)
    assert (norms > clip).any() and (norms < clip).any(), norms
    dp = privacy.DPSGD(diffusion.example_loss, noise_multiplier=0.0, max_grad_norm=clip, num_examples=60,
                       sample_rate=0.1, physical_batch_size=4, grad_chunk_size=3)
    dp.private_grad(setup.precond, batch)
    for name, p in setup.precond.named_parameters():
        assert _rel(p.grad * dp.expected_batch_size, ref[name]) < 1e-5, name


@pytest.mark.parametrize("physical", [None, 2])
def test_hook_reference_computes_the_same_update(physical):
    """The benchmark compares equal work: Opacus hooks on B x K rows, averaged per
    example, give the fast path's clipped sum (noise off), micro-batched or not."""
    setup = bench.Setup("tiny", 5, 3, torch.device("cpu"), physical_batch_size=physical)
    setup.dp.noise_multiplier = 0.0
    batch = (setup.y, setup.dropped, setup.draw.sigma, setup.draw.noise)
    setup.dp.private_grad(setup.precond, batch)
    fast = {n: p.grad.clone() for n, p in setup.precond.named_parameters()}
    setup.hooks_grad()
    _, hooked_model = setup._hooked_module()
    for name, p in hooked_model.named_parameters():
        assert _rel(p.grad, fast[name]) < 1e-5, name


def test_quick_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "dpdm", "bench", "--quick", "--repeats", "1", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("nonprivate_ex_per_s", "dp_ex_per_s", "hooks_ex_per_s", "dp_peak_mem_mb", "sample_img_per_s",
                "forward_img_per_s", "fid_img_per_s", "device", "torch_version", "B", "K", "model_params"):
        assert key in res, key
    assert res["B"] == 8 and res["K"] == 2 and res["dp_ex_per_s"] > 0 and res["hooks_ex_per_s"] > 0
    assert res["dp_method"] == "rows" and res["dp_vmap_ex_per_s"] > 0  # training's fast path, and vmap
    assert res["dp_peak_mem_mb"] > 0 and res["hooks_peak_mem_mb"] > 0
    assert res["dp_time_ratio"] == pytest.approx(res["nonprivate_ex_per_s"] / res["dp_ex_per_s"])
    assert "time ratio DP / non-private" in p.stdout
    assert res["dp_page_faults_per_step"] >= 0 and "hooks_page_faults_per_step" in res
    assert "page faults per step" in p.stdout


def test_methods_option_keeps_the_floor_and_names_bad_methods():
    import argparse

    assert bench._method_list("hooks") == ["nonprivate", "dp", "hooks"]  # the ratios need nonprivate and dp
    assert bench._method_list("dp_vmap,dp") == ["nonprivate", "dp", "dp_vmap"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown method.*'ghost'.*choose from"):
        bench._method_list("dp,ghost")
