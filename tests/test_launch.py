"""Issue 18: training on several processes. dpdm.launch's commands, and `python -m dpdm
train` under torchrun (2 CPU ranks, gloo): the same ledger and (to float rounding) the
same weights as one process with the same DP seed; a checkpoint of 2 ranks resumes on 1;
more ranks than examples per batch is refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpdm import launch
from dpdm.artifacts import DPDMError
from helpers import sigterm_after_line, subprocess_env  # tests/helpers.py
from test_train import tiny_settings  # noqa: F401  (the tiny cell of the training tests)


def test_processes_per_node_from_the_train_resources():
    assert launch.processes_per_node({}) == launch.processes_per_node({"gpu": 1}) == 1
    assert launch.processes_per_node({"gpu": 8}) == 8
    assert launch.processes_per_node({"processes": 2}) == 2
    assert launch.processes_per_node({"gpu": 8, "nodes": 2}) == 4
    with pytest.raises(DPDMError, match="do not split evenly over 3 nodes"):
        launch.processes_per_node({"gpu": 8, "nodes": 3})
    with pytest.raises(DPDMError, match="without GPUs"):
        launch.processes_per_node({"gpu": 0, "nodes": 2})


def test_the_launch_options_are_stripped_from_what_each_rank_runs():
    argv = ["-v", "train", "--settings", "s.json", "--procs-per-node", "2", "--nodes=1", "--out", "o"]
    assert launch.strip_launch_options(argv) == ["-v", "train", "--settings", "s.json", "--out", "o"]


def test_torchrun_commands_for_one_node_and_two(monkeypatch, tmp_path):
    rank = [sys.executable, "-m", "dpdm", "train", "--out", "o"]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    assert launch.command(8, 1, rank) == torchrun + ["--nnodes=1", "--nproc-per-node=8", "--standalone",
                                                     "--no-python", *rank]
    # two nodes: srun, one torchrun per node, a c10d rendezvous on the allocation's first node
    for var in ("SLURM_JOB_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DPDMError, match="inside a SLURM allocation"):
        launch.command(4, 2, rank)
    (tmp_path / "scontrol").write_text("#!/bin/sh\n[ \"$*\" = 'show hostnames gn[07-08]' ] && printf 'gn07\\ngn08\\n'\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gn[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    assert launch.command(4, 2, rank) == (
        ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"] + torchrun
        + ["--nnodes=2", "--nproc-per-node=4", "--rdzv-id=4711", "--rdzv-backend=c10d", "--rdzv-endpoint=gn07:29500",
           "--no-python", *rank])


def test_one_process_or_a_torchrun_rank_does_not_relaunch(monkeypatch):
    def no_exec(*a):
        raise AssertionError(f"exec {a}")

    monkeypatch.setattr(os, "execvp", no_exec)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    launch.relaunch(1, 1, ["train"])  # one process: train here
    monkeypatch.setenv("LOCAL_RANK", "0")
    launch.relaunch(2, 1, ["train"])  # already one of torchrun's ranks: train here


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    from dpdm import data

    out = tmp_path_factory.mktemp("data") / "digits"
    data.prepare("digits", out_dir=out, download=False, digits_size=16)
    return out


def _train_cmd(tmp_path, settings, data_dir, out, processes: int):
    f = tmp_path / f"settings_{out.name}.json"
    f.write_text(json.dumps(settings))
    return [sys.executable, "-m", "dpdm", "train", "--settings", str(f), "--data", str(data_dir), "--out", str(out),
            "--procs-per-node", str(processes)]  # more than 1: it execs torchrun


def _run(cmd, tmp_path, **env):
    p = subprocess.run(cmd, env=subprocess_env(**env), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    return p


def _weights(out: Path) -> dict:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)


def _close(a: dict, b: dict, rtol=1e-4, atol=1e-5) -> None:
    for part in ("model", "ema"):
        for name, t in a[part].items():
            torch.testing.assert_close(t, b[part][name], rtol=rtol, atol=atol, msg=f"{part}.{name}")


@pytest.mark.slow
def test_two_ranks_train_the_same_model_as_one(tmp_path, digits16):
    """2 torchrun ranks (gloo, CPU) vs one process, DPDM_DP_SEED fixed: same ledger, weights
    equal to float rounding (the clipped sums of two shards are added in another order)."""
    settings = tiny_settings(max_steps=6)
    one, two = tmp_path / "one", tmp_path / "two"
    for out, n in ((one, 1), (two, 2)):
        p = _run(_train_cmd(tmp_path, settings, digits16, out, n), tmp_path, DPDM_DP_SEED="11")
        assert p.returncode == 0, p.stderr[-3000:]
    l1, l2 = (json.loads((o / "privacy.json").read_text()) for o in (one, two))
    for key in ("steps", "noise_multiplier", "sample_rate", "eps_rdp", "eps_prv", "history"):
        assert l1[key] == l2[key], key
    _close(_weights(one), _weights(two))
    # the tolerance is far tighter than the noise: another draw of it (another DP seed)
    # is caught, as would be the noise added on both ranks (twice its variance)
    other = tmp_path / "other"
    p = _run(_train_cmd(tmp_path, settings, digits16, other, 1), tmp_path, DPDM_DP_SEED="12")
    assert p.returncode == 0, p.stderr[-3000:]
    with pytest.raises(AssertionError):
        _close(_weights(one), _weights(other))


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_resumes_on_one(tmp_path, digits16):
    """SIGTERM to torchrun: both ranks checkpoint at the same step; one process resumes it
    and ends where an uninterrupted single-process run ends (same DP seed)."""
    settings = tiny_settings(max_steps=8, log_every=1)
    ref, out = tmp_path / "ref", tmp_path / "cell"
    p = _run(_train_cmd(tmp_path, settings, digits16, ref, 1), tmp_path, DPDM_DP_SEED="5")
    assert p.returncode == 0, p.stderr[-3000:]
    proc = subprocess.Popen(_train_cmd(tmp_path, settings, digits16, out, 2), env=subprocess_env(DPDM_DP_SEED="5"),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path)
    head, rest = sigterm_after_line(proc, "dpdm.train INFO step 3/8", timeout=300)
    proc.wait(timeout=120)
    ckpt = out / "checkpoints" / "checkpoint.pt"
    assert ckpt.exists(), head + rest
    assert not (out / "model.pt").exists()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 3 <= step < 8
    p = _run(_train_cmd(tmp_path, settings, digits16, out, 1), tmp_path, DPDM_DP_SEED="5")
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-3000:]
    _close(_weights(ref), _weights(out))
    assert json.loads((out / "privacy.json").read_text())["steps"] == 8


def test_more_ranks_than_examples_per_batch_are_refused(tmp_path, digits16):
    settings = tiny_settings(max_steps=2, batch_size=1)  # q N = 1 example per batch, 2 ranks
    p = _run(_train_cmd(tmp_path, settings, digits16, tmp_path / "cell", 2), tmp_path)
    assert p.returncode != 0
    assert "2 processes for an expected logical batch of 1.0 examples" in p.stderr + p.stdout
    assert not (tmp_path / "cell" / "model.pt").exists()


# ----------------------------------------------------------------------------
# Through the workflow's train rule.


def _workdir(tmp_path, name: str, extra: str) -> Path:
    from test_workflow import copy_workflow

    (tmp_path / name).mkdir()
    work = copy_workflow(tmp_path / name)
    (work / "extra.yaml").write_text(extra)
    return work


def _dry_run_train(work: Path) -> tuple[str, str, str]:
    """The summary line, the train job's shell command and its resources in `snakemake -n
    -p --profile slurm`."""
    from test_workflow import run_snakemake

    p = run_snakemake(["-n", "-p", "--profile", "slurm", "results/mnist/eps10/seed0/model.pt",
                       "--configfile", "config/config.yaml", "extra.yaml"], cwd=work)
    out = p.stdout + p.stderr
    summary = re.search(r"^dpdm: \d+ models to train[^\n]*", out, re.M)
    resources = re.search(r"rule train:.*?resources: ([^\n]*)", out, re.S)
    shell = re.search(r"exec python -m dpdm train [^\n]*", out)
    assert summary and resources and shell, out[-3000:]
    return summary.group(0), shell.group(0), resources.group(1)


def test_the_slurm_dry_run_shows_the_process_counts_and_the_gpu_request(tmp_path):
    """`snakemake -n -p --profile slurm`: with resources.train.gpu 8 the train job asks
    SLURM for 8 GPUs and tells `python -m dpdm train` to start 8 processes (it execs
    torchrun: test_torchrun_commands_*), and the summary line names that torchrun launch;
    on 2 nodes, 4 per node, an srun job of one task per node with the per-node GPU request."""
    summary, shell, resources = _dry_run_train(_workdir(tmp_path, "gpu8", "resources:\n  train: {gpu: 8}\n"))
    assert "each training: torchrun --nproc-per-node=8 on 1 node(s) --standalone" in summary
    assert "--procs-per-node 8 --nodes 1" in shell
    for want in ("gpu=8", "procs_per_node=8", "proc_nodes=1"):
        assert want in resources, (want, resources)
    assert "mpi=srun" not in resources
    summary, shell, resources = _dry_run_train(_workdir(tmp_path, "nodes2",
                                                        "resources:\n  train: {gpu: 8, nodes: 2}\n"))
    assert "each training: torchrun --nproc-per-node=4 on 2 node(s) under srun, c10d rendezvous" in summary
    assert "--procs-per-node 4 --nodes 2" in shell
    for want in ("gpu=8", "nodes=2", "mpi=srun", "tasks=2", "tasks_per_gpu=0", "--gpus-per-node=4",
                 "procs_per_node=4", "proc_nodes=2"):
        assert want in resources, (want, resources)


@pytest.mark.slow
def test_the_train_rule_with_two_processes_matches_one(tmp_path):
    """The real train rule (local executor) with resources.train.processes 2 and with 1, the
    same DP seed: same ledger, the same weights to float rounding. The process count is a
    resource, not a rerun trigger: the finished 2-process cell is up to date for 1 process."""
    from test_workflow import run_snakemake

    cell = "datasets:\n  digits:\n    cells:\n      10: {train: {max_steps: 6}}\n"
    target = "results/smoke/digits/eps10/seed0/model.pt"
    outs = {}
    for n in (1, 2):
        work = _workdir(tmp_path, f"p{n}", cell + f"resources:\n  train: {{processes: {n}, cpus_per_task: {n}}}\n")
        p = run_snakemake([target, "--cores", "2", "--configfile", "config/smoke.yaml", "extra.yaml"], cwd=work,
                          env={"DPDM_DP_SEED": "3"})
        outs[n] = work / "results" / "smoke" / "digits" / "eps10" / "seed0"
        log = (outs[n] / "logs" / "train.log").read_text()
        launched = "torch.distributed.run --nnodes=1 --nproc-per-node=2 --standalone --no-python" in log
        assert launched == (n == 2), log[-3000:]
    l1, l2 = (json.loads((o / "privacy.json").read_text()) for o in outs.values())
    assert l1["steps"] == l2["steps"] == 6
    for key in ("noise_multiplier", "sample_rate", "eps_rdp", "eps_prv", "history"):
        assert l1[key] == l2[key], key
    _close(_weights(outs[1]), _weights(outs[2]))
    (work / "extra.yaml").write_text(cell + "resources:\n  train: {processes: 1, cpus_per_task: 1}\n")
    p = run_snakemake(["-n", target, "--configfile", "config/smoke.yaml", "extra.yaml"], cwd=work)
    assert "Nothing to be done" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]


def test_a_gpu_rank_on_a_node_without_cuda_is_refused(monkeypatch):
    """torchrun's environment asks for 2 ranks, the config for CUDA, the node has none:
    a clear error before any process group is joined."""
    from dpdm import privacy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DPDMError, match="no CUDA: request GPUs"):
        with privacy.process_group_from_env("cuda"):
            pass
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a plain single process: nothing to join, nothing refused
    with privacy.process_group_from_env("cuda"):
        assert not torch.distributed.is_initialized()
