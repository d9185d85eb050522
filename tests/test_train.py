"""The training loop: outputs, ledger, exact resume after a signal or a crash, config guard."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpdm import config as cfg
from dpdm import privacy, train
from dpdm.artifacts import DPDMError
from helpers import sigterm_after_line, subprocess_env  # tests/helpers.py



@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from dpdm import data

    out = tmp_path_factory.mktemp("data") / "digits"
    data.prepare("digits", out_dir=out, download=False, digits_size=16)
    return out


def tiny_settings(**train_overrides) -> dict:
    config = cfg.load_config([])
    s = cfg.resolve_cell(config, "digits", 1, 0)
    s["device"] = "cpu"
    s["data"]["digits_size"] = 16
    s["model"].update(channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    s["train"].update(batch_size=32, epochs=2, noise_multiplicity=2, physical_batch_size=24, grad_chunk_size=16,
                      checkpoint_every=100, log_every=1)
    s["train"].update(train_overrides)
    return s


def _state(out: Path) -> dict:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)


def _metrics(out: Path) -> list[dict]:
    with open(out / train.METRICS_FILE) as f:
        return list(csv.DictReader(f))


def _signal_after(monkeypatch, step: int, signum=signal.SIGUSR1):
    """Deliver a real signal to this process right after DP step `step` completes."""
    original = privacy.DPSGD.step

    def step_then_signal(self, model, batch):
        stats = original(self, model, batch)
        if self.steps == step:
            os.kill(os.getpid(), signum)
        return stats

    monkeypatch.setattr(privacy.DPSGD, "step", step_then_signal)


def _crash_at(monkeypatch, step: int):
    original = privacy.DPSGD.step

    def step_or_crash(self, model, batch):
        if self.steps + 1 == step:
            raise RuntimeError("simulated node failure")
        return original(self, model, batch)

    monkeypatch.setattr(privacy.DPSGD, "step", step_or_crash)


def test_resume_after_signal_and_crash_is_exact(tmp_path, digits_dir, monkeypatch):
    settings = tiny_settings(max_steps=6, checkpoint_every=2)
    # Reference: 6 steps in one go (and only the train split is ever read).
    from dpdm import data

    splits = []
    load_split = data.load_split
    monkeypatch.setattr(data, "load_split", lambda d, split: splits.append(split) or load_split(d, split))
    ref = tmp_path / "ref"
    summary = train.train(settings, digits_dir, ref, dp_seed=1234)
    assert splits == ["train"]
    assert summary["steps"] == 6 and not (ref / "checkpoints").exists()

    # Interrupted: SIGUSR1 after step 3 -> checkpoint, exit 75; resume; crash before step 5
    # (periodic checkpoint at 4 survives); resume to the end.
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _signal_after(m, 3)
        with pytest.raises(SystemExit) as e:
            train.train(settings, digits_dir, out, dp_seed=1234)
    assert e.value.code == train.EXIT_CHECKPOINTED == 75
    ckpt = out / "checkpoints" / "checkpoint.pt"
    assert ckpt.exists()
    assert not any((out / f).exists() for f in ("model.pt", "privacy.json", train.METRICS_FILE))
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    assert not isinstance(signal.getsignal(signal.SIGUSR1), train.StopFlag)  # handlers restored
    with monkeypatch.context() as m:
        _crash_at(m, 5)
        with pytest.raises(RuntimeError, match="simulated"):
            train.train(settings, digits_dir, out)  # resumed: the checkpoint's generator state wins
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    assert not (out / "privacy.json").exists()
    train.train(settings, digits_dir, out)
    assert not ckpt.exists()

    a, b = _state(ref), _state(out)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    # EMA differs from the raw weights (it really is an average)
    assert any(not torch.equal(a["model"][n], a["ema"][n]) for n in a["model"])

    la, lb = (json.loads((d / "privacy.json").read_text()) for d in (ref, out))
    assert la["steps"] == lb["steps"] == 6  # each step counted once
    assert lb["history"] == [[la["noise_multiplier"], la["sample_rate"], 6]]
    assert la["eps_rdp"] == lb["eps_rdp"] and la["eps_prv"] == lb["eps_prv"]
    assert la["dp_randomness"].startswith("REPRODUCIBLE") and lb["dp_randomness"] == la["dp_randomness"]
    ma, mb = _metrics(ref), _metrics(out)
    assert [r["step"] for r in mb] == ["1", "2", "3", "4", "5", "6"]
    for ra, rb in zip(ma, mb):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


def test_ctrl_c_checkpoints_like_sigterm(tmp_path, digits_dir, monkeypatch):
    """Ctrl-C (SIGINT) finishes the step, checkpoints and exits 75; the rerun resumes."""
    settings = tiny_settings(max_steps=3)
    out = tmp_path / "cell"
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under `cmd &` in a script
    with monkeypatch.context() as m:
        _signal_after(m, 2, signal.SIGINT)
        with pytest.raises(SystemExit) as e:
            train.train(settings, digits_dir, out, dp_seed=7)
    assert e.value.code == train.EXIT_CHECKPOINTED
    assert torch.load(out / "checkpoints" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # restored
    assert train.train(settings, digits_dir, out, dp_seed=7)["steps"] == 3


def test_checkpoint_from_a_different_config_is_refused(tmp_path, digits_dir, monkeypatch):
    settings = tiny_settings(max_steps=3)
    out = tmp_path / "cell"
    with monkeypatch.context() as m:
        _signal_after(m, 1, signal.SIGTERM)
        with pytest.raises(SystemExit) as e:
            train.train(settings, digits_dir, out)
    assert e.value.code == train.EXIT_CHECKPOINTED
    ckpt = out / "checkpoints" / "checkpoint.pt"
    changed = tiny_settings(max_steps=3, lr=1e-3)
    with pytest.raises(DPDMError, match="different config") as err:
        train.train(changed, digits_dir, out)
    assert str(ckpt) in str(err.value) and "train.lr" in str(err.value) and "Delete" in str(err.value)
    assert ckpt.exists()  # never deleted behind the user's back
    # settings that cannot change the weights do not invalidate it
    harmless = tiny_settings(max_steps=3, log_every=2, physical_batch_size=8)
    harmless["samplers"] = {"x": {"kind": "ddim", "steps": 3}}
    summary = train.train(harmless, digits_dir, out)
    assert summary["steps"] == 3 and not ckpt.exists()


def test_dp_randomness_is_secret_by_default(tmp_path, digits_dir):
    """Two fresh runs of the same cell: same initial weights (cell seed), different
    Poisson batches and noise (OS entropy), so the published seed does not reveal them."""
    settings = tiny_settings(max_steps=2)
    a, b = tmp_path / "a", tmp_path / "b"
    train.train(settings, digits_dir, a)
    train.train(settings, digits_dir, b)
    ma, mb = _state(a)["model"], _state(b)["model"]
    assert any(not torch.equal(ma[n], mb[n]) for n in ma)
    for d in (a, b):
        assert json.loads((d / "privacy.json").read_text())["dp_randomness"].startswith("secret")


def test_plan_and_privacy_errors(digits_dir):
    s = tiny_settings()
    p = train.plan(s, 1000)
    assert p["sample_rate"] == pytest.approx(32 / 1000)
    assert p["planned_steps"] == privacy.steps_for(2, 32 / 1000) == 63
    assert privacy.spent_epsilon(p["noise_multiplier"], p["sample_rate"], 63, 1e-5) <= 1
    assert train.plan(tiny_settings(max_steps=5), 1000)["planned_steps"] == 5
    s_bad = tiny_settings()
    s_bad["privacy"]["delta"] = 1e-2
    with pytest.raises(DPDMError, match="delta"):
        train.train(s_bad, digits_dir, digits_dir.parent / "never")
    with pytest.raises(DPDMError, match="batch_size"):
        train.plan(tiny_settings(batch_size=5000), 1000)
    # the checkpoint hash ignores settings that do not affect training, and only those
    h = train.training_settings_hash(s)
    s2 = tiny_settings(log_every=7)
    s2["fid"] = {"extractor": "untrained"}
    assert train.training_settings_hash(s2) == h
    assert train.training_settings_hash(tiny_settings(noise_multiplicity=3)) != h


def test_cli_train_outputs_and_sigterm(tmp_path, digits_dir):
    """`python -m dpdm train`: a real SIGTERM -> checkpoint + exit 75; rerun -> finished cell."""
    settings = tiny_settings(max_steps=8)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(settings))
    out = tmp_path / "cell"
    attempts = tmp_path / "logs" / "train_attempts.log"
    cmd = [sys.executable, "-m", "dpdm", "train", "--settings", str(settings_file), "--data", str(digits_dir),
           "--out", str(out), "--log-file", str(attempts)]
    env = subprocess_env()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path)
    head, rest = sigterm_after_line(proc, "dpdm.train INFO step 2/8")
    rc = proc.wait(timeout=120)
    assert rc == train.EXIT_CHECKPOINTED, head + rest
    assert "SIGTERM" in rest
    assert (out / "checkpoints" / "checkpoint.pt").exists()
    assert not (out / "privacy.json").exists() and not (out / "model.pt").exists()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    assert not (out / "checkpoints").exists()
    # The attempts log keeps both runs, each under its header (Snakemake empties a rule's log per job).
    log_text = attempts.read_text()
    assert [int(x) for x in re.findall(r"^=== attempt (\d+): ", log_text, re.M)] == [1, 2], log_text
    first, second = log_text.split("=== attempt 2")
    assert "received SIGTERM" in first and "resumed from" in second and "done:" in second

    ledger = json.loads((out / "privacy.json").read_text())
    assert ledger["steps"] == ledger["planned_steps"] == 8
    assert ledger["num_examples"] == 1438 and ledger["sample_rate"] == pytest.approx(32 / 1438)
    assert ledger["eps_rdp"] == pytest.approx(privacy.spent_epsilon(ledger["noise_multiplier"], 32 / 1438, 8, 1e-5))
    assert ledger["eps_rdp"] <= ledger["target_eps"] == 1 and ledger["within_target"]
    assert ledger["eps_prv"] is not None and ledger["eps_prv"] <= ledger["eps_rdp"]
    assert ledger["noise_multiplicity"] == 2 and ledger["clip"] == 1.0 and ledger["seed"] == 0
    meta = json.loads((digits_dir / "meta.json").read_text())
    # the published ledger holds no fingerprint of the training data; the private run record does
    assert meta["npz_sha256"]["train.npz"] not in (out / "privacy.json").read_text()
    assert "sha256" not in json.dumps(ledger["provenance"])
    run = json.loads((out / train.PRIVATE_RUN_FILE).read_text())
    assert run["inputs"]["train.npz"] == meta["npz_sha256"]["train.npz"] and run["training_seconds"] > 0
    assert ledger["calibration"]["method"] == "tight" and ledger["accountants"]["prv"]["version"]
    assert ledger["provenance"]["cell"]["dataset"] == "digits"
    assert ledger["dp_randomness"].startswith("secret")  # no DPDM_DP_SEED: resumed from the checkpoint's state

    from dpdm import diffusion

    precond, s, info = diffusion.load_model(out / "model.pt")
    assert info["step"] == 8 and s["train"]["max_steps"] == 8
    rows = _metrics(out)
    assert list(rows[0]) == list(train.METRICS_COLUMNS)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert float(rows[-1]["eps_rdp"]) == pytest.approx(ledger["eps_rdp"], rel=1e-5)
    assert all(float(a["eps_rdp"]) < float(b["eps_rdp"]) for a, b in zip(rows, rows[1:]))


def test_ema_warms_up_so_a_short_run_samples_trained_weights(tmp_path, digits_dir):
    """With the paper's constant 0.999 a run of n steps keeps 0.999^n of the random initial
    weights in the EMA (98 % after 20 steps): short runs sampled noise. NVlabs/edm's ramp-up
    (half-life <= ema_rampup x images seen) makes the EMA follow the trained weights early,
    and reaches the paper's decay as the limit."""
    assert train.ema_decay_at(1, 64, 0.999, 0.05) < 1e-5  # half-life 0.05 steps: the EMA is the weights
    assert train.ema_decay_at(100, 64, 0.999, 0.05) == pytest.approx(0.5 ** (1 / 5))
    assert train.ema_decay_at(10 ** 6, 64, 0.999, 0.05) == 0.999  # the paper's value is the limit
    assert train.ema_decay_at(5, 64, 0.999, None) == train.ema_decay_at(5, 64, 0.999, 0) == 0.999
    steps = [train.ema_decay_at(t, 4096, 0.999, 0.05) for t in range(1, 20000, 97)]
    assert all(a <= b for a, b in zip(steps, steps[1:]))  # monotone ramp

    settings = tiny_settings(max_steps=20, ema_decay=0.999, ema_rampup=0.05)
    torch.manual_seed(settings["cell"]["seed"])
    from dpdm import diffusion

    init = diffusion.build_precond(settings, 16, 1, 10).state_dict()  # train's initial weights (same seed)
    train.train(settings, digits_dir, tmp_path / "cell", dp_seed=3)
    state = _state(tmp_path / "cell")

    def moved(weights):
        return sum(float((weights[k] - init[k]).norm()) for k in init if init[k].is_floating_point())

    # the EMA has left the initialisation nearly as far as the raw weights (constant 0.999: about 2 %)
    assert moved(state["ema"]) > 0.5 * moved(state["model"])


# ----------------------------------------------------------------------------
# A finished cell is never lost; one training per cell; no orphans (issue: first week).


def _hashes(out: Path) -> dict:
    import hashlib

    return {f: hashlib.sha256((out / f).read_bytes()).hexdigest()
            for f in ("model.pt", "privacy.json", train.METRICS_FILE, train.PRIVATE_RUN_FILE)}


def test_a_finished_cell_stays_until_its_replacement_is_complete(tmp_path, digits_dir, monkeypatch):
    settings = tiny_settings(max_steps=2)
    out = tmp_path / "cell"
    train.train(settings, digits_dir, out)
    finished = _hashes(out)
    # A rerun that crashes half-way (or is killed) leaves the finished cell as it was.
    with monkeypatch.context() as m:
        _crash_at(m, 2)
        with pytest.raises(RuntimeError, match="simulated node failure"):
            train.train(settings, digits_dir, out)
    assert _hashes(out) == finished
    # A disk that fills up while the outputs are written: the error names the file and
    # the reason (not torch's "unexpected pos"), and nothing of the new run is left.
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "model.pt" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1014272 vs 1014160")
        return real_save(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(DPDMError, match=r"cannot write .*model\.pt: .*unexpected pos.*MiB free"):
            train.train(settings, digits_dir, out)
    assert _hashes(out) == finished
    assert not list(out.glob(".staging-*")) and not list(out.rglob("*.tmp*"))
    # A complete rerun replaces every file (the DP randomness is secret: new weights).
    train.train(settings, digits_dir, out)
    new = _hashes(out)
    assert all(new[f] != finished[f] for f in ("model.pt", "privacy.json", train.PRIVATE_RUN_FILE)), new
    assert json.loads((out / "privacy.json").read_text())["steps"] == 2
    assert not list(out.glob(".staging-*"))


def _env():
    env = subprocess_env()
    return env


def test_one_training_per_cell(tmp_path, digits_dir):
    """A second training of a cell in use stops at once, naming the holder."""
    out = tmp_path / "cell"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dpdm.artifacts import exclusive_lock\n"
         f"with exclusive_lock({str(out)!r}, 'cell'):\n    print('locked', flush=True); time.sleep(120)"],
        env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        with pytest.raises(DPDMError, match=rf"cell {out} is in use by pid {holder.pid} on host \S+") as e:
            train.train(tiny_settings(max_steps=2), digits_dir, out)
        assert time.time() - t0 < 30 and "checkpoint" in str(e.value)
        assert not (out / "checkpoints").exists() and not (out / "model.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train.train(tiny_settings(max_steps=1), digits_dir, out)["steps"] == 1  # the kernel freed the lock


def test_training_checkpoints_and_stops_when_its_parent_dies(tmp_path, digits_dir):
    """Snakemake killed with -9: its train job must not run on as an orphan (that a rerun
    would duplicate); it checkpoints and exits like on SIGTERM."""
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(tiny_settings(epochs=100, max_steps=2000, checkpoint_every=1000)))
    out, log = tmp_path / "cell", tmp_path / "train.log"
    cmd = (f"{sys.executable} -m dpdm train --settings {settings_file} --data {digits_dir} --out {out} "
           f"--stop-with-parent > {log} 2>&1 & echo $!; wait")
    parent = subprocess.Popen(["bash", "-c", cmd], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.time() + 120
    while "INFO step 3/2000" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and parent.poll() is None, log.read_text()
        time.sleep(0.2)
    parent.kill()  # SIGKILL: the parent cannot pass anything on
    parent.wait()
    deadline = time.time() + 60
    while "exiting with status" not in log.read_text():
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)
    text = log.read_text()
    assert f"the death of the parent process (pid {parent.pid})" in text, text
    ck = torch.load(out / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert 3 <= ck["step"] < 2000
    status, deadline = Path(f"/proc/{child}/status"), time.time() + 60
    while status.exists() and "zombie" not in status.read_text():  # python's own shutdown takes a moment
        assert time.time() < deadline, "the orphan is still running"
        time.sleep(0.2)
