"""The dataset registry, raw-file checksums, and the prepared npz files.

`prepare` turns the official raw files of a dataset into

    {out}/train.npz, {out}/test.npz   arrays `images` (uint8, N x H x W x C) and `labels` (int64)
    {out}/meta.json                   what was written and from what (written last)

Raw files live in `{raw_dir}/{dataset}/raw/<file>` (the layout of the shared data folder,
so `DPDM_RAW_DIR=/path/to/shared/data` works). Every raw file with a published checksum is
verified before it is read (sha256 where known, else md5). A file that does not match is an
error that names it; it is never silently re-used or downloaded over. Missing files are
downloaded when allowed (to a temporary name, verified, then renamed); otherwise one error
lists every missing file, its checksum, where to get it and where to put it.

Images stay uint8 on disk. Scaling to the model's range [-1, 1] happens at load time
(`to_model_range`); `to_uint8` is its inverse for samples.

The registry (`DATASETS`):

    mnist, fashion_mnist   28x28x1, 10 classes, the official idx .gz files (parsed here)
    cifar10                32x32x3, 10 classes, cifar-10-python.tar.gz
    imagenet32             32x32x3, 1000 classes, the official npz batches (public pre-training)
    camelyon17             32x32x3, 2 classes, WILDS v1.0 patches resized from 96x96, hospital splits
    celeba32               32x32x3, unconditional; img_align_celeba.zip + list_eval_partition.txt;
                           train = partition 0, test = partition 2 (validation unused);
                           centre crop 178x178 then PIL Lanczos resize to 32x32
    digits                 scikit-learn's bundled 8x8 digits, native or upscaled to 16x16 or 28x28
                           (bicubic), stratified 80/20 split with a fixed seed. For smoke
                           tests and CI: no download, seconds to train on a CPU.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dpdm import __version__
from dpdm.artifacts import DPDMError, check_writable, save_json, save_npz, sha256_file, staged_outputs

log = logging.getLogger("dpdm.data")

SPLITS = ("train", "test")
DEFAULT_RAW_DIR = Path("raw")
RAW_DIR_ENV = "DPDM_RAW_DIR"

# CelebA 32x32. The official DPDM code prepares CelebA with the StyleGAN3 `dataset_tool.py`
# it ships (its README uses `--transform=center-crop` and reads `data/processed/celeba.zip`
# through StyleGAN3's ImageFolderDataset). That transform crops the largest centred square
# (178x178 of the 178x218 aligned images: rows 20..197, full width) and resizes it with
# PIL's Lanczos filter.
CELEBA_CROP = 178
CELEBA_RESIZE = "lanczos"

# digits: split and upscaling.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_SIZES = (8, 16, 28)  # 8: the native images, no resize
DIGITS_RESIZE = "bicubic"
# digits_public / digits_private: disjoint halves of digits' train split (stratified,
# their own seed) for the fine-tuning miniature (pretrain on one, DP fine-tune on the
# other); both keep digits' test split.
DIGITS_HALVES = {"digits_public": 0, "digits_private": 1}
DIGITS_HALVES_SEED = 1


IMAGENET32_HELP = (
    "Downsampled ImageNet needs a (free) ImageNet account: log in at https://image-net.org/download-images.php, "
    "download 'Train(32x32)' and 'Val(32x32)' of 'Downsampled ImageNet' in npz format (Imagenet32_train_npz.zip, "
    "Imagenet32_val_npz.zip) and unzip both into the raw folder, giving Imagenet32_train_npz/"
    "train_data_batch_1.npz ... train_data_batch_10.npz and Imagenet32_val_npz/val_data.npz.")
CAMELYON17_HELP = (
    "Camelyon17-WILDS v1.0 (about 10 GB): `pip install wilds` and prepare online (it downloads with "
    "wilds.get_dataset('camelyon17', root_dir=<raw folder>, download=True)), or download "
    "camelyon17_v1.0/archive.tar.gz from https://wilds.stanford.edu/datasets/ by hand and extract it into the "
    "raw folder, giving camelyon17_v1.0/metadata.csv and camelyon17_v1.0/patches/.")

# ----------------------------------------------------------------------------
# The registry.


@dataclass(frozen=True)
class RawFile:
    """One official raw file: its name, checksums and where it can be downloaded."""

    name: str
    md5: str | None
    sha256: str | None = None
    urls: tuple[str, ...] = ()  # tried in order; empty: must be fetched by hand
    size: int | None = None  # bytes, when known (only used in messages)

    @property
    def checksum(self) -> tuple[str, str]:
        """(algorithm, hex digest) of the checksum that is verified: sha256 if known, else md5."""
        if self.sha256:
            return "sha256", self.sha256
        if self.md5:
            return "md5", self.md5
        raise ValueError(f"raw file {self.name} has no known checksum")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    resolution: int  # digits: the default; prepare(digits_size=...) decides
    channels: int
    num_classes: int  # 0 = unconditional (labels are written as zeros)
    raw_files: tuple[RawFile, ...]
    description: str
    homepage: str = ""
    manual_download: str = ""  # how to get the raw files by hand when there is no URL
    expected_counts: dict[str, int] = field(default_factory=dict)  # of the official release

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


def _idx_files(mirrors: tuple[str, ...], table: list[tuple[str, int, str, str]]) -> tuple[RawFile, ...]:
    return tuple(
        RawFile(name=name, size=size, md5=md5, sha256=sha, urls=tuple(m + name for m in mirrors))
        for name, size, md5, sha in table
    )


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        resolution=28,
        channels=1,
        num_classes=10,
        raw_files=_idx_files(
            _MNIST_MIRRORS,
            [
                ("train-images-idx3-ubyte.gz", 9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                 "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                ("train-labels-idx1-ubyte.gz", 28881, "d53e105ee54ea40749a09fcbcd1e9432",
                 "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
                ("t10k-images-idx3-ubyte.gz", 1648877, "9fb629c4189551a2d022fa330f9573f3",
                 "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                ("t10k-labels-idx1-ubyte.gz", 4542, "ec29112dd5afa0611ce80d1b7f02629c",
                 "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
            ],
        ),
        description="MNIST handwritten digits (LeCun, Cortes, Burges); 28x28 grayscale, 10 classes; "
        "official 60,000/10,000 train/test split. License CC BY-SA 3.0.",
        homepage="http://yann.lecun.com/exdb/mnist/",
        expected_counts={"train": 60000, "test": 10000},
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        resolution=28,
        channels=1,
        num_classes=10,
        raw_files=_idx_files(
            _FASHION_MIRRORS,
            [
                ("train-images-idx3-ubyte.gz", 26421880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                 "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
                ("train-labels-idx1-ubyte.gz", 29515, "25c81989df183df01b3e8a0aad5dffbe",
                 "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
                ("t10k-images-idx3-ubyte.gz", 4422102, "bef4ecab320f06d8554ea6380940ec79",
                 "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
                ("t10k-labels-idx1-ubyte.gz", 5148, "bb300cfdad3c16e7a12a480ee83cd310",
                 "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
            ],
        ),
        description="Fashion-MNIST (Xiao, Rasul, Vollgraf; Zalando Research 2017); 28x28 grayscale, "
        "10 classes; official 60,000/10,000 train/test split. License MIT.",
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        expected_counts={"train": 60000, "test": 10000},
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        resolution=32,
        channels=3,
        num_classes=10,
        raw_files=(
            RawFile(
                name="cifar-10-python.tar.gz",
                size=170498071,
                md5="c58f30108f718f92721af3b95e74349a",
                sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            ),
        ),
        description="CIFAR-10 (Krizhevsky 2009); 32x32 RGB, 10 classes; official 50,000/10,000 "
        "train/test split (data_batch_1..5 / test_batch).",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        expected_counts={"train": 50000, "test": 10000},
    ),
    "celeba32": DatasetSpec(
        name="celeba32",
        resolution=32,
        channels=3,
        num_classes=0,
        raw_files=(
            RawFile(name="img_align_celeba.zip", md5="00d2c5bc6d35e252742224ab0c1e8fcb"),
            RawFile(name="list_eval_partition.txt", md5="d32c9cbf5e040fd4025c592c306e6668"),
        ),
        description="CelebA aligned & cropped faces (Liu et al. 2015), unconditional; official "
        "partition: train = partition 0 (162,770 images), test = partition 2 (19,962 images); "
        f"centre crop {CELEBA_CROP}x{CELEBA_CROP}, PIL Lanczos resize to 32x32. "
        "Non-commercial research use only (see the CelebA agreement).",
        homepage="https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
        manual_download=(
            "CelebA has no stable direct download URL. Download it by hand from the official page "
            "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (its Google Drive folder): "
            "'Img/img_align_celeba.zip' (Align&Cropped Images, about 1.4 GB) and "
            "'Eval/list_eval_partition.txt'."
        ),
        expected_counts={"train": 162770, "test": 19962},
    ),
    "imagenet32": DatasetSpec(
        name="imagenet32",
        resolution=32,
        channels=3,
        num_classes=1000,
        raw_files=(),  # user-supplied folders, checked by structure (no published checksums)
        description="Downsampled ImageNet 32x32 (Chrabaszcz, Loshchilov & Hutter 2017), the official npz "
        "release: train = Imagenet32_train_npz/train_data_batch_1..10.npz (1,281,167 images), test = "
        "Imagenet32_val_npz/val_data.npz (50,000); labels 1..1000 shifted to 0..999. PUBLIC data for "
        "pre-training (Ghalebikesabi et al. 2023); ImageNet terms of access apply.",
        homepage="https://image-net.org/download-images.php",
        manual_download=IMAGENET32_HELP,
        expected_counts={"train": 1281167, "test": 50000},
    ),
    "camelyon17": DatasetSpec(
        name="camelyon17",
        resolution=32,
        channels=3,
        num_classes=2,
        raw_files=(),  # the WILDS folder, checked by structure
        description="Camelyon17-WILDS v1.0 (Koh et al. 2021; Bandi et al. 2018): 96x96 patches of lymph-node "
        "sections, label = tumour in the central 32x32 region; resized to 32x32 (PIL Lanczos). WILDS' "
        "official split: train = split 'train' (hospitals 0, 3, 4), test = split 'test' (hospital 2); "
        "the validation splits are unused.",
        homepage="https://wilds.stanford.edu/datasets/#camelyon17",
        manual_download=CAMELYON17_HELP,
        expected_counts={"train": 302436, "test": 85054},
    ),
    "digits": DatasetSpec(
        name="digits",
        resolution=28,
        channels=1,
        num_classes=10,
        raw_files=(),
        description="scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set, 1,797 "
        "images, values 0..16 scaled to 0..255), native 8x8 or upscaled to 16x16 or 28x28 with PIL bicubic; "
        f"stratified {1 - DIGITS_TEST_FRACTION:.0%}/{DIGITS_TEST_FRACTION:.0%} train/test split, "
        f"seed {DIGITS_SPLIT_SEED}. Tiny and offline: for smoke tests and CI.",
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    ),
}
for _half, _which in DIGITS_HALVES.items():
    DATASETS[_half] = dataclasses.replace(
        DATASETS["digits"], name=_half,
        description=f"the {'first' if _which == 0 else 'second'} of two disjoint stratified halves of digits' "
        f"train split (seed {DIGITS_HALVES_SEED}; the other half is "
        f"{'digits_private' if _which == 0 else 'digits_public'}), and digits' test split: the "
        f"{'public' if _which == 0 else 'private'} set of the fine-tuning miniature. " + DATASETS["digits"].description)


def source_of(dataset: str) -> str:
    """The dataset whose examples `dataset` holds: digits for its halves, else itself. Releases
    on datasets of one source compose over the same people (dpdm.report's privacy totals)."""
    return "digits" if dataset in DIGITS_HALVES else dataset


def shares_examples(a: str, b: str) -> bool:
    """Whether datasets a and b may hold the same training examples: the same dataset, or
    digits and one of its halves (the two halves are disjoint)."""
    return a == b or (source_of(a) == source_of(b) and {a, b} != set(DIGITS_HALVES))


def is_digits(dataset: str) -> bool:
    """digits or one of its halves (prepared from scikit-learn, sized by data.digits_size)."""
    return dataset == "digits" or dataset in DIGITS_HALVES


def image_shape(dataset: str, settings: dict) -> tuple[int, int, int]:
    """(resolution, channels, classes) of a dataset as prepared with `settings` (digits and
    its halves at data.digits_size)."""
    spec = dataset_spec(dataset)
    res = settings["data"]["digits_size"] if is_digits(dataset) else spec.resolution
    return int(res), int(spec.channels), int(spec.num_classes)


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DPDMError(f"unknown dataset '{name}'; choose one of {sorted(DATASETS)}") from None


def raw_folder(dataset: str, raw_dir: str | os.PathLike | None = None) -> Path:
    """Where the raw files of `dataset` live: {raw_dir}/{dataset}/raw (raw_dir defaults to ./raw)."""
    return Path(raw_dir if raw_dir is not None else DEFAULT_RAW_DIR) / dataset / "raw"


# ----------------------------------------------------------------------------
# Raw files: checksums and downloads.


def file_digests(path: str | os.PathLike, chunk: int = 1 << 20) -> dict[str, Any]:
    """md5, sha256 and size of a file, in one pass."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            md5.update(block)
            sha.update(block)
            size += len(block)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest(), "bytes": size}


def _matches(raw: RawFile, digests: dict[str, Any]) -> bool:
    algo, expected = raw.checksum
    return digests[algo] == expected.lower()


def download_url(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Fetch `url` into `dest` (overwritten). Network errors propagate.

    The one place that touches the network; tests replace it.
    """
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": f"dpdm/{__version__}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as f:
        total = resp.headers.get("Content-Length")
        with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=dest.name.lstrip("."),
                  mininterval=1.0) as bar:
            while block := resp.read(1 << 20):
                f.write(block)
                bar.update(len(block))


def _fetch(raw: RawFile, target: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Try each URL of `raw`: download to a temporary name, verify, rename to `target`.

    Returns (digests, []) on success, (None, reasons) when every URL failed.
    """
    algo, expected = raw.checksum
    reasons = []
    target.parent.mkdir(parents=True, exist_ok=True)
    for url in raw.urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{raw.name}.", suffix=".download", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            log.info("downloading %s", url)
            download_url(url, tmp)
            digests = file_digests(tmp)
            if not _matches(raw, digests):
                reasons.append(f"{url}: the downloaded file's {algo} is {digests[algo]}, expected {expected}")
                log.warning("%s", reasons[-1])
                continue
            os.replace(tmp, target)
            log.info("downloaded and verified %s (%s %s)", target, algo, expected)
            return digests, []
        except Exception as e:  # offline, HTTP errors, timeouts: try the next mirror
            reasons.append(f"{url}: {type(e).__name__}: {e}")
            log.warning("download failed: %s", reasons[-1])
        finally:
            if tmp.exists():
                tmp.unlink()
    return None, reasons


def _corrupt_message(spec: DatasetSpec, bad: list[tuple[Path, RawFile, dict[str, Any]]]) -> str:
    lines = [f"checksum mismatch: {len(bad)} raw file(s) of dataset '{spec.name}' are corrupt or not the official release:"]
    for path, raw, digests in bad:
        algo, expected = raw.checksum
        size = f" ({digests['bytes']} bytes" + (f", the official file has {raw.size})" if raw.size else ")")
        lines.append(f"  - {path}{size}: {algo} checksum is {digests[algo]}, expected {expected}")
    lines.append(
        "Fix: delete the file(s) and run prepare again to re-download them (without --no-download), "
        "or replace them with a good copy"
        + (f" ({spec.manual_download})" if spec.manual_download else "")
        + ". Corrupt files are never re-used or downloaded over automatically."
    )
    return "\n".join(lines)


def _missing_message(spec: DatasetSpec, folder: Path, missing: list[RawFile], download: bool,
                     failures: dict[str, list[str]]) -> str:
    lines = [f"missing raw file(s) for dataset '{spec.name}' (looked in {folder.resolve()}/):"]
    for raw in missing:
        sums = ", ".join(f"{a} {v}" for a, v in (("sha256", raw.sha256), ("md5", raw.md5)) if v)
        lines.append(f"  - {raw.name}  ({sums}" + (f"; {raw.size} bytes)" if raw.size else ")"))
        if raw.urls:
            lines.append("      get it from: " + " or ".join(raw.urls))
        else:
            lines.append("      get it by hand (no direct download URL; see below)")
        for reason in failures.get(raw.name, []):
            lines.append(f"      download failed: {reason}")
    if spec.manual_download:
        lines.append(spec.manual_download)
    lines.append(
        f"Put the files in {folder.resolve()}/ (the layout is {{raw_dir}}/{spec.name}/raw/<file>; choose "
        f"raw_dir with --raw-dir, the config key paths.raw, or the environment variable {RAW_DIR_ENV})."
    )
    if not download:
        lines.append("Downloads were disabled (--no-download); drop that flag to let prepare fetch the files "
                     "that have a URL (this needs the internet).")
    elif failures:
        lines.append("Downloads were attempted and failed (offline?). Fetch the files on a machine with "
                     "internet access and copy them there.")
    return "\n".join(lines)


def ensure_raw_files(dataset: str, raw_dir: str | os.PathLike | None = None,
                     download: bool = True) -> dict[str, dict[str, Any]]:
    """Make sure every raw file of `dataset` is present and verified.

    Returns {file name: {"path", "md5", "sha256", "bytes", "verified_with"}}.
    Raises DPDMError on a checksum mismatch (naming the file, expected and actual checksum)
    or, after trying the downloads when `download` is true, one DPDMError listing every
    missing file.
    """
    spec = dataset_spec(dataset)
    folder = raw_folder(dataset, raw_dir)
    found: dict[str, dict[str, Any]] = {}
    bad, missing = [], []
    for raw in spec.raw_files:
        path = folder / raw.name
        if path.is_file():
            digests = file_digests(path)
            if _matches(raw, digests):
                found[raw.name] = {"path": path, **digests, "verified_with": raw.checksum[0]}
                log.info("verified %s (%s)", path, raw.checksum[0])
            else:
                bad.append((path, raw, digests))
        else:
            missing.append(raw)
    if bad:
        raise DPDMError(_corrupt_message(spec, bad))

    failures: dict[str, list[str]] = {}
    still_missing = []
    for raw in missing:
        if download and raw.urls:
            digests, reasons = _fetch(raw, folder / raw.name)
            if digests is not None:
                found[raw.name] = {"path": folder / raw.name, **digests, "verified_with": raw.checksum[0]}
                continue
            failures[raw.name] = reasons
        still_missing.append(raw)
    if still_missing:
        raise DPDMError(_missing_message(spec, folder, still_missing, download, failures))
    return found


# ----------------------------------------------------------------------------
# Parsers of the raw formats.


def read_idx(path: str | os.PathLike, *, expected_count: int | None = None) -> np.ndarray:
    """Read a gzipped idx file (MNIST format): images (magic 2051) or labels (magic 2049)."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            buf = f.read()
    except (OSError, EOFError) as e:
        raise DPDMError(f"{path} is not a readable gzip file ({e}); delete it and download it again") from e
    if len(buf) < 8:
        raise DPDMError(f"{path}: truncated idx header")
    magic, count = struct.unpack(">II", buf[:8])
    if magic == 2051:
        if len(buf) < 16:
            raise DPDMError(f"{path}: truncated idx image header")
        rows, cols = struct.unpack(">II", buf[8:16])
        offset, shape = 16, (count, rows, cols)
    elif magic == 2049:
        offset, shape = 8, (count,)
    else:
        raise DPDMError(f"{path}: bad idx magic number {magic} (expected 2051 for images or 2049 for labels)")
    if expected_count is not None and count != expected_count:
        raise DPDMError(f"{path}: the header says {count} items, expected {expected_count}")
    n = int(np.prod(shape))
    if len(buf) - offset != n:
        raise DPDMError(f"{path}: payload has {len(buf) - offset} bytes, the header {shape} needs {n}")
    return np.frombuffer(buf, dtype=np.uint8, offset=offset).reshape(shape).copy()


def _load_idx_dataset(spec: DatasetSpec, files: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        n = spec.expected_counts[split]
        images = read_idx(files[f"{prefix}-images-idx3-ubyte.gz"]["path"], expected_count=n)
        labels = read_idx(files[f"{prefix}-labels-idx1-ubyte.gz"]["path"], expected_count=n)
        if images.ndim != 3 or images.shape[1:] != (spec.resolution, spec.resolution):
            raise DPDMError(f"{spec.name} {split}: images have shape {images.shape[1:]}, expected "
                            f"{(spec.resolution, spec.resolution)}")
        if labels.max(initial=0) >= spec.num_classes:
            raise DPDMError(f"{spec.name} {split}: label {labels.max()} is out of range 0..{spec.num_classes - 1}")
        splits[split] = (images[..., None], labels.astype(np.int64))
    return splits, {"transform": "none: the official 28x28 uint8 pixels, unchanged"}


def _cifar_batch(tar: tarfile.TarFile, member: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        f = tar.extractfile(member)
    except KeyError:
        raise DPDMError(f"{path} has no member {member}; is it the CIFAR-10 python version?") from None
    if f is None:
        raise DPDMError(f"{path}: {member} is not a regular file")
    # Only reached after the archive's checksum was verified (pickle must not see untrusted data).
    batch = pickle.load(f, encoding="bytes")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DPDMError(f"{path}: {member} has data of shape {data.shape} and {len(labels)} labels; "
                        "expected N x 3072 and N labels")
    # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major: N,C,H,W -> N,H,W,C.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _load_cifar10(spec: DatasetSpec, files: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    path = files["cifar-10-python.tar.gz"]["path"]
    try:
        with tarfile.open(path, "r:gz") as tar:
            parts = [_cifar_batch(tar, f"cifar-10-batches-py/data_batch_{i}", path) for i in range(1, 6)]
            test = _cifar_batch(tar, "cifar-10-batches-py/test_batch", path)
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise DPDMError(f"{path} could not be read ({e}); delete it and download it again") from e
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    splits = {"train": train, "test": test}
    for split, (_, labels) in splits.items():
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise DPDMError(f"cifar10 {split}: labels out of range 0..{spec.num_classes - 1}")
    return splits, {"transform": "none: the official 32x32 RGB pixels; train = data_batch_1..5 in order, "
                                 "test = test_batch"}


IMAGENET32_FILES = {"train": [f"Imagenet32_train_npz/train_data_batch_{i}.npz" for i in range(1, 11)],
                   "test": ["Imagenet32_val_npz/val_data.npz"]}


def _missing_folder_files(dataset: str, folder: Path, names: list[str]) -> DPDMError:
    spec = dataset_spec(dataset)
    return DPDMError(f"{dataset}: missing raw file(s) in {folder}: {', '.join(names[:4])}"
                     f"{' ...' if len(names) > 4 else ''}. {spec.manual_download} (Set paths.raw or $DPDM_RAW_DIR "
                     f"to the folder that holds {dataset}/raw/.)")


def _load_imagenet32(spec: DatasetSpec, folder: Path, download: bool) -> tuple[dict, dict]:
    """The official npz batches: 'data' uint8 N x 3072 (R, G, B planes of 32x32), 'labels' 1..1000."""
    missing = [n for names in IMAGENET32_FILES.values() for n in names if not (folder / n).is_file()]
    if missing:
        raise _missing_folder_files("imagenet32", folder, missing)
    splits = {}
    for split, names in IMAGENET32_FILES.items():
        images, labels = [], []
        for name in names:
            path = folder / name
            try:
                with np.load(path) as z:
                    x, y = np.asarray(z["data"]), np.asarray(z["labels"]).reshape(-1)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                raise DPDMError(f"{path} is not an official Imagenet32 npz batch (arrays 'data', 'labels'; {e}); "
                                f"download it again. {IMAGENET32_HELP}") from None
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
                raise DPDMError(f"{path}: 'data' is {x.dtype} {x.shape} with {len(y)} labels, expected uint8 "
                                "N x 3072 and N labels: not the 32x32 release (Imagenet64 is N x 12288?)")
            if len(y) and (y.min() < 1 or y.max() > 1000):
                raise DPDMError(f"{path}: labels span {y.min()}..{y.max()}, the official ones 1..1000")
            images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(y.astype(np.int64) - 1)
        splits[split] = (np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
    pre = {"source": {s: n for s, n in IMAGENET32_FILES.items()},
           "transform": "none: the official 32x32 pixels (channel planes -> H x W x C); labels - 1 -> 0..999",
           "bytes": {n: (folder / n).stat().st_size for names in IMAGENET32_FILES.values() for n in names}}
    return splits, pre


CAMELYON17_ROOT = "camelyon17_v1.0"
# WILDS' official split scheme (wilds/datasets/camelyon17_dataset.py) is set by hospital, in
# code, not by metadata.csv's 'split' column (which only separates train, 0, from the
# in-distribution validation, 1, within each hospital): hospital 2 is the test split and
# hospital 1 the OOD validation, whatever their 'split' says.
CAMELYON17_TEST_CENTER, CAMELYON17_VAL_CENTER = 2, 1
CAMELYON17_SPLITS = {
    "train": ("'split' == 0 and hospital not in (1, 2)",
              lambda r: int(r["split"]) == 0 and int(r["center"]) not in (CAMELYON17_VAL_CENTER,
                                                                          CAMELYON17_TEST_CENTER)),
    "test": ("hospital == 2", lambda r: int(r["center"]) == CAMELYON17_TEST_CENTER),
}


def _load_camelyon17(spec: DatasetSpec, folder: Path, download: bool) -> tuple[dict, dict]:
    """WILDS' folder: metadata.csv (patient, node, x_coord, y_coord, tumor, center, split)
    and patches/patient_PPP_node_N/patch_patient_PPP_node_N_x_X_y_Y.png (96x96)."""
    import csv as _csv

    from PIL import Image
    from tqdm import tqdm

    root = folder / CAMELYON17_ROOT
    if not (root / "metadata.csv").is_file() and download:
        try:
            import wilds
        except ImportError:
            raise _missing_folder_files("camelyon17", folder, [f"{CAMELYON17_ROOT}/metadata.csv"]) from None
        log.info("downloading Camelyon17-WILDS into %s with wilds %s", folder, wilds.__version__)
        try:
            wilds.get_dataset(dataset="camelyon17", root_dir=str(folder), download=True)
        except Exception as e:
            raise DPDMError(f"camelyon17: the WILDS download failed ({type(e).__name__}: {e}). "
                            f"{CAMELYON17_HELP}") from None
    if not (root / "metadata.csv").is_file():
        raise _missing_folder_files("camelyon17", folder, [f"{CAMELYON17_ROOT}/metadata.csv"])
    with open(root / "metadata.csv", newline="") as f:
        rows = list(_csv.DictReader(f))
    need = {"patient", "node", "x_coord", "y_coord", "tumor", "center", "split"}
    if not rows or not need <= set(rows[0]):
        raise DPDMError(f"{root / 'metadata.csv'} lacks the WILDS columns {sorted(need)}; it is not Camelyon17-WILDS "
                        f"v1.0. {CAMELYON17_HELP}")
    splits, centers = {}, {}
    for split, (rule, member) in CAMELYON17_SPLITS.items():
        chosen = [r for r in rows if member(r)]
        if not chosen:
            raise DPDMError(f"{root / 'metadata.csv'}: no row is in WILDS' official '{split}' split ({rule}); "
                            f"it is not Camelyon17-WILDS v1.0. {CAMELYON17_HELP}")
        out = np.empty((len(chosen), spec.resolution, spec.resolution, 3), dtype=np.uint8)
        for i, r in enumerate(tqdm(chosen, desc=f"camelyon17 {split}", unit="img", mininterval=2.0)):
            p, n = int(r["patient"]), int(r["node"])
            path = (root / "patches" / f"patient_{p:03d}_node_{n}" /
                    f"patch_patient_{p:03d}_node_{n}_x_{int(r['x_coord'])}_y_{int(r['y_coord'])}.png")
            try:
                with Image.open(path) as img:
                    out[i] = np.asarray(img.convert("RGB").resize((spec.resolution, spec.resolution),
                                                                  Image.Resampling.LANCZOS), dtype=np.uint8)
            except OSError as e:
                raise DPDMError(f"camelyon17: patch {path} listed in metadata.csv cannot be read ({e}); the "
                                f"extraction is incomplete. {CAMELYON17_HELP}") from None
        splits[split] = (out, np.array([int(r["tumor"]) for r in chosen], dtype=np.int64))
        centers[split] = sorted({int(r["center"]) for r in chosen})
    pre = {"source": f"{CAMELYON17_ROOT}/metadata.csv + patches/ (WILDS v1.0)",
           "split": {s: f"WILDS official '{s}': metadata {rule}, hospitals {centers[s]}"
                     for s, (rule, _) in CAMELYON17_SPLITS.items()},
           "resize": f"PIL Image.Resampling.LANCZOS 96x96 -> {spec.resolution}x{spec.resolution}",
           "labels": "tumor (0 / 1): tumour tissue in the patch's central 32x32 region"}
    return splits, pre


def read_celeba_partition(path: str | os.PathLike) -> dict[str, int]:
    """list_eval_partition.txt -> {image file name: partition (0 train, 1 valid, 2 test)}, in file order."""
    path = Path(path)
    out: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DPDMError(f"{path}:{lineno}: expected '<image>.jpg <0|1|2>', got {line!r}")
        out[parts[0]] = int(parts[1])
    if not out:
        raise DPDMError(f"{path} lists no images")
    return out


def celeba_transform(img, crop: int = CELEBA_CROP, size: int = 32) -> np.ndarray:
    """A PIL image -> uint8 (size, size, 3): centre crop crop x crop, then Lanczos resize."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < crop:
        raise DPDMError(f"CelebA image of size {w}x{h} is smaller than the {crop}x{crop} centre crop; "
                        "use the aligned & cropped images (img_align_celeba.zip, 178x218)")
    left, top = (w - crop) // 2, (h - crop) // 2
    img = img.crop((left, top, left + crop, top + crop)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _load_celeba32(spec: DatasetSpec, files: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    from PIL import Image
    from tqdm import tqdm

    partition = read_celeba_partition(files["list_eval_partition.txt"]["path"])
    zpath = files["img_align_celeba.zip"]["path"]
    wanted = {0: "train", 2: "test"}  # partition 1 (validation) is not used
    names = {split: [n for n, p in partition.items() if wanted.get(p) == split] for split in SPLITS}
    splits = {}
    try:
        with zipfile.ZipFile(zpath) as zf:
            members = {Path(i.filename).name: i for i in zf.infolist() if not i.is_dir()}
            absent = [n for split in SPLITS for n in names[split] if n not in members]
            if absent:
                raise DPDMError(f"{zpath} lacks {len(absent)} image(s) listed in list_eval_partition.txt "
                                f"(first: {absent[:3]}); the zip or the partition file is not the official one")
            for split in SPLITS:
                out = np.empty((len(names[split]), spec.resolution, spec.resolution, 3), dtype=np.uint8)
                for i, name in enumerate(tqdm(names[split], desc=f"celeba32 {split}", unit="img", mininterval=2.0)):
                    with zf.open(members[name]) as f:
                        img = Image.open(io.BytesIO(f.read()))
                        out[i] = celeba_transform(img, CELEBA_CROP, spec.resolution)
                splits[split] = (out, np.zeros(len(out), dtype=np.int64))
    except (zipfile.BadZipFile, OSError) as e:
        raise DPDMError(f"{zpath} could not be read ({e}); delete it and fetch it again") from e
    pre = {
        "partition": "list_eval_partition.txt: train = partition 0, test = partition 2, partition 1 (valid) unused",
        "crop": f"centre {CELEBA_CROP}x{CELEBA_CROP} (left = (w-{CELEBA_CROP})//2, top = (h-{CELEBA_CROP})//2; "
                "rows 20..197, full width of the 178x218 aligned images)",
        "crop_size": CELEBA_CROP,
        "resize": f"PIL Image.Resampling.LANCZOS to {spec.resolution}x{spec.resolution}",
        "resize_method": CELEBA_RESIZE,
        "source": "official DPDM code (nv-tlabs/DPDM) prepares datasets with StyleGAN3's dataset_tool.py; "
                  "its center-crop transform takes the largest centred square and resizes with Lanczos",
        "labels": "unconditional: all zeros",
    }
    return splits, pre


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), sorted: round(test_fraction * n_c) of each class c go to test."""
    rng = np.random.Generator(np.random.PCG64(seed))
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(test_fraction * len(idx)))
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _load_digits(spec: DatasetSpec, size: int) -> tuple[dict, dict]:
    """digits (or a half of its train split, spec.name in DIGITS_HALVES) at size x size."""
    import sklearn
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    small = np.clip(np.round(raw * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.stack([
        im if size == 8 else np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC),
                                        dtype=np.uint8)
        for im in small
    ])[..., None]
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    halves = None
    if spec.name in DIGITS_HALVES:
        halves = stratified_split(labels[train_idx], 0.5, DIGITS_HALVES_SEED)  # (first, second) half
        train_idx = train_idx[halves[DIGITS_HALVES[spec.name]]]
    splits = {"train": (images[train_idx], labels[train_idx]), "test": (images[test_idx], labels[test_idx])}
    pre = {
        "source": f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}), 1797 images 8x8, values 0..16",
        "scale": "round(x * 255 / 16) -> uint8 0..255",
        "resize": "none (native 8x8)" if size == 8 else f"PIL Image.Resampling.BICUBIC 8x8 -> {size}x{size}",
        "resize_method": DIGITS_RESIZE,
        "digits_size": size,
        "split": f"stratified: per class, round({DIGITS_TEST_FRACTION} * n_class) random images go to test "
                 "(numpy PCG64 permutation per class, in class order); both splits keep the original order",
        "split_seed": DIGITS_SPLIT_SEED,
        "test_fraction": DIGITS_TEST_FRACTION,
    }
    if halves is not None:
        pre["half"] = (f"{'first' if DIGITS_HALVES[spec.name] == 0 else 'second'} of two disjoint halves of the "
                       f"train split: the same stratified split with fraction 0.5, seed {DIGITS_HALVES_SEED}")
    return splits, pre


# ----------------------------------------------------------------------------
# npz I/O.


def _prepare_hint(data_dir: Path) -> str:
    dataset = "<dataset>"
    meta = data_dir / "meta.json"
    try:
        dataset = json.loads(meta.read_text())["dataset"]
    except Exception:
        if data_dir.name in DATASETS:
            dataset = data_dir.name
    return f"run: python -m dpdm prepare --dataset {dataset} --out {data_dir}"


def read_images(path: str | os.PathLike, what: str, fix: str = "delete it and rerun the step that writes it",
                labels: str = "optional") -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 N x H x W x C, labels int64 [N] or None) from an npz with arrays
    `images` (and `labels`): the one reader of image files (prepared splits, samples, FID
    inputs). `labels`: "required", "optional" or "ignored". Every problem is a DPDMError
    naming `what`, the file and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise DPDMError(f"{what} {path} does not exist; {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            wanted = {"images", "labels"} if labels == "required" else {"images"}
            if not wanted <= keys:
                raise DPDMError(f"{what} {path} is malformed: it holds arrays {sorted(keys)}, expected "
                                f"{' and '.join(repr(k) for k in sorted(wanted))}; {fix}")
            images = z["images"]
            found = z["labels"] if labels != "ignored" and "labels" in keys else None
    except DPDMError:
        raise
    except Exception as e:  # BadZipFile, ValueError, OSError, EOFError ...
        raise DPDMError(f"{what} {path} is malformed: truncated or not a readable .npz ({type(e).__name__}: {e}); "
                        f"{fix}") from e
    problems = []
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        problems.append(f"images must be uint8 N x H x W x C with C in (1, 3), got {images.dtype} {images.shape}")
    if found is not None:
        found = found.reshape(-1) if labels == "optional" else found
        if found.ndim != 1 or found.dtype.kind not in "iuf":
            problems.append(f"labels must be class numbers of shape (N,), got {found.dtype} {found.shape}")
        elif found.dtype.kind == "f" and not np.array_equal(found, np.round(found)):
            problems.append(f"labels must be whole class numbers, found {found[found != np.round(found)][0]!r}")
        elif len(found) != len(images):
            problems.append(f"{len(images)} images but {len(found)} labels")
    if problems:
        raise DPDMError(f"{what} {path} is malformed: " + "; ".join(problems) + f"; {fix}")
    return images, None if found is None else found.astype(np.int64)


def load_split(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x H x W x C, labels int64 N) of a prepared split ('train' or 'test')."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise DPDMError(f"unknown split '{split}'; choose one of {list(SPLITS)}")
    images, labels = read_images(data_dir / f"{split}.npz", "prepared data", f"delete it and {_prepare_hint(data_dir)}",
                                 labels="required")
    return images, labels


def load_meta(data_dir: str | os.PathLike) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        raise DPDMError(f"{path} does not exist (the dataset was not prepared, or preparing it did not "
                        f"finish); {_prepare_hint(data_dir)}")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise DPDMError(f"{path} is not valid JSON ({e}); delete it and {_prepare_hint(data_dir)}") from e
    if not isinstance(meta, dict) or "dataset" not in meta:
        raise DPDMError(f"{path} is malformed (no 'dataset' key); delete it and {_prepare_hint(data_dir)}")
    return meta


def to_model_range(images) -> "torch.Tensor":  # noqa: F821
    """uint8 N x H x W x C (ndarray or tensor) -> torch.float32 N x C x H x W in [-1, 1] (x / 127.5 - 1)."""
    import torch

    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if t.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 images, got {t.dtype}")
    if t.ndim != 4:
        raise ValueError(f"to_model_range expects N x H x W x C images, got shape {tuple(t.shape)}")
    return (t.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0).contiguous()


def to_uint8(x) -> np.ndarray:
    """float N x C x H x W in [-1, 1] (tensor or ndarray) -> uint8 N x H x W x C: clip, then ((x+1)*127.5).round()."""
    import torch

    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 4:
        raise ValueError(f"to_uint8 expects N x C x H x W, got shape {tuple(t.shape)}")
    t = t.to(torch.float32).clamp(-1.0, 1.0)
    return ((t + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# ----------------------------------------------------------------------------
# prepare.

_LOADERS: dict[str, Callable[[DatasetSpec, dict], tuple[dict, dict]]] = {
    "mnist": _load_idx_dataset,
    "fashion_mnist": _load_idx_dataset,
    "cifar10": _load_cifar10,
    "celeba32": _load_celeba32,
}
_FOLDER_LOADERS: dict[str, Callable[[DatasetSpec, Path, bool], tuple[dict, dict]]] = {
    "imagenet32": _load_imagenet32,
    "camelyon17": _load_camelyon17,
}


def prepare(
    dataset: str,
    out_dir: str | os.PathLike,
    raw_dir: str | os.PathLike | None = None,
    download: bool = True,
    digits_size: int = 28,
) -> dict:
    """Raw files -> {out_dir}/train.npz, test.npz, meta.json (written last). Returns the meta dict."""
    spec = dataset_spec(dataset)
    out_dir = Path(out_dir)
    check_writable(out_dir, "data folder")
    raw_info: dict[str, dict[str, Any]] = {}
    if is_digits(dataset):
        if digits_size not in DIGITS_SIZES:
            raise DPDMError(f"digits_size must be one of {list(DIGITS_SIZES)}, got {digits_size}")
        splits, preprocessing = _load_digits(spec, digits_size)
        resolution = digits_size
    elif dataset in _FOLDER_LOADERS:  # user-supplied folders without published checksums, checked by structure
        splits, preprocessing = _FOLDER_LOADERS[dataset](spec, raw_folder(dataset, raw_dir), download)
        resolution = spec.resolution
    else:
        raw_info = ensure_raw_files(dataset, raw_dir, download)
        log.info("parsing %s raw files", dataset)
        splits, preprocessing = _LOADERS[dataset](spec, raw_info)
        resolution = spec.resolution

    # Every raw file has been read and checked: only now replace the previous prepared
    # set, as a whole (meta.json, which marks it finished, last).
    with staged_outputs(out_dir, marker="meta.json") as stage:
        meta = _write_prepared(stage, dataset, spec, splits, resolution, raw_info, preprocessing)
    log.info("prepared %s in %s: %s", dataset, out_dir, meta["counts"])
    return meta


def _write_prepared(stage: Path, dataset: str, spec: DatasetSpec, splits: dict, resolution: int, raw_info: dict,
                    preprocessing: dict) -> dict:
    """Write {stage}/train.npz, test.npz and meta.json; returns the meta dict."""
    counts, class_counts, npz_sha = {}, {}, {}
    for split in SPLITS:
        images, labels = splits[split]
        assert images.dtype == np.uint8 and images.shape[1:] == (resolution, resolution, spec.channels), images.shape
        labels = labels.astype(np.int64)
        path = stage / f"{split}.npz"
        save_npz(path, images=images, labels=labels)
        counts[split] = int(len(images))
        if spec.conditional:
            class_counts[split] = np.bincount(labels, minlength=spec.num_classes).tolist()
        npz_sha[split] = sha256_file(path)
        log.info("wrote %s.npz: %d images %s", split, len(images), images.shape[1:])
    expected = spec.expected_counts
    if expected and any(counts[s] != expected.get(s, counts[s]) for s in SPLITS):
        log.warning("%s: counts %s differ from the official release's %s", dataset, counts, expected)

    meta = {
        "dataset": dataset,
        "description": spec.description,
        "resolution": resolution,
        "channels": spec.channels,
        "num_classes": spec.num_classes,
        "conditional": spec.conditional,
        "image_format": "uint8 N x H x W x C, 0..255 (scaled to [-1, 1] at load time)",
        "counts": counts,
        "class_counts": class_counts,
        "raw_files": {
            name: {"md5": info["md5"], "sha256": info["sha256"], "bytes": info["bytes"],
                   "verified_with": info["verified_with"]}
            for name, info in raw_info.items()
        },
        "preprocessing": preprocessing,
        "npz_sha256": {f"{s}.npz": npz_sha[s] for s in SPLITS},
        "dpdm_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_json(stage / "meta.json", meta)
    return meta
