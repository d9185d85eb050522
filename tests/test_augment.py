"""Issue 17: augmentation multiplicity (dpdm/augment.py). The augmentations are what they
say; each example's K augmented, noised copies form ONE per-example gradient (exact: the
rows and vmap methods agree with a plain autograd pass per example) that is clipped as a
unit; an example's augmentations depend only on the secret key, the step and its index."""

from __future__ import annotations

import json

import pytest
import torch

from dpdm import augment, data, diffusion, privacy, train
from dpdm.artifacts import DPDMError
from test_train import tiny_settings  # the tiny cell of the training tests


def test_flip_and_translate_move_the_pixels_they_should():
    y = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    t = 2
    params = torch.tensor([[[0, t, t], [1, t, t], [0, t + 1, t], [0, t, t - 2]]] * 2)  # [B=2, K=4, 3]
    out = augment.apply(y, params, t)
    assert out.shape == (2, 4, 1, 6, 6)
    assert torch.equal(out[:, 0], y)  # dx = dy = t: no shift
    assert torch.equal(out[:, 1], y.flip(-1))  # flipped left-right
    assert torch.equal(out[:, 2, ..., :-1], y[..., 1:])  # one column to the left, the border reflected
    assert torch.equal(out[:, 2, ..., -1], y[..., -2])
    assert torch.equal(out[:, 3, ..., 2:, :], y[..., :-2, :])  # two rows down


def test_the_config_is_checked():
    assert augment.check(None, 32) is None and augment.check({"flip": False, "translate": 0}, 32) is None
    assert augment.check({"flip": True}, 32) == {"flip": True, "translate": 0}
    with pytest.raises(DPDMError, match="train.augment.translate' = 8: must be in \\[0, 3\\]"):
        augment.check({"translate": 8}, 8)


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    data.prepare("digits", out, download=False, digits_size=16)
    s = tiny_settings()
    d = train._load_training_data(s, out)
    torch.manual_seed(0)
    precond = diffusion.build_precond(s, d["resolution"], d["channels"], d["num_classes"])
    return s, d, precond


def _batch(cell, indices, spec, k=3, dp_seed=4):
    s, d, precond = cell
    dp = privacy.DPSGD(diffusion.example_loss, noise_multiplier=1.0, max_grad_norm=1e-3, num_examples=d["n"],
                       sample_rate=0.1, dp_seed=dp_seed, batch_loss_fn=diffusion.batch_example_losses)
    idx = torch.tensor(indices)
    images = data.to_model_range(d["images"][idx.numpy()])
    return dp, train.private_batch(dp, precond, images, torch.from_numpy(d["labels"][idx.numpy()]), idx, k, 0.0, spec)


SPEC = {"flip": True, "translate": 2}


def test_each_draw_sees_its_own_augmentation_of_its_example(cell):
    _, (y, _, sigma, noise) = _batch(cell, [3, 8], SPEC, k=6)
    assert y.shape == (2, 6, 1, 16, 16) and noise.shape == y.shape
    assert len({tuple(y[0, j].flatten().tolist()) for j in range(6)}) > 1  # the copies differ
    _, (plain, *_) = _batch(cell, [3, 8], None, k=6)
    assert plain.shape == (2, 1, 16, 16)


def test_an_examples_augmentations_do_not_depend_on_the_batch(cell):
    _, (alone, *_) = _batch(cell, [9], SPEC)
    _, (among, *_) = _batch(cell, [2, 5, 9], SPEC)
    assert torch.equal(alone[0], among[2])
    _, (other_key, *_) = _batch(cell, [9], SPEC, dp_seed=5)
    assert not torch.equal(alone[0], other_key[0])


def test_the_per_example_gradient_is_exact_and_clipped_as_one_unit(cell):
    _, _, precond = cell
    dp, batch = _batch(cell, [0, 4, 7], SPEC)
    ref, _ = privacy.per_example_grads_loop(precond, diffusion.example_loss, batch)  # one autograd pass each
    for method, fn in (("rows", diffusion.batch_example_losses), ("vmap", diffusion.example_loss)):
        got, _ = privacy.per_example_grads(precond, fn, batch, method=method)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{method} {name}")
    # the mechanism clips each example's gradient (its K augmented copies together) to C
    flat, stats = dp.clip_and_accumulate(precond, batch)
    norms = privacy.per_example_norms(ref)
    assert stats[2] == 3 and bool((norms > dp.max_grad_norm).all())
    expected = torch.cat([sum(ref[n][i] * (dp.max_grad_norm / norms[i]) for i in range(3)).reshape(-1)
                          for n, p in precond.named_parameters() if p.requires_grad])
    torch.testing.assert_close(flat, expected, rtol=1e-4, atol=1e-9)


def test_a_cell_trains_with_augmentation_and_its_ledger_says_so(tmp_path):
    s = tiny_settings(max_steps=2, augment=SPEC)
    data.prepare("digits", tmp_path / "d", download=False, digits_size=16)
    train.train(s, tmp_path / "d", tmp_path / "cell", dp_seed=1)
    ledger = json.loads((tmp_path / "cell" / "privacy.json").read_text())
    assert ledger["augmentation_multiplicity"] == SPEC and ledger["steps"] == 2
