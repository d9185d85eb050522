"""Writing results safely and saying what produced them.

Every output file is written to a temporary name beside its destination and renamed
into place only when complete (`atomic_path`), so an interrupted job never leaves a
file that looks finished. Every result JSON carries a provenance block
(`provenance`): the cell, the resolved settings, the package version, a hash of the
inputs, wall time and the device.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dpdm import __version__
from dpdm.devices import device_name
from dpdm.errors import DPDMError  # noqa: F401 - re-exported: most modules import it from here


# ----------------------------------------------------------------------------
# Atomic writes.


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to `path`, on error delete it.

    The temporary file lives in the destination's folder (same filesystem, so the
    rename is atomic) and keeps the destination's suffix (numpy/matplotlib infer the
    format from it). The result gets the mode a plain `open` would give it (0666 less
    the umask, so teammates on a shared cluster can read results), except inside the
    private folders (PRIVATE_DIRS), which stay 0600 (mkstemp's mode), deliberately.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if not is_private(path):
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in WRITE_ERRNOS:  # disk full, quota, permissions: name the file, not a byte offset
            raise write_error(path, e) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def write_error(path: str | os.PathLike, error: BaseException) -> DPDMError:
    """A DPDMError saying which file could not be written, why, and how much space is left."""
    import shutil

    reason = getattr(error, "strerror", None) or str(error)
    try:
        free = shutil.disk_usage(Path(path).parent).free
        where = f"; {free / 2**20:.0f} MiB free on its filesystem"
    except OSError:
        where = ""
    return DPDMError(f"cannot write {path}: {reason}{where}. Free space or fix the permissions, then rerun; "
                     "nothing half-written was left in its place")


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Create `folder` and write a probe file in it, so a read-only or missing output
    location fails before the compute, not after."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DPDMError(f"cannot write the {what} {folder}: {e.strerror or e}; choose a writable location or fix "
                        "its permissions (checked before any compute)") from e


@contextlib.contextmanager
def staged_outputs(out_dir: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Write a result's files into a staging folder inside `out_dir` (same relative
    names), then move them into place: the old `marker` (the file whose presence says
    "finished", e.g. privacy.json) is removed first and the new one moved in last. So
    `out_dir` holds the whole old result until the new one is complete, never a mix
    marked finished; on an error the staging folder is deleted and `out_dir` is untouched."""
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        yield stage
        files = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
        if (out_dir / marker).exists():
            (out_dir / marker).unlink()
        for rel in sorted(files, key=lambda r: r == Path(marker)):  # the marker last
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, out_dir / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a POSIX lock on folder/.lock, released by the
    kernel when the process dies, so it is never stale). A second holder gets a
    DPDMError naming the first one's pid and host."""
    import fcntl
    import socket

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise DPDMError(f"{what} {folder} is in use by {holder} (lock {path}); wait for it to finish or stop "
                            "it; two runs of one cell would overwrite each other's checkpoint") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.lockf(f, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def save_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def torch_load_error(e: BaseException) -> str:
    """A one-line reason why torch.load failed (its own messages run to a page)."""
    first = (str(e).strip().splitlines() or [""])[0]
    if "weights_only" in first or "Weights only" in first:
        first = "not a file written by dpdm with torch.save"
    return f"{type(e).__name__}: {first[:200]}"


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; DPDMError (naming the file) when it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DPDMError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DPDMError(f"{path} is not a readable JSON file ({type(e).__name__}: {e}); "
                        "delete it and rerun the step that writes it") from e


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Like np.savez (uncompressed), but atomic and byte-reproducible (fixed zip
    timestamps), so equal arrays give equal file checksums."""
    import zipfile

    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, arr in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's writer reports a full disk as "unexpected pos ..."
            raise write_error(path, e) from e


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars, paths and tuples into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


# ----------------------------------------------------------------------------
# Hashing and provenance.


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, cached per (path, size, mtime) for the life of the process (the
    FID weights and the training data are hashed by several steps of one command)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (keys sorted)."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# Private side of the results: folders whose files hold private data, statistics of it
# computed without noise, or the mechanism's secret randomness. Everything else under
# paths.results may be published (it is the DP mechanism's output or post-processing of
# it with public or test data), so it must hold no fingerprint of a private file.
PRIVATE_DIRS = ("private", "checkpoints", "logs", "benchmarks")


def is_private(path: str | os.PathLike) -> bool:
    """Whether `path` lies in a private folder (PRIVATE_DIRS) of the results tree."""
    return any(part in PRIVATE_DIRS for part in Path(path).parts)


def provenance(
    *,
    cell: dict | None = None,
    settings: dict | None = None,
    inputs: list[str | os.PathLike] | None = None,
    private_inputs: list[str | os.PathLike] | None = None,
    started: float | None = None,
    device: Any = None,
) -> dict:
    """The block that every output JSON carries under the key "provenance".

    `inputs` are public (samples, the model, the test split): recorded with their
    sha256. `private_inputs` (the training split and anything computed from it without
    noise) are recorded by path only: a hash of a private file would let anyone who knows
    all records but one test which candidate completes the training set."""
    import torch

    inputs = [Path(p) for p in (inputs or [])]
    return {
        "dpdm_version": __version__,
        "torch_version": torch.__version__,
        "cell": cell,
        "settings": settings,
        "inputs": {str(p): sha256_file(p) for p in inputs if p.is_file()},
        "private_inputs": [str(p) for p in (private_inputs or [])],
        "wall_time_s": None if started is None else round(time.time() - started, 3),
        "device": device_name(device),
        "host": platform.node(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------
# Seeds.


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
