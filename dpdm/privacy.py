"""DP-SGD: accounting, Poisson sampling, per-example gradients, clipping and noise.

Accounting is stock Opacus: `calibrate_sigma` finds the noise multiplier for a target
(epsilon, delta), `spent_epsilon` recomputes epsilon from the steps actually taken.
Every epsilon we report comes from an accountant, never from the config.

The mechanism (`DPSGD`), one logical step:

    batch  ~ Poisson(q):  each of the N examples independently with probability q
                          (stock Opacus UniformWithReplacementSampler, seeded generator)
    g_i    = grad of example i's loss (its K noise draws averaged INSIDE the loss),
             exact: by rows (dpdm.example_grads: one batched forward/backward, per-layer
             per-example contractions; verified against torch.func on the first step)
             when the model's layers allow, else by torch.func (vmap over examples of
             grad); chunked: at most chunk x P per-example gradient numbers at once
    update = ( sum_i g_i * min(1, C / ||g_i||)  +  N(0, sigma^2 C^2 I) ) / (q N)

then p.grad = update and the optimizer steps. ||g_i|| is the total L2 norm over all
parameters; the noise is drawn once per logical step; the divisor is the EXPECTED
batch size. An empty batch is a noise-only step. Micro-batching (physical_batch_size)
and chunking (grad_chunk_size) only bound memory. Under torch.distributed rank 0 alone
adds the noise before the all_reduce of the clipped sums (see `DPSGD`).

`privacy_ledger` builds privacy.json: the mechanism's parameters and epsilon recomputed
by RDP and by PRV from the steps the mechanism recorded.

Randomness. The guarantee assumes the adversary cannot predict WHICH examples were
sampled, WHAT noise was added, or the randomness inside each example's loss (the noise
levels and noise of the diffusion loss, label dropout, a classifier's dropout masks).
The last one matters as much as the others: the sensitivity argument needs adding one
example x* to change the step's clipped sum by at most C. If the loss's draws came from
a public stream handed out by position in the batch, x* would shift the draws of every
example after it, in this step and every later one, and the clipped sum could move by
far more than C (measured: 1.27 C in the step that sampled x*, and 6.06 in a later step
that did not). So every source is secret, and the loss's draws are keyed per example:
example i at step t draws from its own generator seeded by a keyed hash (BLAKE2b with a
secret key) of (t, i) (`example_seeds`), so its draws do not depend on which other
examples were sampled, and adding x* changes the clipped sum by its own clipped
gradient alone (tests/test_privacy.py shows both).

By default the Poisson sampler, the DP noise and the per-example key are derived from
OS entropy (`secrets`), shared across ranks by broadcast, and their state is kept only
in training checkpoints (private files, like the data; deleted when training
finishes): resume stays exact, a fresh run draws fresh randomness. Passing an integer
`dp_seed` makes all three reproducible (tests, debugging); the ledger then says the
randomness is NOT secret. The generators are torch's (Mersenne Twister on CPU, Philox on
CUDA), not cryptographic RNGs; Opacus' secure_mode (torchcsprng) is not used. Only
randomness that is independent of the data and public anyway (the initial weights) is
seeded from the cell seed.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from dpdm.artifacts import DPDMError

if TYPE_CHECKING:
    import torch

ACCOUNTANTS = ("rdp", "prv")


def _make_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise DPDMError(f"unknown accountant '{name}'; choose one of {ACCOUNTANTS}")


def spent_epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps (noise multiplier sigma, rate q)."""
    if steps == 0:
        return 0.0
    acc = _make_accountant(accountant)
    acc.history = [(float(sigma), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def check_privacy_params(target_eps: float, delta: float, n: int) -> None:
    """Reject settings that cannot give a meaningful guarantee."""
    if not target_eps > 0:
        raise DPDMError(f"privacy target epsilon must be > 0, got {target_eps}")
    if not 0 < delta < 1.0 / n:
        raise DPDMError(
            f"privacy.delta = {delta:g} must be in (0, 1/N) = (0, {1.0 / n:.3g}) for a dataset of N = {n} "
            "examples; a delta of 1/N or more allows releasing an example outright. Lower privacy.delta."
        )


def calibrate_sigma(
    target_eps: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    rel_tol: float = 1e-3,
) -> float:
    """Smallest noise multiplier whose epsilon after `steps` steps is <= target_eps.

    Bisection on sigma with the chosen accountant; the tolerance is relative to the
    target (Opacus' own `get_noise_multiplier` uses an absolute tolerance, which at
    eps = 0.2 inflates sigma by about 5 %).
    """
    if not target_eps > 0:
        raise DPDMError(f"privacy target epsilon must be > 0, got {target_eps}")
    if not 0 < sample_rate <= 1:
        raise DPDMError(f"sampling rate must be in (0, 1], got {sample_rate}")
    lo, hi = 0.0, 1.0
    while spent_epsilon(hi, sample_rate, steps, delta, accountant) > target_eps:
        lo, hi = hi, 2 * hi
        if hi > 1e5:
            raise DPDMError(f"no noise multiplier below 1e5 reaches epsilon = {target_eps}; check delta and steps")
    # Invariant: eps(hi) <= target < eps(lo) (eps(0) = inf).
    while hi - lo > 1e-6 * hi:
        mid = 0.5 * (lo + hi)
        eps = spent_epsilon(mid, sample_rate, steps, delta, accountant)
        if eps > target_eps:
            lo = mid
        else:
            hi = mid
            if target_eps - eps < rel_tol * target_eps:
                break
    return hi


def steps_for(epochs: float, sample_rate: float) -> int:
    """Number of Poisson-sampled steps in `epochs` passes: ceil(epochs / q)."""
    return int(math.ceil(epochs / sample_rate - 1e-9))


@functools.lru_cache(maxsize=64)
def _rdp_one_step(noise_multiplier: float, sample_rate: float):
    """Opacus' RDP curve of ONE subsampled Gaussian step at the RDPAccountant's default orders."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                     orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)
    return curve


def epsilon_from_history(history, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a list of (noise_multiplier, sample_rate, steps) segments, composed.

    This is how every reported epsilon is computed: from what the mechanism recorded
    while it ran (`DPSGD.history`), not from the config. RDP is exactly what Opacus'
    RDPAccountant computes (its per-step RDP curve times the steps, summed over
    segments, then converted at its default orders); the per-step curve is cached, so
    epsilon-so-far can be logged every step at no cost.
    """
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as rdp_analysis

        curve = sum(_rdp_one_step(s, q) * n for s, q, n in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=delta)
        return float(eps)
    acc = _make_accountant(accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


CALIBRATIONS = ("tight", "opacus")


@functools.lru_cache(maxsize=32)
def noise_multiplier_for(
    target_eps: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    accountant: str = "rdp",
    calibration: str = "tight",
) -> float:
    """The noise multiplier sigma for a planned run, by the configured calibration.

    tight:  `calibrate_sigma` (bisection, relative tolerance 1e-3 on epsilon).
    opacus: `opacus.accountants.utils.get_noise_multiplier` with its default absolute
            tolerance 0.01 (the paper's code path; over-noises at small epsilon).
    Either way the result is checked: epsilon(sigma) <= target with the same accountant.
    """
    if accountant not in ACCOUNTANTS:
        raise DPDMError(f"privacy.accountant = '{accountant}' is unknown; choose one of {ACCOUNTANTS}")
    if steps < 1:
        raise DPDMError(f"cannot calibrate noise for {steps} steps; check train.epochs and train.max_steps")
    if calibration == "tight":
        sigma = calibrate_sigma(target_eps, delta, sample_rate, steps, accountant)
    elif calibration == "opacus":
        from opacus.accountants.utils import get_noise_multiplier

        sigma = float(get_noise_multiplier(target_epsilon=target_eps, target_delta=delta,
                                           sample_rate=sample_rate, steps=steps, accountant=accountant))
    else:
        raise DPDMError(f"privacy.calibration = '{calibration}' is unknown; choose one of {CALIBRATIONS}")
    eps = spent_epsilon(sigma, sample_rate, steps, delta, accountant)
    if not eps <= target_eps:  # never trust a calibration routine blindly
        raise DPDMError(f"calibrated sigma = {sigma} gives epsilon = {eps} > target {target_eps} ({accountant})")
    return float(sigma)


# ----------------------------------------------------------------------------
# Poisson sampling.


def poisson_sampler(num_examples: int, sample_rate: float, generator):
    """Stock Opacus Poisson sampler: every example independently with probability q.

    One iteration of the returned sampler is one logical batch (possibly empty); each
    iteration consumes exactly one `torch.rand(N)` from `generator`, so saving and
    restoring the generator's state resumes the sequence of batches exactly.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if generator is None:
        raise DPDMError("Poisson sampling needs an explicit, seeded torch.Generator")
    return UniformWithReplacementSampler(num_samples=int(num_examples), sample_rate=float(sample_rate),
                                         generator=generator, steps=1)


def draw_poisson_batch(sampler) -> "torch.Tensor":
    """One logical batch: a sorted int64 tensor of example indices (may be empty)."""
    import torch

    (indices,) = list(iter(sampler))
    return torch.as_tensor(indices, dtype=torch.long)


# ----------------------------------------------------------------------------
# Per-example gradients.
#
# `loss_fn(module, *example) -> scalar` is the loss of ONE example; everything that
# is random (noise levels, noise, label dropout) is drawn outside and passed in as
# part of the example, so the loss is a deterministic function of (weights, example).
# With noise multiplicity, one example carries its K noise draws and the loss
# averages over them: the gradient of that average is the example's gradient, and
# it is clipped as one unit (the sensitivity is per example, not per draw).


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _example_dims(examples):
    return tuple(None if e is None else 0 for e in examples)


def _batch_len(examples) -> int:
    sizes = {int(e.shape[0]) for e in examples if e is not None}
    if len(sizes) != 1:
        raise ValueError(f"every per-example tensor needs the same leading (batch) size, got {sorted(sizes)}")
    return sizes.pop()


def _select(examples, rows):
    return tuple(None if e is None else e[rows] for e in examples)


def _functional_loss(model, loss_fn):
    """f(params, *example) -> (loss, loss): loss_fn(model, *example) evaluated with `params`.

    `params` maps the model's trainable parameter names to tensors; buffers and frozen
    parameters come from the model itself. Built on torch.func.functional_call, so it
    can be differentiated with torch.func.grad and batched with torch.func.vmap.
    """
    import torch

    class _Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *example):
            return loss_fn(self.m, *example)

    wrapped = _Loss()

    def f(params, *example):
        loss = torch.func.functional_call(wrapped, {"m." + n: t for n, t in params.items()}, args=example)
        if loss.ndim != 0:
            raise ValueError(f"the per-example loss must be a scalar, got shape {tuple(loss.shape)}")
        return loss, loss.detach()

    return f


def iter_per_example_grads(model, loss_fn, examples, chunk_size=None):
    """Yield (rows, grads, losses) for consecutive chunks of at most `chunk_size` examples.

    grads maps each trainable parameter name to a [chunk, *param.shape] tensor: the
    exact gradient of loss_fn(model, *example_i) for each example i of the chunk,
    computed with torch.func (vmap over the example axis of grad). Only one chunk of
    per-example gradients (chunk x P numbers) exists at a time.
    """
    import torch

    examples = tuple(examples)
    n = _batch_len(examples)
    if n == 0:
        return
    chunk = n if chunk_size is None else max(1, int(chunk_size))
    params = {name: p.detach() for name, p in _trainable(model)}
    f = _functional_loss(model, loss_fn)
    batched = torch.func.vmap(torch.func.grad(f, has_aux=True), in_dims=(None,) + _example_dims(examples))
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        grads, losses = batched(params, *_select(examples, rows))
        yield rows, grads, losses


def per_example_grads(model, loss_fn, examples, chunk_size=None):
    """(grads, losses): every example's exact gradient, stacked ([B, *shape] per parameter).

    Holds B x P numbers; training uses `clipped_grad_sum`, which never does.
    """
    import torch

    parts = list(iter_per_example_grads(model, loss_fn, examples, chunk_size))
    names = [name for name, _ in _trainable(model)]
    if not parts:
        device = next(model.parameters()).device
        return ({name: torch.zeros((0,) + tuple(p.shape), device=device) for name, p in _trainable(model)},
                torch.zeros(0, device=device))
    grads = {name: torch.cat([g[name] for _, g, _ in parts]) for name in names}
    return grads, torch.cat([loss for _, _, loss in parts])


def per_example_grads_loop(model, loss_fn, examples):
    """Reference implementation: one ordinary autograd pass per example (slow, obviously right)."""
    import torch

    examples = tuple(examples)
    n = _batch_len(examples)
    named = _trainable(model)
    grads = {name: [] for name, _ in named}
    losses = []
    for i in range(n):
        loss = loss_fn(model, *(None if e is None else e[i] for e in examples))
        gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (name, p), g in zip(named, gs):
            grads[name].append(torch.zeros_like(p) if g is None else g.detach())
        losses.append(loss.detach())
    device = next(model.parameters()).device
    return ({name: torch.stack(v) if v else torch.zeros((0,) + tuple(p.shape), device=device)
             for (name, p), v in zip(named, grads.values())},
            torch.stack(losses) if losses else torch.zeros(0, device=device))


def per_example_norms(grads: dict) -> "torch.Tensor":
    """Total L2 norm of each example's gradient over ALL parameters: [B]."""
    import torch

    sq = [g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads.values()]
    return torch.stack(sq, dim=1).sum(dim=1).sqrt()


def clip_factors(norms, clip: float):
    """min(1, C / ||g||) per example (the 1e-6 keeps ||clipped g|| strictly below C)."""
    return (clip / (norms + 1e-6)).clamp(max=1.0)


def _grad_chunks(model, loss_fn, examples, chunk_size=None, batch_loss_fn=None):
    """(rows, grads, losses) chunk by chunk: by rows (dpdm.example_grads, one batched
    forward/backward per chunk) when `batch_loss_fn` is given, else by torch.func vmap."""
    if batch_loss_fn is None:
        yield from iter_per_example_grads(model, loss_fn, examples, chunk_size)
        return
    from dpdm import example_grads

    examples = tuple(examples)
    n = _batch_len(examples)
    chunk = n if chunk_size is None else max(1, int(chunk_size))
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        grads, losses = example_grads.per_example_grads(model, batch_loss_fn, _select(examples, rows))
        yield rows, grads, losses


def clipped_grad_sum(model, loss_fn, examples, clip: float, chunk_size=None, batch_loss_fn=None):
    """(sum_i clip(g_i), norms, losses) over the examples, chunk by chunk.

    sum maps each trainable parameter name to a tensor of the parameter's shape;
    norms are the per-example gradient norms BEFORE clipping; losses the per-example
    losses. Memory: one chunk of per-example gradients at a time. With `batch_loss_fn`
    (the per-example losses [B] of a whole batch, the same function as loss_fn) the
    gradients come from dpdm.example_grads, else from torch.func vmap over loss_fn.
    """
    import torch

    sums = {name: torch.zeros_like(p, memory_format=torch.contiguous_format) for name, p in _trainable(model)}
    norms, losses = [], []
    for _, grads, loss in _grad_chunks(model, loss_fn, examples, chunk_size, batch_loss_fn):
        norm = per_example_norms(grads)
        finite = torch.isfinite(norm)
        # An example whose gradient is not finite contributes zero (still at most C:
        # the bound holds) instead of turning the whole update into NaN.
        factor = torch.where(finite, clip_factors(norm, clip), torch.zeros_like(norm))
        all_finite = bool(finite.all())
        for name, g in grads.items():
            if not all_finite:
                g = torch.where(finite.view(-1, *([1] * (g.ndim - 1))), g, torch.zeros((), dtype=g.dtype,
                                                                                        device=g.device))
            sums[name].add_(torch.tensordot(factor.to(g.dtype), g, dims=1))
        norms.append(norm)
        losses.append(loss)
    device = next(model.parameters()).device
    return (sums,
            torch.cat(norms) if norms else torch.zeros(0, device=device),
            torch.cat(losses) if losses else torch.zeros(0, device=device))


# ----------------------------------------------------------------------------
# The mechanism.


DP_SEED_ENV = "DPDM_DP_SEED"


def dp_seed_from_env(dp_seed: int | None = None) -> int | None:
    """The seed of the DP randomness: `dp_seed` if given, else $DPDM_DP_SEED if set, else
    None (secret OS entropy). A known seed makes runs reproducible but NOT private against
    anyone who knows it; every ledger records which."""
    import os

    text = os.environ.get(DP_SEED_ENV, "").strip()
    if dp_seed is not None or not text:
        return dp_seed
    try:
        return int(text)
    except ValueError:
        raise DPDMError(f"environment variable {DP_SEED_ENV} = {text!r} must be an integer "
                        "(or unset, for secret DP randomness)") from None


def derive_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed for one named random stream of a run."""
    import hashlib

    digest = hashlib.sha256(f"dpdm:{int(seed)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def example_seeds(key: int, step: int, indices) -> list[int]:
    """One 63-bit seed per example: BLAKE2b keyed with the secret `key`, of (step, index).

    The seed of example i at step t depends on nothing else, in particular not on which
    other examples the Poisson batch holds or where i sits in it."""
    import hashlib

    k = int(key).to_bytes(8, "little")
    return [int.from_bytes(hashlib.blake2b(f"{int(step)}:{int(i)}".encode(), key=k, digest_size=8).digest(),
                           "little") >> 1 for i in indices]


def example_generators(key: int, step: int, indices, device="cpu") -> list:
    """A torch.Generator per example, seeded by `example_seeds` (on `device`)."""
    import torch

    return [torch.Generator(device=device).manual_seed(s) for s in example_seeds(key, step, indices)]


def secret_seed() -> int:
    """A 63-bit seed from OS entropy; under torch.distributed, rank 0's, broadcast to all ranks."""
    import secrets

    import torch
    import torch.distributed as dist

    value = secrets.randbits(63)
    rank, world, active = _distributed()
    if active and world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(t, src=0)
        value = int(t.item())
    return value


def _distributed():
    """(rank, world_size, active) of the default process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


class DPSGD:
    """DP-SGD with Poisson sampling, per-example clipping and Gaussian noise.

    One `step` is one logical batch of the Sampled Gaussian Mechanism:

        g = ( sum_{i in batch} clip_C(grad_i)  +  N(0, sigma^2 C^2 I) ) / (q N)

    * the batch comes from `sample()`: every example independently with probability
      q (stock Opacus sampler, its own generator); an empty batch is still a step (its
      update is pure noise) and is still counted by the accountant;
    * grad_i is the exact gradient of the example's loss (the loss averages the K
      noise draws of that example), clipped as one unit to total L2 norm <= C;
    * the clipped gradients are summed in micro-batches of `physical_batch_size`
      (chunks of `grad_chunk_size` inside): this bounds memory, not the mechanism;
    * the noise is drawn ONCE per logical step, from `noise_generator`, and the sum is
      divided by the EXPECTED batch size q N, never by the realised one (dividing by
      the realised size would make the update's scale depend on the data).

    torch.distributed (torchrun): every rank draws the SAME Poisson batch (same sampler
    seed, broadcast from rank 0 when secret) and the same per-example randomness, and
    handles a contiguous shard of it. Rank 0 alone adds the noise to its partial sum,
    then the partial sums are all_reduced (SUM): the noise is in the total exactly
    once and every rank ends with the identical gradient. Only rank 0's
    `noise_generator` advances.

    The ledger (`history`, `steps`) counts a step only after the update is applied.

    dp_seed: None (default) seeds the sampler and the noise from OS entropy (secret);
    an integer makes them reproducible and NOT secret (see the module docstring).

    Per-example gradients: torch.func vmap over loss_fn (any model), or, when
    `batch_loss_fn` (the same losses for a whole batch at once, [B]) is given and every
    layer is supported, dpdm.example_grads' rows method (the fast path: about the cost
    of a non-private step). The first step checks the rows method against vmap on two
    examples and refuses to train if they differ (`per_example_method` says which ran).
    """

    ROWS_CHECK_EXAMPLES = 2
    ROWS_CHECK_TOLERANCE = 1e-4  # relative, per example, over all parameters (float32)

    def __init__(self, loss_fn, *, noise_multiplier: float, max_grad_norm: float, num_examples: int,
                 sample_rate: float, optimizer=None, physical_batch_size: int | None = None,
                 grad_chunk_size: int | None = None, dp_seed: int | None = None, device=None,
                 batch_loss_fn=None):
        import torch

        if not noise_multiplier >= 0:
            raise DPDMError(f"noise multiplier must be >= 0, got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise DPDMError(f"privacy.clip must be > 0, got {max_grad_norm}")
        if not int(num_examples) > 0:
            raise DPDMError(f"the training set is empty (N = {num_examples})")
        if not 0 < sample_rate <= 1:
            raise DPDMError(f"sampling rate q = batch_size / N must be in (0, 1], got {sample_rate}; "
                            "lower train.batch_size")
        self.loss_fn = loss_fn
        self.batch_loss_fn = batch_loss_fn
        self.per_example_method = None  # "rows" or "vmap", decided on the first step
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.num_examples = int(num_examples)
        self.sample_rate = float(sample_rate)
        self.expected_batch_size = self.sample_rate * self.num_examples
        self.optimizer = optimizer
        self.physical_batch_size = physical_batch_size
        self.grad_chunk_size = grad_chunk_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.secret_randomness = dp_seed is None
        base = secret_seed() if dp_seed is None else int(dp_seed)
        self.sampling_generator = torch.Generator(device="cpu").manual_seed(derive_seed(base, "poisson"))
        self.noise_generator = torch.Generator(device=self.device).manual_seed(derive_seed(base, "dp-noise"))
        self.example_key = derive_seed(base, "example-draws")  # keys each example's loss randomness
        del base
        self._sampler = poisson_sampler(self.num_examples, self.sample_rate, self.sampling_generator)
        self.history: list[list] = []  # [[noise_multiplier, sample_rate, steps], ...] as an accountant's
        self.steps = 0

    # -- sampling ---------------------------------------------------------

    def sample(self):
        """The next logical batch: int64 indices into the training set (may be empty)."""
        return draw_poisson_batch(self._sampler)

    def example_generators(self, indices, device=None) -> list:
        """One generator per example of the next step's batch, for the randomness inside its
        loss (noise levels, noise, label or dropout masks): seeded from the secret key, the
        step and the example's index only (`example_seeds`)."""
        return example_generators(self.example_key, self.steps, indices.tolist() if hasattr(indices, "tolist")
                                  else indices, self.device if device is None else device)

    # -- the private gradient ------------------------------------------------

    def _choose_method(self, model, batch) -> None:
        """rows when possible and verified on this batch, else vmap."""
        from dpdm import example_grads

        if self.batch_loss_fn is None or example_grads.unsupported(model):
            self.per_example_method = "vmap"
            return
        n = _batch_len(batch) if any(e is not None for e in batch) else 0
        if n == 0:
            return  # decide on the first non-empty batch
        probe = _select(batch, slice(0, min(n, self.ROWS_CHECK_EXAMPLES)))
        fast, _ = example_grads.per_example_grads(model, self.batch_loss_fn, probe)
        ref, _ = per_example_grads(model, self.loss_fn, probe)
        diff = per_example_norms({k: fast[k] - ref[k] for k in ref})
        scale = per_example_norms(ref).clamp_min(1e-12)
        worst = float((diff / scale).max())
        if not worst < self.ROWS_CHECK_TOLERANCE:
            raise DPDMError(f"per-example gradients by rows differ from torch.func's by {worst:.2e} (relative): "
                            "the model or loss mixes rows of different examples, so the clipping bound would not "
                            "hold. Use a per-example loss only (no batch_loss_fn) for this model.")
        self.per_example_method = "rows"

    def private_grad(self, model, batch):
        """Set p.grad to the noisy, clipped, normalised gradient of `batch`; return stats.

        `batch` is a tuple of per-example tensors (leading dim = realised batch size,
        entries may be None) passed to loss_fn(model, *example). It must be the whole
        logical batch; under torch.distributed every rank passes the same batch.
        """
        import torch
        import torch.distributed as dist

        batch = tuple(batch)
        rank, world, active = _distributed()
        n = _batch_len(batch) if any(e is not None for e in batch) else 0
        shard = torch.arange(n).tensor_split(world)[rank] if world > 1 else None
        local = batch if shard is None else tuple(None if e is None else e[shard] for e in batch)
        n_local = n if shard is None else len(shard)

        if self.per_example_method is None:
            self._choose_method(model, local)
        batch_loss_fn = self.batch_loss_fn if self.per_example_method == "rows" else None
        named = _trainable(model)
        sums = {name: torch.zeros_like(p, memory_format=torch.contiguous_format) for name, p in named}
        norms, losses = [], []
        micro = n_local if not self.physical_batch_size else int(self.physical_batch_size)
        for start in range(0, n_local, max(1, micro)):
            part = _select(local, slice(start, min(n_local, start + micro)))
            s, nm, ls = clipped_grad_sum(model, self.loss_fn, part, self.max_grad_norm, self.grad_chunk_size,
                                         batch_loss_fn)
            for name in sums:
                sums[name].add_(s[name])
            norms.append(nm)
            losses.append(ls)
        device = named[0][1].device
        norms = torch.cat(norms) if norms else torch.zeros(0, device=device)
        losses = torch.cat(losses) if losses else torch.zeros(0, device=device)

        flat = torch.cat([sums[name].reshape(-1).float() for name, _ in named])
        if rank == 0 and self.noise_multiplier > 0:
            noise = torch.randn(flat.shape, generator=self.noise_generator, device=self.noise_generator.device,
                                dtype=flat.dtype)
            flat.add_(noise.to(flat.device), alpha=self.noise_multiplier * self.max_grad_norm)
        stats = torch.tensor([float(n_local), losses.double().sum().item(),
                              float((norms > self.max_grad_norm).sum().item()), norms.double().sum().item()],
                             dtype=torch.float64, device=flat.device)
        if active and world > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        flat.div_(self.expected_batch_size)

        offset = 0
        for name, p in named:
            k = p.numel()
            p.grad = flat[offset:offset + k].view_as(p).to(p.dtype).clone()
            offset += k
        count, loss_sum, clipped, norm_sum = stats.tolist()
        if int(round(count)) != n:
            raise RuntimeError(f"distributed shards cover {count} examples, expected {n}")
        nan = float("nan")
        return {
            "batch_size": n,
            "loss": loss_sum / n if n else nan,
            "frac_clipped": clipped / n if n else nan,
            "grad_norm": norm_sum / n if n else nan,
        }

    def step(self, model, batch) -> dict:
        """One DP-SGD step on `batch` (see `private_grad`), then the optimizer's step."""
        stats = self.private_grad(model, batch)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._record_step()
        stats["step"] = self.steps
        return stats

    # -- the ledger --------------------------------------------------------

    def _record_step(self):
        if self.history and self.history[-1][0] == self.noise_multiplier and self.history[-1][1] == self.sample_rate:
            self.history[-1][2] += 1
        else:
            self.history.append([self.noise_multiplier, self.sample_rate, 1])
        self.steps += 1

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent by the steps taken so far."""
        return epsilon_from_history(self.history, delta, accountant)

    def state_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "num_examples": self.num_examples,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "history": [list(h) for h in self.history],
            "secret_randomness": self.secret_randomness,
            "sampling_generator": self.sampling_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
            "example_key": self.example_key,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("noise_multiplier", "max_grad_norm", "num_examples", "sample_rate"):
            if state[key] != getattr(self, key):
                raise DPDMError(f"DP-SGD state was saved with {key} = {state[key]}, this run has {getattr(self, key)}")
        self.steps = int(state["steps"])
        self.history = [list(h) for h in state["history"]]
        if sum(h[2] for h in self.history) != self.steps:
            raise DPDMError("corrupt DP-SGD state: the accountant history does not add up to the step count")
        self.secret_randomness = bool(state.get("secret_randomness", False))
        self.sampling_generator.set_state(state["sampling_generator"].cpu())
        self.noise_generator.set_state(state["noise_generator"].cpu())
        self.example_key = int(state["example_key"])


# ----------------------------------------------------------------------------
# The privacy ledger (privacy.json).

NEIGHBOURING = ("add/remove one training example (example-level DP). The number of training examples N is treated "
                "as public (as Opacus does): it sets the sampling rate q = batch_size / N and appears in this ledger")
# What the guarantee covers: the outputs of the mechanism and their post-processing with
# public or test data only. What it does not: anything computed from the private split
# without noise. Every table and figure that shows a non-covered number says so.
GENERATOR_COVERS = (
    "model.pt (raw and EMA weights)",
    "samples_*.npz and grid_*.png (generated from the model)",
    "classify_*.json: classifiers trained on the samples, selected on a synthetic validation split, tested on the "
    "real test set",
    "fid_*.json and precision/recall against the TEST split (samples vs. public test data)",
)
GENERATOR_NOT_COVERED = (
    "FID and precision/recall against the TRAINING split (fid.reference_split: train, the paper's protocol): a "
    "statistic of the private data, not post-processing of the model; labelled in every table and figure",
    "private/ (train_metrics.csv: losses, clipped fractions, gradient norms and realised batch sizes computed on "
    "private data without noise; the hashes of the private inputs)",
    "logs/ and benchmarks/ (the same statistics and the timings of the training job)",
    "checkpoints/ (the secret randomness of the mechanism; deleted when training finishes)",
    "choices made by looking at any of the above: listed under `choices_on_private_data`",
)
PRV_EPS_ERROR = 0.01  # Opacus PRVAccountant default: the reported value is its upper bound


def privacy_ledger(*, history, num_examples: int, sample_rate: float, noise_multiplier: float, clip: float,
                   noise_multiplicity: int, delta: float, target_eps: float, calibration: str, accountant: str,
                   planned_steps: int, seed: int, provenance: dict | None, secret_randomness: bool = True,
                   covers=GENERATOR_COVERS, not_covered=GENERATOR_NOT_COVERED, choices=()) -> dict:
    """What privacy.json records: the mechanism's parameters and the epsilon it spent.

    Every epsilon here is recomputed by an accountant from `history` (the steps the
    mechanism actually took, with their sigma and q), by RDP and by PRV. It holds no
    function of the private data beyond N (no hash, no class counts): published files
    must not fingerprint the training set. `choices` lists decisions made by looking at
    numbers the guarantee does not cover (config privacy.choices_on_private_data).
    """
    import opacus

    check_privacy_params(target_eps, delta, num_examples)
    history = [[float(s), float(q), int(n)] for s, q, n in history]
    steps = sum(n for _, _, n in history)
    eps = {"rdp": epsilon_from_history(history, delta, "rdp")}
    errors = {}
    try:
        eps["prv"] = epsilon_from_history(history, delta, "prv")
    except Exception as e:  # PRV can fail numerically; RDP is then the guarantee
        eps["prv"] = None
        errors["prv"] = f"{type(e).__name__}: {e}"
    calibrated = eps.get(accountant)
    ledger = {
        "mechanism": "DP-SGD: Poisson-subsampled Gaussian mechanism on per-example clipped gradients",
        "neighbouring": NEIGHBOURING,
        "covers": list(covers),
        "not_covered": list(not_covered),
        "choices_on_private_data": list(choices),
        "num_examples": int(num_examples),
        "sample_rate": float(sample_rate),
        "expected_batch_size": float(sample_rate) * int(num_examples),
        "steps": int(steps),
        "planned_steps": int(planned_steps),
        "epochs": steps * float(sample_rate),
        "noise_multiplier": float(noise_multiplier),
        "clip": float(clip),
        "noise_std": float(noise_multiplier) * float(clip),
        "noise_multiplicity": int(noise_multiplicity),
        "delta": float(delta),
        "target_eps": float(target_eps),
        "calibration": {"method": calibration, "accountant": accountant,
                        "tolerance": "relative 1e-3" if calibration == "tight" else "absolute 0.01 (Opacus default)"},
        "eps_rdp": eps["rdp"],
        "eps_prv": eps["prv"],
        "within_target": calibrated is not None and calibrated <= float(target_eps),
        "accountants": {
            "rdp": {"library": "opacus", "version": opacus.__version__, "class": "RDPAccountant",
                    "orders": "Opacus default"},
            "prv": {"library": "opacus", "version": opacus.__version__, "class": "PRVAccountant",
                    "eps_error": PRV_EPS_ERROR, "delta_error": float(delta) / 1000, "reported": "upper bound"},
        },
        "history": history,
        "seed": int(seed),
        "dp_randomness": ("secret: Poisson sampling, DP noise and each example's loss randomness (keyed by a secret "
                          "key, the step and the example's index) seeded from OS entropy, never recorded"
                          if secret_randomness else
                          "REPRODUCIBLE (dp_seed given): Poisson sampling, DP noise and the per-example loss "
                          "randomness follow a known seed; the guarantee holds only against adversaries who do not "
                          "know it"),
        "provenance": provenance,
    }
    if errors:
        ledger["accountant_errors"] = errors
    return ledger
