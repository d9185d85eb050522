"""dpdm.memory.keep_freed_memory: after it, a freed large tensor's memory is reused by
the next one instead of being faulted in afresh from the OS; DPDM_KEEP_FREED_MEMORY=0
keeps glibc's defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# In a fresh process: rounds of a training-like allocation pattern (two 64 MiB tensors,
# filled and freed); print the minor page faults of rounds 5-12 together: 8 x 32,768
# pages of 4 KiB if the memory went back to the OS at each free. With it kept, glibc
# settles within a few rounds (memalign leaves gaps) and then reuses the same pages;
# measured: now and then one stray 64 MiB block (16,384 faults) in rounds 5-8, none
# after.
CHILD = """
import resource, torch
from dpdm.memory import keep_freed_memory
kept = keep_freed_memory()
def round_():
    x = torch.empty(16 * 2**20, dtype=torch.float32)
    x.fill_(1.0)
    y = x * 2
    del x, y
for _ in range(4):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    round_()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value):
    env = dict(os.environ)
    env.pop("DPDM_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["DPDM_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_unless_switched_off():
    kept, faults = _faults(None)
    assert kept
    assert faults < 40000  # at most two stray blocks: the rounds reuse each other's pages
    kept, faults = _faults("0")
    assert not kept
    assert faults > 200000  # glibc's default: unmapped on free, faulted in again each round


RELEASE_CHILD = """
import torch
from dpdm.memory import keep_freed_memory, release_freed_memory
def rss_mb():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
keep_freed_memory()
xs = [torch.ones(2**24) for _ in range(16)]  # 16 x 64 MiB, below the 2 GiB kept at the top of the heap
del xs
held = rss_mb()
release_freed_memory()
print(held, rss_mb())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_gives_the_kept_memory_back():
    out = subprocess.run([sys.executable, "-c", RELEASE_CHILD], capture_output=True, text=True, check=True)
    held, after = map(int, out.stdout.split())
    assert held - after > 800  # most of the freed GiB went back to the OS
