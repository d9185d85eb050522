"""DP-SGD: the privacy engine, one module per concept of the paper.

    accounting   calibration of sigma, the epsilon spent (an Opacus accountant)   dpdm.privacy.accounting
    mechanism    Poisson sampling and the DP-SGD step (`DPSGD`)                      dpdm.privacy.mechanism
    per_example  exact per-example gradients (rows or vmap), norms, clipped sums    dpdm.privacy.per_example
    rows         the rows method and its per-layer rules (`register_rule`)          dpdm.privacy.rows
    randomness   secret seeds, named streams, each example's own draws             dpdm.privacy.randomness
    ledger       privacy.json                                                        dpdm.privacy.ledger

The names below are re-exported here, so `from dpdm import privacy; privacy.DPSGD(...)`
is the usual way in. Every epsilon we report comes from an accountant, never from the
config.

The mechanism (`DPSGD`), one logical step:

    batch  ~ Poisson(q):  each of the N examples independently with probability q
                          (stock Opacus UniformWithReplacementSampler, seeded generator)
    g_i    = grad of example i's loss (its K noise draws averaged INSIDE the loss),
             exact: by rows (dpdm.privacy.rows: one batched forward/backward, per-layer
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

from dpdm.privacy.accounting import (ACCOUNTANTS, CALIBRATIONS, Accountant, calibrate_sigma, check_privacy_params,
                                     epsilon_from_history, noise_multiplier_for, spent_epsilon, steps_for)
from dpdm.privacy.distributed import process_group_from_env, rank_world
from dpdm.privacy.ledger import privacy_ledger
from dpdm.privacy.mechanism import DPSGD, draw_poisson_batch, poisson_sampler
from dpdm.privacy.per_example import (clip_factors, clipped_grad_sum, per_example_grads, per_example_grads_loop,
                                      per_example_norms)
from dpdm.privacy.randomness import (DP_SEED_ENV, derive_seed, dp_seed_from_env, example_generators, example_seeds,
                                     secret_seed)
from dpdm.privacy.rows import register_rule, unsupported

__all__ = [
    "ACCOUNTANTS", "CALIBRATIONS", "Accountant", "calibrate_sigma", "check_privacy_params", "epsilon_from_history",
    "noise_multiplier_for", "spent_epsilon", "steps_for", "rank_world", "process_group_from_env", "privacy_ledger", "DPSGD",
    "draw_poisson_batch", "poisson_sampler", "clip_factors", "clipped_grad_sum", "per_example_grads",
    "per_example_grads_loop", "per_example_norms", "DP_SEED_ENV", "derive_seed", "dp_seed_from_env",
    "example_generators", "example_seeds", "secret_seed", "register_rule", "unsupported",
]
