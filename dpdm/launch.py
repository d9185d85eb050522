"""How a training job starts its processes: one `python -m dpdm`, or torchrun with one
process per GPU (or per CPU rank), on one node or several.

The train rule's resources say how many: `resources.train.gpu` GPUs (one process each)
or, on CPU, `resources.train.processes`; `resources.train.nodes` nodes. Every process
runs the same `python -m dpdm train`, which joins torchrun's process group itself
(dpdm.privacy.process_group_from_env); the mechanism draws the same Poisson batch on
every rank, shards it, and adds the noise once, so the number of processes changes
the speed and nothing else (weights equal to one process's up to float rounding; the
ledger identical), and a checkpoint written by any number of ranks resumes on any other.

Several nodes (under SLURM): `srun` starts one torchrun per node, which meet at a
c10d rendezvous on the job's first node (PyTorch's recipe for SLURM); the job asks
SLURM for `nodes` nodes and `gpu` GPUs in all, `gpu / nodes` per node.
"""

from __future__ import annotations

from dpdm.errors import DPDMError

RENDEZVOUS_PORT = 29500


def processes_per_node(resources: dict) -> int:
    """Processes on each node: one per GPU (`gpu` is the job's total), else `processes`."""
    gpus, nodes = int(resources.get("gpu", 0) or 0), int(resources.get("nodes", 1) or 1)
    procs = int(resources.get("processes", 1) or 1)
    if nodes < 1 or procs < 1 or gpus < 0:
        raise DPDMError(f"resources.train: nodes = {nodes}, processes = {procs}, gpu = {gpus}: each must be >= 1 "
                        "(gpu >= 0)")
    if gpus:
        if gpus % nodes:
            raise DPDMError(f"resources.train.gpu = {gpus} GPUs do not split evenly over {nodes} nodes; ask for a "
                            "multiple of the node count (e.g. gpu: 8 with nodes: 2 for 4 per node)")
        return gpus // nodes
    if nodes > 1:
        raise DPDMError(f"resources.train.nodes = {nodes} without GPUs: several nodes are for GPU training; on CPU "
                        "use resources.train.processes on one node")
    return procs


def launcher(resources: dict) -> str:
    """What the train rule puts before `python -m dpdm train ...` for a job with these
    resources: nothing (one process), or torchrun (--no-python: it runs the command as
    given, once per process), under srun on several nodes."""
    per_node, nodes = processes_per_node(resources), int(resources.get("nodes", 1) or 1)
    if per_node * nodes == 1:
        return ""
    if nodes == 1:
        return f"torchrun --standalone --nnodes=1 --nproc-per-node={per_node} --no-python "
    # One torchrun per node (srun), meeting on the allocation's first node.
    head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    return (f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes={nodes} "
            f"--nproc-per-node={per_node} --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d "
            f"--rdzv-endpoint={head}:{RENDEZVOUS_PORT} --no-python ")
