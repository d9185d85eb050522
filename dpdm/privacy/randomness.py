"""The mechanism's randomness: secret seeds, named streams, and each example's own draws.

By default every source (Poisson sampling, DP noise, the per-example key) is derived from
OS entropy (`secret_seed`), shared across ranks by broadcast; an integer `dp_seed` (or
$DPDM_DP_SEED) makes them reproducible and NOT secret. Each example's loss randomness at
step t comes from a generator seeded by a keyed hash of (t, its index) (`example_seeds`),
so adding or removing one example changes no other example's draws: the sensitivity
argument of the mechanism needs exactly that (see dpdm.privacy).
"""

from __future__ import annotations

from dpdm.artifacts import DPDMError
from dpdm.privacy.distributed import rank_world

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
    rank, world, active = rank_world()
    if active and world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(t, src=0)
        value = int(t.item())
    return value
