"""The mechanism: one DP-SGD step of the Poisson-subsampled Gaussian mechanism.

Abadi et al. 2016 (Deep Learning with Differential Privacy), Algorithm 1, with Poisson
sampling, and DPDM (Dockhorn et al. 2023) Algorithm 1, whose per-example loss averages
K noise draws (noise multiplicity) before its gradient is clipped:

    batch  ~ Poisson(q)              every example independently with probability q   (Alg. 1: "take a random sample")
    g_i    = grad of example i's loss, its K draws averaged inside                     ("compute gradient")
    sum    = sum_i g_i * min(1, C / ||g_i||)                                            ("clip gradient", summed)
    noisy  = sum + N(0, sigma^2 C^2 I)                                                  ("add noise")
    update = noisy / (q N)                                                              (the EXPECTED batch size)

`DPSGD.private_grad` is these three lines as `clip_and_accumulate -> add_noise ->
scale`; `step` then lets the optimizer (Adam in DPDM) apply the update and records the
step with the accountant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpdm.artifacts import DPDMError
from dpdm.privacy.accounting import Accountant
from dpdm.privacy.distributed import rank_world
from dpdm.privacy.per_example import (_batch_len, _select, _trainable, clipped_grad_sum, per_example_grads,
                                      per_example_norms)
from dpdm.privacy.randomness import derive_seed, example_generators, secret_seed
from dpdm.privacy.rows import unsupported

if TYPE_CHECKING:
    import torch


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
# DP-SGD.


class DPSGD:
    """DP-SGD with Poisson sampling, per-example clipping and Gaussian noise.

    Keyword arguments:
        noise_multiplier     sigma: the noise's standard deviation is sigma * C
        max_grad_norm        C: each example's gradient is clipped to total L2 norm <= C
        num_examples         N: the training set's size (public, as in Opacus)
        sample_rate          q: each example's probability of being in a batch
        optimizer            applies p.grad in `step` (None: the caller steps)
        physical_batch_size  examples per micro-batch (memory only; not the mechanism)
        grad_chunk_size      examples per chunk of per-example gradients (memory only)
        dp_seed              None: secret randomness (OS entropy); an int: reproducible, NOT secret
        device               where the DP noise is drawn
        batch_loss_fn        the per-example losses of a whole batch, [B] (enables the rows method)

    `loss_fn(model, *example)` (positional) is ONE example's scalar loss.

    * the batch comes from `poisson_batch()`: every example independently with probability
      q (stock Opacus sampler, its own generator); an empty batch is still a step (its
      update is pure noise) and is still counted by the accountant;
    * the noise is drawn ONCE per logical step and the sum is divided by the EXPECTED
      batch size q N, never by the realised one (that would make the update's scale
      depend on the data);
    * each example's loss randomness comes from `example_generators` (keyed per example,
      dpdm.privacy.randomness), so one example's presence changes no other's draws.

    torch.distributed (torchrun): every rank draws the SAME Poisson batch (same sampler
    seed, broadcast from rank 0 when secret) and handles a contiguous shard of it. Rank 0
    alone adds the noise to its partial sum, then the partial sums are all_reduced (SUM):
    the noise is in the total exactly once and every rank ends with the identical update.

    Per-example gradients: by rows when `batch_loss_fn` is given and every layer has a
    rule (dpdm.privacy.rows), verified against vmap on the first step's first examples
    (training is refused if they differ); else by torch.func vmap (`per_example_method`
    says which ran). The accountant (`accountant`, an Opacus RDPAccountant) records a
    step only after its update is applied.
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
        self.accountant = Accountant()

    @property
    def steps(self) -> int:
        return self.accountant.steps

    @property
    def history(self) -> list[list]:
        """[(noise_multiplier, sample_rate, steps), ...]: the steps taken, as the accountant composes them."""
        return self.accountant.history

    # -- sampling and the per-example randomness ---------------------------

    def poisson_batch(self):
        """The next logical batch: int64 indices into the training set (may be empty)."""
        return draw_poisson_batch(self._sampler)

    def example_generators(self, indices, device=None) -> list:
        """One generator per example of the next step's batch, for the randomness inside its
        loss (noise levels, noise, label or dropout masks): seeded from the secret key, the
        step and the example's index only (dpdm.privacy.randomness.example_seeds)."""
        return example_generators(self.example_key, self.steps, indices.tolist() if hasattr(indices, "tolist")
                                  else indices, self.device if device is None else device)

    # -- the private gradient ------------------------------------------------

    def _choose_method(self, model, batch) -> None:
        """rows when possible and verified on this batch, else vmap."""
        if self.batch_loss_fn is None or unsupported(model):
            self.per_example_method = "vmap"
            return
        n = _batch_len(batch) if any(e is not None for e in batch) else 0
        if n == 0:
            return  # decide on the first non-empty batch
        probe = _select(batch, slice(0, min(n, self.ROWS_CHECK_EXAMPLES)))
        fast, _ = per_example_grads(model, self.batch_loss_fn, probe, method="rows")
        ref, _ = per_example_grads(model, self.loss_fn, probe, method="vmap")
        diff = per_example_norms({k: fast[k] - ref[k] for k in ref})
        scale = per_example_norms(ref).clamp_min(1e-12)
        worst = float((diff / scale).max())
        if not worst < self.ROWS_CHECK_TOLERANCE:
            raise DPDMError(f"per-example gradients by rows differ from torch.func's by {worst:.2e} (relative): "
                            "the model or loss mixes rows of different examples, so the clipping bound would not "
                            "hold. Use a per-example loss only (no batch_loss_fn) for this model.")
        self.per_example_method = "rows"

    def clip_and_accumulate(self, model, batch):
        """sum_i clip_C(g_i) over this rank's shard of `batch`, flattened; and statistics
        [examples, loss sum, clipped count, norm sum] (Alg. 1: compute and clip gradients)."""
        import torch

        rank, world, _ = rank_world()
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
        stats = torch.tensor([float(n_local), losses.double().sum().item(),
                              float((norms > self.max_grad_norm).sum().item()), norms.double().sum().item()],
                             dtype=torch.float64, device=flat.device)
        return flat, stats

    def add_noise(self, flat) -> None:
        """flat += N(0, sigma^2 C^2 I), drawn once per step from the noise generator, on
        rank 0 only (the all_reduce that follows carries it to every rank) (Alg. 1: add noise)."""
        import torch

        rank, _, _ = rank_world()
        if rank == 0 and self.noise_multiplier > 0:
            noise = torch.randn(flat.shape, generator=self.noise_generator, device=self.noise_generator.device,
                                dtype=flat.dtype)
            flat.add_(noise.to(flat.device), alpha=self.noise_multiplier * self.max_grad_norm)

    def scale(self, flat) -> None:
        """flat /= q N: the expected batch size, never the realised one."""
        flat.div_(self.expected_batch_size)

    def private_grad(self, model, batch):
        """Set p.grad to the noisy, clipped, normalised gradient of `batch`; return stats.

        `batch` is a tuple of per-example tensors (leading dim = realised batch size,
        entries may be None) passed to loss_fn(model, *example). It must be the whole
        logical batch; under torch.distributed every rank passes the same batch.
        """
        import torch.distributed as dist

        batch = tuple(batch)
        n = _batch_len(batch) if any(e is not None for e in batch) else 0
        flat, stats = self.clip_and_accumulate(model, batch)
        self.add_noise(flat)
        _, world, active = rank_world()
        if active and world > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        self.scale(flat)
        offset = 0
        for name, p in _trainable(model):
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
        """One DP-SGD step on `batch` (see `private_grad`), then the optimizer's step; the
        accountant records it."""
        stats = self.private_grad(model, batch)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        stats["step"] = self.steps
        return stats

    # -- the ledger --------------------------------------------------------

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent by the steps taken so far."""
        return self.accountant.epsilon(delta, accountant)

    def state_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "num_examples": self.num_examples,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "history": self.accountant.history,
            "secret_randomness": self.secret_randomness,
            "sampling_generator": self.sampling_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
            "example_key": self.example_key,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("noise_multiplier", "max_grad_norm", "num_examples", "sample_rate"):
            if state[key] != getattr(self, key):
                raise DPDMError(f"DP-SGD state was saved with {key} = {state[key]}, this run has {getattr(self, key)}")
        self.accountant = Accountant(state["history"])
        if self.accountant.steps != int(state["steps"]):
            raise DPDMError("corrupt DP-SGD state: the accountant history does not add up to the step count")
        self.secret_randomness = bool(state.get("secret_randomness", False))
        self.sampling_generator.set_state(state["sampling_generator"].cpu())
        self.noise_generator.set_state(state["noise_generator"].cpu())
        self.example_key = int(state["example_key"])


