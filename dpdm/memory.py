"""How a CPU process keeps freed memory (glibc malloc), so training steps do not fault
their tensors in afresh; see `keep_freed_memory` and docs/benchmarks.md."""

from __future__ import annotations

import os


KEEP_FREED_MEMORY_ENV = "DPDM_KEEP_FREED_MEMORY"
_freed_memory_kept = False


def _libc(name: str):
    """glibc's function `name`, or None (macOS, musl, ...)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process (True if it took effect).

    A CPU training step allocates and frees gigabytes of tensors. By default glibc
    maps every large block (above a threshold that starts at 128 KiB and rises to at
    most 32 MiB) afresh and unmaps it on free, so each step faults its memory in again
    as zero-filled pages: on the 2-core CI machine 3.3 GiB and a fifth of a DP step's
    time (docs/benchmarks.md). Reusing the memory, as CUDA's caching allocator does,
    changes no result, only when the OS gets memory back: at exit, not at each free.
    Set DPDM_KEEP_FREED_MEMORY=0 to keep glibc's defaults; other C libraries are left
    alone."""
    global _freed_memory_kept
    mallopt = _libc("mallopt")
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0" or mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # Blocks up to 1 GiB come from the heap, and up to 2 GiB of free heap stays mapped.
    _freed_memory_kept = bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))
    return _freed_memory_kept


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory took effect in this process."""
    return _freed_memory_kept


def release_freed_memory() -> None:
    """Give the process's free heap memory back to the OS now (glibc malloc_trim): after
    keep_freed_memory a process holds its peak, so call this between phases of different
    sizes, e.g. before starting a child process that needs the memory."""
    malloc_trim = _libc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
