"""How a training job starts its processes: one `python -m dpdm train`, or torchrun with
one process per GPU (or per CPU rank), on one node or several.

The train rule's resources say how many: `resources.train.gpu` GPUs (one process each)
or, on CPU, `resources.train.processes`; `resources.train.nodes` nodes. The rule passes
the result as `python -m dpdm train --procs-per-node P --nodes N`; when P x N > 1 that
command replaces itself (exec, same PID, so SLURM's signals reach it) with torchrun
running the same command once per process, under srun on several nodes. The counts are
job resources, not params, so changing the GPU count of a finished cell does not rerun
it (Snakemake does not treat resources as rerun triggers), and a cell in progress
resumes its checkpoint on the new count.

Every process joins torchrun's process group itself (dpdm.privacy.process_group_from_env);
the mechanism draws the same Poisson batch on every rank, shards it, and adds the noise
once, so the number of processes changes the speed and nothing else (weights equal to
one process's up to float rounding; the ledger identical).

Several nodes (under SLURM): `srun` starts one torchrun per node, which meet at a c10d
rendezvous on the job's first node (PyTorch's recipe for SLURM); the job asks SLURM for
`nodes` nodes and `gpu` GPUs in all, `gpu / nodes` per node.
"""

from __future__ import annotations

import os
import subprocess
import sys

from dpdm.errors import DPDMError

RENDEZVOUS_PORT = 29500
# What `python -m dpdm train` is told, and strips before running itself under torchrun.
LAUNCH_OPTIONS = ("--procs-per-node", "--nodes")


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


def describe(resources: dict) -> str:
    """How each training of these train resources runs, for the dry run's summary ("" for one
    process): what `python -m dpdm train --procs-per-node P --nodes N` execs."""
    per_node, nodes = processes_per_node(resources), int(resources.get("nodes", 1) or 1)
    if per_node * nodes == 1:
        return ""
    how = "under srun, c10d rendezvous" if nodes > 1 else "--standalone"
    return f"; each training: torchrun --nproc-per-node={per_node} on {nodes} node(s) {how}"


def under_torchrun() -> bool:
    """True in a process torchrun started (it sets LOCAL_RANK for each)."""
    return "LOCAL_RANK" in os.environ


def strip_launch_options(argv: list[str]) -> list[str]:
    """argv without --procs-per-node / --nodes (and their values): what each rank runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_OPTIONS:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in LAUNCH_OPTIONS)):
            out.append(a)
    return out


def _first_node() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist or "SLURM_JOB_ID" not in os.environ:
        raise DPDMError("training on several nodes runs inside a SLURM allocation (srun + torchrun's rendezvous), "
                        "but SLURM_JOB_NODELIST / SLURM_JOB_ID are not set; submit it through the slurm profile, "
                        "or use resources.train.nodes: 1")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise DPDMError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with `scontrol show hostnames` ({e})") from None
    return hosts[0]


def command(per_node: int, nodes: int, rank_argv: list[str]) -> list[str]:
    """The command that runs `rank_argv` (a full command line, e.g. [python, -m, dpdm,
    train, ...]) once per process: torchrun (--no-python: it runs the command as given),
    under srun on several nodes. torchrun is started as `python -m torch.distributed.run`,
    so it is the torch of this interpreter whatever PATH holds."""
    if per_node < 1 or nodes < 1:
        raise DPDMError(f"--procs-per-node {per_node} --nodes {nodes}: each must be >= 1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={per_node}"]
    if nodes == 1:
        return torchrun + ["--standalone", "--no-python", *rank_argv]
    rendezvous = [f"--rdzv-id={os.environ.get('SLURM_JOB_ID')}", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint={_first_node()}:{RENDEZVOUS_PORT}"]
    srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    return srun + torchrun + rendezvous + ["--no-python", *rank_argv]


def relaunch(per_node: int, nodes: int, argv: list[str]) -> None:
    """Replace this process with torchrun running `python -m dpdm <argv>` (launch options
    stripped) once per process, when more than one is asked for and this process is not
    already one of torchrun's; else return and let the caller train here."""
    if per_node * nodes == 1 or under_torchrun():
        return
    cmd = command(per_node, nodes, [sys.executable, "-m", "dpdm", *strip_launch_options(argv)])
    print("dpdm train: starting " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execvp(cmd[0], cmd)
