"""torch.distributed helpers shared by the mechanism and its randomness."""

from __future__ import annotations


def rank_world():
    """(rank, world_size, active) of the default process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False
