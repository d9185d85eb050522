"""torch.distributed helpers shared by the mechanism and its randomness."""

from __future__ import annotations

import contextlib
import os

from dpdm.errors import DPDMError


def rank_world():
    """(rank, world_size, active) of the default process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


@contextlib.contextmanager
def process_group_from_env(device_preference: str = "auto"):
    """Join torchrun's process group for the duration of the block, when torchrun started
    this process (WORLD_SIZE > 1 in the environment; one process per GPU, or per CPU
    rank): NCCL when the job computes on CUDA, each rank pinned to GPU LOCAL_RANK, gloo on
    CPU. A plain `python -m dpdm train` (no WORLD_SIZE) runs alone, as before. The
    mechanism then shards each Poisson batch over the ranks and adds the noise once
    (dpdm.privacy.mechanism.DPSGD); only rank 0 writes files."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    cuda = str(device_preference).startswith("cuda") or (device_preference == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if not torch.cuda.is_available():
            raise DPDMError(f"device '{device_preference}' with {world} processes, but this node has no CUDA: "
                            "request GPUs (resources.train.gpu) on a GPU node, or train on CPU (device: cpu, "
                            "resources.train.processes)")
        if local_rank >= torch.cuda.device_count():
            raise DPDMError(f"rank {local_rank} of this node has no GPU: {torch.cuda.device_count()} visible, "
                            f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes per node; start one process per GPU")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
