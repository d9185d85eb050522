"""The workflow on a real SLURM: tests/slurm/start-cluster.sh starts a single-node
cluster on this machine (root; installs slurm-wlm with apt when missing), and the
workflow runs through the profile users run, `--profile slurm`, plus the CI overlay
`--profile workflow/profiles/slurm-ci` (later profiles override earlier ones key by key).
The tests check what SLURM did (`scontrol show job` records, polled while the workflow
runs) and what Snakemake printed, not only the outputs:

- the smoke workflow completes; every non-local rule ran as a SLURM job with its own log;
  GPU rules went to the `gpu` partition (the profile's; the cluster default is `cpu`)
  with a GPU request; the outputs are those of the local run;
- a training job that hits its time limit gets the warning signal, checkpoints, exits 75
  through the whole job chain, and Snakemake's retry (longer limit) resumes it from the
  checkpoint; the privacy ledger counts every step once;
- a failing job's SLURM log, whose path Snakemake prints, exists and holds the error.

Every Snakemake run is bounded by a timeout that interrupts Snakemake (which cancels its
jobs), then kills it, then cancels any job left in its folder. Skipped, with the reason,
where SLURM cannot be started (not root, no apt, a SLURM that is not ours), or failed
where DPDM_REQUIRE_SLURM=1 (CI); DPDM_SKIP_SLURM=1 skips them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_workflow import copy_workflow, job_counts  # noqa: E402

from helpers import REPO, SMOKE_CONFIGS  # tests/helpers.py

SLURM_DIR = REPO / "tests" / "slurm"
MAIN_PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.v9+.yaml"
CI_PROFILE = REPO / "workflow" / "profiles" / "slurm-ci" / "config.v9+.yaml"
PROFILE_ARGS = ["--profile", "slurm", "--profile", "workflow/profiles/slurm-ci"]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# The only keys the CI overlay may set: timings and log retention, nothing a user's run
# depends on (executor, partition, resources, retries, status command come from the
# main profile, so the main profile is what runs here).
CI_KEYS = {
    "slurm-init-seconds-before-status-checks",
    "seconds-between-status-checks",
    "slurm-keep-successful-logs",
    "latency-wait",
}
LOCAL_RULES = {"prepare", "fetch_fid_weights", "report_manifest", "report", "ablation", "ablations", "audit_report",
               "audit", "all"}
GPU_RULES = {"fid_reference", "pretrain", "train", "sample", "fid", "classify", "baseline", "train_judge",
             "judge"}
CPU_RULES = {"audit_cell", "memorisation"}  # cluster jobs that ask for no GPU

SMOKE_TIMEOUT = int(os.environ.get("DPDM_SLURM_SMOKE_TIMEOUT", 1200))
PREEMPT_TIMEOUT = 480
FAIL_TIMEOUT = 240
# Training work of the time-limit test, in seconds: more than the 20-50 s after which
# SLURM sends the warning of a 1-minute limit, less than what the first two attempts
# (limits 1 and 2 minutes) can do together.
PREEMPT_TRAIN_SECONDS = 55
EXIT_CHECKPOINTED = 75  # dpdm.train.EXIT_CHECKPOINTED

# Pending reasons of a job that no node or partition of the cluster can ever run.
NEVER_RUNS = {"PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "BadConstraints",
              "InvalidAccount", "InvalidQOS"}

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.?$", re.M)


# ----------------------------------------------------------------------------
# Static checks (no cluster): the overlay changes only CI keys; the train rule's
# warning signal reaches training (see test_time_limit_* for the real thing).


def test_ci_overlay_changes_only_ci_keys():
    main = yaml.safe_load(MAIN_PROFILE.read_text())
    ci = yaml.safe_load(CI_PROFILE.read_text())
    extra = set(ci) - CI_KEYS
    assert not extra, f"the CI overlay sets {sorted(extra)}: only {sorted(CI_KEYS)} may differ from the main profile"
    assert main["executor"] == "slurm"
    # Without slurmdbd, sacct cannot answer and the plugin loses its jobs: squeue works everywhere.
    assert main["slurm-status-command"] == "squeue"
    assert main["default-resources"]["slurm_partition"] == "gpu"


def _train_slurm_extra(path: Path) -> str:
    return yaml.safe_load(path.read_text())["resources"]["train"]["slurm_extra"]


@pytest.mark.parametrize("config", ["dpdm/defaults.yaml", "config/smoke.yaml"])
def test_train_asks_for_a_sigterm_warning_that_reaches_training(config):
    """SLURM sends --signal (without B:) to every process of the job's steps: the
    jobstep Snakemake, the rule's shell and python. SIGUSR1 kills Snakemake and bash
    (default action), the step ends and SLURM kills training mid-checkpoint (on
    proctrack/cgroup clusters; on CI's linuxproc the orphan escapes). SIGTERM makes
    Snakemake wait for its job; `exec` makes python the shell, so nothing else dies."""
    extra = _train_slurm_extra(REPO / config)
    assert re.fullmatch(r"--signal=(SIG)?TERM@\d+", extra.strip()), (
        f"{config}: train slurm_extra is {extra!r}; use --signal=TERM@<seconds> (not USR1, not B:)")
    shell = re.search(r"rule train:.*?shell:\s*\n\s*\"([^\"]*)\"", (REPO / "rules/train.smk").read_text(), re.S)
    assert shell and shell.group(1).startswith("exec "), (
        "rules/train.smk: the train shell command must start with `exec ` so that python replaces bash "
        "and the warning signal does not kill the shell around it")


# ----------------------------------------------------------------------------
# The cluster and helpers.


def _cannot_start(reason: str):
    """Skip, or fail where SLURM is required (DPDM_REQUIRE_SLURM=1, set by .ci/run)."""
    if os.environ.get("DPDM_REQUIRE_SLURM"):
        pytest.fail(f"DPDM_REQUIRE_SLURM is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("DPDM_SKIP_SLURM"):
        pytest.skip("DPDM_SKIP_SLURM is set")
    if os.geteuid() != 0:
        _cannot_start("starting a SLURM cluster (tests/slurm/start-cluster.sh) needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        _cannot_start("SLURM is not installed and there is no apt-get to install it")
    try:
        p = subprocess.run(["bash", str(SLURM_DIR / "start-cluster.sh")], capture_output=True, text=True,
                           timeout=900)
    except subprocess.TimeoutExpired:
        _cannot_start("tests/slurm/start-cluster.sh did not finish within 900 s")
    if p.returncode in (2, 3):  # not root / no apt / install failed; a SLURM that is not ours
        _cannot_start(f"SLURM cannot be started here: {p.stderr.strip()[-600:]}")
    assert p.returncode == 0, f"tests/slurm/start-cluster.sh failed ({p.returncode}):\n{p.stderr[-4000:]}"
    started = p.stdout.strip().endswith("started")
    yield
    if started:
        subprocess.run(["bash", str(SLURM_DIR / "stop-cluster.sh")], capture_output=True, timeout=120)


def _scontrol_records() -> dict[str, dict]:
    p = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, timeout=20)
    records = {}
    for line in p.stdout.splitlines():
        rec = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in rec:
            records[rec["JobId"]] = rec
    return records


class JobRecorder:
    """Polls `scontrol show job` while a workflow runs and keeps the latest record of each
    job run from `workdir` (finished jobs stay visible for MinJobAge = 600 s; polling
    keeps them for runs longer than that)."""

    def __init__(self, workdir: Path, every: float = 2.0):
        self.workdir, self.every = str(workdir), every
        self.jobs: dict[str, dict] = {}
        self.never_runs: str | None = None  # set when SLURM says a job can never start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self):
        try:
            for jid, rec in _scontrol_records().items():
                if rec.get("WorkDir", "").startswith(self.workdir):
                    self.jobs[jid] = rec
                    if rec.get("JobState") == "PENDING" and rec.get("Reason") in NEVER_RUNS:
                        self.never_runs = (f"SLURM will never start job {jid} ({rec.get('Comment')}): pending "
                                           f"with reason {rec['Reason']} (TRES {rec.get('TRES')}, "
                                           f"time limit {rec.get('TimeLimit')})")
        except (subprocess.SubprocessError, OSError):
            pass

    def _run(self):
        while not self._stop.wait(self.every):
            self._poll()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll()


def _cancel_jobs_in(workdir: Path):
    p = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, timeout=20)
    ids = [line.split()[0] for line in p.stdout.splitlines()
           if len(line.split()) == 2 and line.split()[1].startswith(str(workdir))]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=20)


def run_bounded(args: list[str], cwd: Path, timeout: int, name: str, recorder: JobRecorder | None = None,
                extra_env: dict | None = None) -> tuple[int, str]:
    """Run snakemake in cwd with its output in cwd/<name>.out. Past `timeout` seconds, or
    as soon as the recorder sees a job SLURM will never start: SIGINT (Snakemake cancels
    its SLURM jobs), SIGKILL 30 s later, then scancel whatever is left in cwd, and fail."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.pop("DPDM_FID_WEIGHTS", None)
    env.update(extra_env or {})
    out = cwd / f"{name}.out"
    deadline = time.time() + timeout
    with open(out, "w") as f:
        proc = subprocess.Popen(SNAKEMAKE + args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        why = None
        while proc.poll() is None and why is None:
            if time.time() > deadline:
                why = f"did not finish within {timeout} s"
            elif recorder is not None and recorder.never_runs:
                why = recorder.never_runs
            else:
                time.sleep(1)
        if why:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _cancel_jobs_in(cwd)
            raise AssertionError(f"snakemake {' '.join(args)}: {why}; it was stopped. "
                                 f"Last output:\n{out.read_text()[-6000:]}")
    return proc.returncode, out.read_text()


def submissions(output: str) -> list[SimpleNamespace]:
    """The jobs Snakemake submitted to SLURM: rule, SLURM job id and the log it printed."""
    subs = []
    for m in SUBMITTED.finditer(output):
        log = Path(m.group(3))
        rule = re.search(r"/rule_([^/]+)/", str(log))
        subs.append(SimpleNamespace(jobid=m.group(2), log=log, rule=rule.group(1) if rule else None))
    return subs


def _assert_ok(rc: int, output: str, what: str):
    assert rc == 0, f"{what} failed ({rc}):\n{output[-8000:]}"


# ----------------------------------------------------------------------------
# The smoke workflow through the slurm profile.


@pytest.fixture(scope="module")
def slurm_smoke(cluster, tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("slurm_smoke"))
    t0 = time.time()
    with JobRecorder(work) as rec:
        rc, out = run_bounded(["all", *PROFILE_ARGS, "--configfile", *SMOKE_CONFIGS, str(SLURM_DIR / "ci.yaml")],
                              work, SMOKE_TIMEOUT, "smoke", rec)
    return SimpleNamespace(work=work, rc=rc, out=out, jobs=rec.jobs, seconds=time.time() - t0)


@pytest.mark.slow
@pytest.mark.workflow
def test_smoke_workflow_completes_through_the_slurm_profile(slurm_smoke):
    s = slurm_smoke
    _assert_ok(s.rc, s.out, "the smoke workflow on SLURM")
    assert "Using profiles slurm and workflow/profiles/slurm-ci" in s.out
    print(f"smoke workflow on SLURM: {s.seconds:.0f} s, {len(s.jobs)} SLURM jobs")
    # Everything the local run makes is there and up to date: a local dry run has nothing to do.
    p = subprocess.run(SNAKEMAKE + ["-n", "all", "--configfile", *SMOKE_CONFIGS], cwd=s.work,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Nothing to be done" in p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    results = s.work / "results" / "smoke"
    for name in ("table1", "table2", "privacy"):
        assert r"\toprule" in (results / "tables" / f"{name}.tex").read_text()
        assert (results / "tables" / f"{name}.csv").stat().st_size > 0
    for name in ("fid_vs_eps", "acc_vs_eps", "samples_digits"):
        assert (results / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (results / "figures" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    import numpy as np

    for f in results.rglob("*"):
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".npz":
            with np.load(f) as z:
                assert z.files, f
    cell = results / "digits" / "eps10" / "seed0"
    for f in ("model.pt", "privacy.json", "private/train_metrics.csv", "samples_fid.npz", "grid_fid.png",
              "fid_fid.json", "classify_acc_cnn.json", "judge_acc.json", "logs/train.log", "benchmarks/train.tsv"):
        assert (cell / f).is_file(), f


@pytest.mark.slow
@pytest.mark.workflow
def test_every_cluster_rule_ran_as_a_slurm_job_with_its_own_log(slurm_smoke):
    s = slurm_smoke
    _assert_ok(s.rc, s.out, "the smoke workflow on SLURM")
    counts = job_counts(s.out)
    subs = submissions(s.out)
    by_rule: dict[str, int] = {}
    for sub in subs:
        by_rule[sub.rule] = by_rule.get(sub.rule, 0) + 1
    expected = {r: n for r, n in counts.items() if r not in LOCAL_RULES}
    assert by_rule == expected, f"SLURM jobs per rule {by_rule}, workflow jobs {counts}"
    # 2 main cells + the K1 ablation model + the fine-tuning miniature's 2 models (one public
    # model pre-trained for them); 2 cells x 2 samplers x 2 classifiers + a CNN for each of the 3
    # ablation models.
    assert expected.get("train") == 5 and expected.get("pretrain") == 1
    assert expected.get("classify") == 11 and expected.get("judge") == 7
    for sub in subs:
        # .snakemake/slurm_logs/rule_<rule>/<wildcards>/<jobid>.log, kept (slurm-keep-successful-logs).
        assert sub.log.is_file() and sub.log.name == f"{sub.jobid}.log", sub.log
        assert sub.log.is_relative_to(s.work / ".snakemake" / "slurm_logs" / f"rule_{sub.rule}")
        text = sub.log.read_text()
        assert re.search(rf"^localrule {sub.rule}:", text, re.M), f"{sub.log} does not show rule {sub.rule} running"
        rec = s.jobs.get(sub.jobid)
        assert rec, f"SLURM has no record of job {sub.jobid} ({sub.rule})"
        assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", rec
        assert rec["Comment"].startswith(f"rule_{sub.rule}"), rec
    assert len(s.jobs) == len(subs), f"SLURM ran {len(s.jobs)} jobs from the workflow folder, Snakemake submitted {len(subs)}"


@pytest.mark.slow
@pytest.mark.workflow
def test_gpu_rules_ran_in_the_gpu_partition_with_a_gpu(slurm_smoke):
    s = slurm_smoke
    _assert_ok(s.rc, s.out, "the smoke workflow on SLURM")
    part = subprocess.run(["scontrol", "-o", "show", "partition", "cpu"], capture_output=True, text=True).stdout
    assert "Default=YES" in part, "the CI cluster's default partition should be cpu, so the profile's choice shows"
    subs = submissions(s.out)
    assert {sub.rule for sub in subs} == GPU_RULES | CPU_RULES
    for sub in subs:
        rec = s.jobs[sub.jobid]
        assert rec["Partition"] == "gpu", (sub.rule, rec)  # the profile's default partition
        gpu = re.search(r"gres[:/]gpu[:=]1\b", rec.get("TresPerJob", "") + rec.get("TresPerNode", ""))
        assert bool(gpu) == (sub.rule in GPU_RULES), (sub.rule, rec)
    # The smoke config's sizes arrive: e.g. train asks for 10 min and 4000 MB.
    train = [s.jobs[sub.jobid] for sub in subs if sub.rule == "train"]
    assert all(r["TimeLimit"] == "00:10:00" and r["MinMemoryNode"] == "4000M" for r in train), train


# ----------------------------------------------------------------------------
# A time limit: warning signal, checkpoint, retry with a longer limit, exact resume.


def _write_preempt_config(work: Path, max_steps: int, results: str) -> Path:
    cfg = yaml.safe_load((SLURM_DIR / "preempt.yaml").read_text())
    # The smoke config's warning signal, sent 10 s before the 1-minute limit.
    extra = _train_slurm_extra(REPO / "config" / "smoke.yaml")
    cfg["resources"]["train"]["slurm_extra"] = re.sub(r"@\d+", "@10", extra)
    cfg["datasets"]["digits"]["settings"]["train"]["max_steps"] = int(max_steps)
    cfg["paths"]["results"] = results
    path = work / f"{Path(results).name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _train_seconds_per_step(metrics: Path) -> float:
    rows = list(csv.DictReader(metrics.open()))
    first, last = rows[0], rows[-1]
    return (float(last["seconds"]) - float(first["seconds"])) / (int(last["step"]) - int(first["step"]))


@pytest.fixture(scope="module")
def preempted(cluster, tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("slurm_preempt"))
    # Calibrate: a short local training run of the same cell measures seconds per step,
    # so that the SLURM run trains for about PREEMPT_TRAIN_SECONDS on this machine.
    calib = _write_preempt_config(work, 30, "results/calib")
    rc, out = run_bounded(["results/calib/digits/eps10/seed0/model.pt", "--cores", "1", "--configfile", calib.name],
                          work, 300, "calibrate")
    _assert_ok(rc, out, "the calibration run")
    per_step = _train_seconds_per_step(work / "results/calib/digits/eps10/seed0/private/train_metrics.csv")
    max_steps = max(40, min(20000, math.ceil(PREEMPT_TRAIN_SECONDS / per_step)))
    cfg = _write_preempt_config(work, max_steps, "results/preempt")
    cell = work / "results/preempt/digits/eps10/seed0"
    t0 = time.time()
    with JobRecorder(work) as rec:
        rc, out = run_bounded([str(cell.relative_to(work) / "model.pt"), *PROFILE_ARGS, "--configfile", cfg.name],
                              work, PREEMPT_TIMEOUT, "preempt", rec)
    return SimpleNamespace(work=work, cell=cell, rc=rc, out=out, jobs=rec.jobs, max_steps=max_steps,
                           per_step=per_step, seconds=time.time() - t0)


@pytest.mark.slow
@pytest.mark.workflow
def test_time_limit_checkpoints_retries_with_a_longer_limit_and_resumes(preempted):
    p = preempted
    _assert_ok(p.rc, p.out, "the time-limit run")
    print(f"time-limit run: {p.seconds:.0f} s, {p.max_steps} steps at {p.per_step:.3f} s/step")
    trains = [sub for sub in submissions(p.out) if sub.rule == "train"]
    assert len(trains) >= 2, f"training was never stopped by its time limit (one job): {p.out[-4000:]}"
    recs = [p.jobs[sub.jobid] for sub in trains]
    # Attempt k runs under a limit of k minutes; all but the last were stopped, the last completed.
    assert [r["TimeLimit"] for r in recs] == [f"00:0{k}:00" for k in range(1, len(recs) + 1)], recs
    assert all(r["Partition"] == "gpu" for r in recs)
    assert [r["JobState"] for r in recs[:-1]] == ["FAILED"] * (len(recs) - 1), recs
    assert recs[-1]["JobState"] == "COMPLETED", recs[-1]
    # Training's exit status 75 (checkpointed, retry me) came back through bash and the
    # jobstep Snakemake: nothing between SLURM and python died of the signal.
    for sub in trains[:-1]:
        text = sub.log.read_text()
        assert f"non-zero exit status {EXIT_CHECKPOINTED}" in text, (
            f"{sub.log}: training did not exit {EXIT_CHECKPOINTED} through the job's shell "
            f"(was the shell or Snakemake killed by the signal?):\n{text[-3000:]}")
    # The retry resumed from the checkpoint, not from zero. (Snakemake empties a rule's log
    # when a job starts, so train.log holds the last attempt only; train_attempts.log keeps
    # every attempt under its header, as does each attempt's SLURM log under its job id.)
    log = (p.cell / "logs" / "train.log").read_text()
    resumed = [int(x) for x in re.findall(r"resumed from \S+ at step (\d+)/", log)]
    assert len(resumed) == 1 and 0 < resumed[0] < p.max_steps, (resumed, log[-3000:])
    attempts = (p.cell / "logs" / "train_attempts.log").read_text()
    headers = [int(x) for x in re.findall(r"^=== attempt (\d+): ", attempts, re.M)]
    assert headers == list(range(1, len(trains) + 1)), (headers, attempts[-3000:])
    assert attempts.count("received SIGTERM") == len(trains) - 1 and attempts.count("resumed from") == len(trains) - 1
    assert "from an earlier run" not in log
    # The ledger counts every step exactly once.
    ledger = json.loads((p.cell / "privacy.json").read_text())
    assert ledger["steps"] == ledger["planned_steps"] == p.max_steps
    assert sum(n for _, _, n in ledger["history"]) == p.max_steps
    assert ledger["eps_rdp"] <= ledger["target_eps"] * (1 + 1e-9)
    steps = [int(r["step"]) for r in csv.DictReader((p.cell / "private" / "train_metrics.csv").open())]
    assert steps == sorted(set(steps)) and steps[-1] == p.max_steps, steps
    assert not (p.cell / "checkpoints").exists()


# ----------------------------------------------------------------------------
# Issue 18: the train rule with 2 CPU ranks as one SLURM job.

TWO_RANKS_TIMEOUT = 420


def _ranks_config(work: Path, processes: int) -> Path:
    """The smoke's digits eps10 cell, 6 steps, in results/ranks{processes}, with
    resources.train asking for `processes` CPU ranks (no GPU) and as many CPUs."""
    cfg = {"paths": {"results": f"results/ranks{processes}"},
           "datasets": {"digits": {"cells": {10: {"train": {"max_steps": 6}}}}},
           "resources": {"train": {"gpu": 0, "processes": processes, "cpus_per_task": processes}}}
    path = work / f"ranks{processes}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def two_ranks(cluster, tmp_path_factory):
    """One process locally, then 2 ranks through the slurm profile, the same DP seed."""
    work = copy_workflow(tmp_path_factory.mktemp("slurm_ranks"))
    seed = {"DPDM_DP_SEED": "3"}
    config = ["--configfile", "config/smoke.yaml", str(SLURM_DIR / "ci.yaml")]
    one = _ranks_config(work, 1)
    rc, out = run_bounded(["results/ranks1/digits/eps10/seed0/model.pt", "--cores", "1", *config, one.name], work,
                          TWO_RANKS_TIMEOUT, "ranks1", extra_env=seed)
    _assert_ok(rc, out, "the one-process run")
    two = _ranks_config(work, 2)
    with JobRecorder(work) as rec:
        rc, out = run_bounded(["results/ranks2/digits/eps10/seed0/model.pt", *PROFILE_ARGS, *config, two.name], work,
                              TWO_RANKS_TIMEOUT, "ranks2", rec, extra_env=seed)
    return SimpleNamespace(work=work, rc=rc, out=out, jobs=rec.jobs)


@pytest.mark.slow
@pytest.mark.workflow
def test_the_train_rule_runs_two_ranks_in_one_slurm_job(two_ranks):
    """resources.train.processes 2: one SLURM job with 2 CPUs, in which `python -m dpdm
    train` execs torchrun with 2 gloo ranks; the ledger equals the one-process run's and
    the weights agree to float rounding (tests/test_launch.py: a tolerance that catches
    another noise draw)."""
    import torch

    t = two_ranks
    _assert_ok(t.rc, t.out, "the 2-rank run on SLURM")
    trains = [t.jobs[sub.jobid] for sub in submissions(t.out) if sub.rule == "train"]
    assert len(trains) == 1 and trains[0]["JobState"] == "COMPLETED", trains
    assert trains[0]["NumCPUs"] == "2", trains[0]
    cells = [t.work / f"results/ranks{n}/digits/eps10/seed0" for n in (1, 2)]
    log = (cells[1] / "logs" / "train.log").read_text()
    assert "torch.distributed.run --nnodes=1 --nproc-per-node=2 --standalone" in log, log[-3000:]
    assert "2 processes (world size 2, cpu)" in log, log[-3000:]
    l1, l2 = (json.loads((c / "privacy.json").read_text()) for c in cells)
    assert l1["steps"] == l2["steps"] == 6
    for key in ("noise_multiplier", "sample_rate", "eps_rdp", "eps_prv", "history"):
        assert l1[key] == l2[key], key
    w1, w2 = (torch.load(c / "model.pt", map_location="cpu", weights_only=True) for c in cells)
    for part in ("model", "ema"):
        for name, x in w1[part].items():
            torch.testing.assert_close(x, w2[part][name], rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")


# ----------------------------------------------------------------------------
# A failing job: the SLURM log whose path Snakemake prints exists and holds the error.


@pytest.fixture(scope="module")
def failed(cluster, tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("slurm_fail"))
    data = work / "results" / "smoke" / "private" / "data" / "digits"
    data.mkdir(parents=True)
    for name in ("train.npz", "test.npz"):
        (data / name).write_bytes(b"not an npz: broken on purpose by tests/test_slurm.py\n")
    (data / "meta.json").write_text("{}\n")
    with JobRecorder(work) as rec:
        rc, out = run_bounded(["results/smoke/private/data/digits/fid_train.npz", *PROFILE_ARGS, "--retries", "0",
                               "--configfile", "config/smoke.yaml", str(SLURM_DIR / "ci.yaml")],
                              work, FAIL_TIMEOUT, "fail", rec)
    return SimpleNamespace(work=work, rc=rc, out=out)


@pytest.mark.workflow
def test_a_failing_jobs_slurm_log_is_printed_and_holds_the_error(failed):
    f = failed
    assert f.rc != 0, f.out[-4000:]
    block = re.search(r"^Error in rule fid_reference:\n(.*?)^\s*external_jobid: (\d+)", f.out, re.S | re.M)
    assert block, f"no error report for fid_reference:\n{f.out[-4000:]}"
    assert "SLURM status is: 'FAILED'" in block.group(1)
    logs = re.search(r"^\s*log: (.*?) \(check log file", block.group(1), re.M).group(1).split(", ")
    slurm_logs = [Path(p) for p in logs if "/.snakemake/slurm_logs/" in p]
    assert slurm_logs, f"Snakemake printed no SLURM log: {logs}"
    slurm_log = slurm_logs[0]
    assert slurm_log.is_file() and slurm_log.name == f"{block.group(2)}.log", slurm_log
    text = slurm_log.read_text()
    assert "Error in rule fid_reference" in text and re.search(r"non-zero exit status [1-9]", text), text[-3000:]
    # The rule's own log (named in the SLURM log too) holds the cause.
    rule_log = f.work / "results/smoke/logs/fid_reference/digits_train.log"
    assert str(rule_log.relative_to(f.work)) in text
    cause = rule_log.read_text()
    assert "error" in cause.lower() and "train.npz" in cause, cause[-2000:]
