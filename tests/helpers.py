"""What several test modules share: where the repository and the shared raw data are, and
the environment of a `python -m dpdm` subprocess."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPDM_SHARED_DATA") or REPO.parent / "shared" / "data")
# The suite's smoke run: README's (config/smoke.yaml) with issue 17's fine-tuning miniature
# layered on; every command on a smoke run's folder names both.
SMOKE_CONFIGS = ["config/smoke.yaml", "config/smoke-finetune.yaml"]


def subprocess_env(**extra: str) -> dict:
    """os.environ for a child python that imports this checkout's dpdm (and tests/ helpers),
    on one thread, with no fixed DP seed unless `extra` sets one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **extra}
    if "DPDM_DP_SEED" not in extra:
        env.pop("DPDM_DP_SEED", None)
    return env


def sigterm_after_line(proc, marker: str, timeout: float = 120) -> tuple[str, str]:
    """Read `proc`'s stderr until a line holds `marker`, send SIGTERM, then read the rest:
    (the text up to and including that line, the rest)."""
    import signal
    import time

    lines, deadline = [], time.time() + timeout
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines)
    return "".join(lines), proc.stderr.read()
