"""dpdm.data: the registry, raw-file checksums, downloads, prepare, npz I/O. CPU, offline."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpdm import data
from dpdm.artifacts import DPDMError, sha256_file
from helpers import SHARED  # tests/helpers.py

needs_shared = pytest.mark.skipif(
    not (SHARED / "mnist" / "raw").is_dir(),
    reason=f"shared raw data not found at {SHARED} (set DPDM_SHARED_DATA to the folder holding mnist/raw/)",
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _no_network(url, dest, timeout=60.0):
    raise AssertionError(f"unexpected download of {url}")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may touch the network: a download that is not monkeypatched fails loudly."""
    monkeypatch.setattr(data, "download_url", _no_network)


# ----------------------------------------------------------------------------
# Registry.


def test_registry_names_and_shapes():
    assert set(data.DATASETS) == {"mnist", "fashion_mnist", "celeba32", "cifar10", "digits", "digits_public",
                                  "digits_private", "imagenet32", "camelyon17"}
    for name in ("imagenet32", "camelyon17"):  # no published checksums: structure checks, and how to get them
        assert data.dataset_spec(name).manual_download
    for name, spec in data.DATASETS.items():
        assert spec.name == name and spec.description
        for raw in spec.raw_files:
            assert raw.md5 or raw.sha256
    assert data.dataset_spec("celeba32").num_classes == 0
    assert not data.dataset_spec("celeba32").conditional
    assert data.dataset_spec("cifar10").raw_files[0].md5 == "c58f30108f718f92721af3b95e74349a"
    assert (data.dataset_spec("mnist").resolution, data.dataset_spec("mnist").channels) == (28, 1)
    assert (data.dataset_spec("cifar10").resolution, data.dataset_spec("cifar10").channels) == (32, 3)


def test_unknown_dataset_names_the_valid_ones(tmp_path):
    with pytest.raises(DPDMError) as e:
        data.dataset_spec("imagenet")
    for name in data.DATASETS:
        assert name in str(e.value)
    with pytest.raises(DPDMError, match="unknown dataset 'svhn'"):
        data.prepare("svhn", out_dir=tmp_path / "out")


# ----------------------------------------------------------------------------
# MNIST / Fashion-MNIST from the shared raw files.


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    if not (SHARED / "mnist" / "raw").is_dir():
        pytest.skip(f"shared raw data not found at {SHARED}")
    out = tmp_path_factory.mktemp("mnist")
    meta = data.prepare("mnist", out_dir=out, raw_dir=SHARED, download=False)
    return out, meta


@needs_shared
def test_prepare_mnist(mnist_dir):
    out, meta = mnist_dir
    x, y = data.load_split(out, "train")
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == MNIST_TRAIN_COUNTS
    xt, yt = data.load_split(out, "test")
    assert xt.shape == (10000, 28, 28, 1) and xt.dtype == np.uint8
    assert np.bincount(yt).tolist() == MNIST_TEST_COUNTS
    assert x.max() == 255 and x.min() == 0  # raw pixels, not rescaled
    # the first training image of MNIST is a 5, the first test image a 7
    assert (y[0], yt[0]) == (5, 7)

    assert data.load_meta(out) == json.loads((out / "meta.json").read_text()) == meta
    assert meta["dataset"] == "mnist"
    assert (meta["resolution"], meta["channels"], meta["num_classes"]) == (28, 1, 10)
    assert meta["counts"] == {"train": 60000, "test": 10000}
    assert meta["class_counts"]["train"] == MNIST_TRAIN_COUNTS
    assert meta["npz_sha256"] == {"train.npz": sha256_file(out / "train.npz"),
                                  "test.npz": sha256_file(out / "test.npz")}
    spec = data.dataset_spec("mnist")
    assert set(meta["raw_files"]) == {r.name for r in spec.raw_files}
    for raw in spec.raw_files:
        rec = meta["raw_files"][raw.name]
        assert (rec["sha256"], rec["md5"], rec["verified_with"]) == (raw.sha256, raw.md5, "sha256")
    assert "preprocessing" in meta


@needs_shared
def test_prepare_fashion_mnist(tmp_path):
    meta = data.prepare("fashion_mnist", out_dir=tmp_path, raw_dir=SHARED, download=False)
    x, y = data.load_split(tmp_path, "train")
    xt, yt = data.load_split(tmp_path, "test")
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert x.dtype == xt.dtype == np.uint8 and y.dtype == yt.dtype == np.int64
    assert np.bincount(y).tolist() == [6000] * 10
    assert np.bincount(yt).tolist() == [1000] * 10
    assert meta["counts"] == {"train": 60000, "test": 10000} and meta["num_classes"] == 10


# ----------------------------------------------------------------------------
# Checksums, missing files, downloads.


def _mnist_raw_copy(tmp_path: Path, skip: tuple[str, ...] = ()) -> Path:
    """raw_dir with mnist/raw/ holding symlinks to the shared files (except `skip`)."""
    folder = tmp_path / "raw" / "mnist" / "raw"
    folder.mkdir(parents=True)
    for raw in data.dataset_spec("mnist").raw_files:
        if raw.name not in skip:
            (folder / raw.name).symlink_to(SHARED / "mnist" / "raw" / raw.name)
    return tmp_path / "raw"


@needs_shared
def test_corrupt_raw_file_is_an_error_and_is_kept(tmp_path, monkeypatch):
    name = "t10k-labels-idx1-ubyte.gz"
    raw_dir = _mnist_raw_copy(tmp_path, skip=(name,))
    blob = bytearray((SHARED / "mnist" / "raw" / name).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad = raw_dir / "mnist" / "raw" / name
    bad.write_bytes(bytes(blob))
    expected = {r.name: r for r in data.dataset_spec("mnist").raw_files}[name].sha256

    with pytest.raises(DPDMError) as e:  # download=True: still never downloaded over
        data.prepare("mnist", out_dir=tmp_path / "out", raw_dir=raw_dir, download=True)
    msg = str(e.value)
    assert name in msg and "checksum" in msg
    assert expected in msg and hashlib.sha256(bytes(blob)).hexdigest() in msg
    assert "delete" in msg
    assert bad.read_bytes() == bytes(blob)  # untouched
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_files_one_error_lists_all(tmp_path):
    with pytest.raises(DPDMError) as e:
        data.prepare("mnist", out_dir=tmp_path / "out", raw_dir=tmp_path / "raw", download=False)
    msg = str(e.value)
    for raw in data.dataset_spec("mnist").raw_files:
        assert raw.name in msg and raw.sha256 in msg and raw.md5 in msg
        assert raw.urls[0] in msg
    assert str((tmp_path / "raw" / "mnist" / "raw").resolve()) in msg
    assert "DPDM_RAW_DIR" in msg and "--no-download" in msg


@needs_shared
def test_missing_subset_is_listed_exactly(tmp_path):
    skip = ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    raw_dir = _mnist_raw_copy(tmp_path, skip=skip)
    with pytest.raises(DPDMError) as e:
        data.ensure_raw_files("mnist", raw_dir, download=False)
    msg = str(e.value)
    assert all(n in msg for n in skip)
    assert "train-labels-idx1-ubyte.gz" not in msg and "t10k-images-idx3-ubyte.gz" not in msg


def test_celeba_missing_explains_manual_download(tmp_path):
    with pytest.raises(DPDMError) as e:  # no URL: nothing to download even when allowed
        data.ensure_raw_files("celeba32", tmp_path, download=True)
    msg = str(e.value)
    assert "img_align_celeba.zip" in msg and "list_eval_partition.txt" in msg
    assert "00d2c5bc6d35e252742224ab0c1e8fcb" in msg
    assert "Google Drive" in msg and "mmlab.ie.cuhk.edu.hk" in msg


def _copying_downloader(calls):
    def fake(url, dest, timeout=60.0):
        calls.append(url)
        shutil.copyfile(SHARED / "mnist" / "raw" / url.rsplit("/", 1)[1], dest)
    return fake


@needs_shared
def test_download_writes_verifies_and_renames(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "download_url", _copying_downloader(calls))
    raw_dir = _mnist_raw_copy(tmp_path, skip=("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    info = data.ensure_raw_files("mnist", raw_dir, download=True)
    assert sorted(u.rsplit("/", 1)[1] for u in calls) == ["t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert all(u.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for u in calls)
    folder = raw_dir / "mnist" / "raw"
    assert sorted(p.name for p in folder.iterdir()) == sorted(r.name for r in data.dataset_spec("mnist").raw_files)
    for raw in data.dataset_spec("mnist").raw_files:
        assert info[raw.name]["sha256"] == raw.sha256 == sha256_file(folder / raw.name)
    # a second call finds everything and downloads nothing
    calls.clear()
    data.ensure_raw_files("mnist", raw_dir, download=True)
    assert calls == []


def test_failed_or_wrong_downloads_leave_nothing_behind(tmp_path, monkeypatch):
    def wrong_bytes(url, dest, timeout=60.0):
        dest.write_bytes(b"<html>not the file</html>")

    def offline(url, dest, timeout=60.0):
        raise OSError("Network is unreachable")

    for fake, reason in ((wrong_bytes, "expected"), (offline, "Network is unreachable")):
        monkeypatch.setattr(data, "download_url", fake)
        with pytest.raises(DPDMError) as e:
            data.ensure_raw_files("mnist", tmp_path / "raw", download=True)
        msg = str(e.value)
        for raw in data.dataset_spec("mnist").raw_files:
            assert raw.name in msg and raw.sha256 in msg
            for url in raw.urls:  # every mirror was tried
                assert url in msg
        assert "download failed" in msg and reason in msg
        assert list((tmp_path / "raw" / "mnist" / "raw").iterdir()) == []


# ----------------------------------------------------------------------------
# digits.


@pytest.mark.parametrize("size", [16, 28])
def test_prepare_digits(tmp_path, size):
    meta = data.prepare("digits", out_dir=tmp_path, digits_size=size)
    x, y = data.load_split(tmp_path, "train")
    xt, yt = data.load_split(tmp_path, "test")
    assert x.shape[1:] == xt.shape[1:] == (size, size, 1) and x.dtype == np.uint8
    assert len(x) + len(xt) == 1797
    assert meta["resolution"] == size and meta["counts"] == {"train": len(x), "test": len(xt)}
    assert abs(len(xt) - 0.2 * 1797) <= 5
    total = np.bincount(np.concatenate([y, yt]), minlength=10)
    assert total.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    test_share = np.bincount(yt, minlength=10)
    assert np.all(np.abs(test_share - 0.2 * total) <= 0.5 + 1e-9)  # stratified per class
    assert x.max() == 255 and x.min() == 0
    assert meta["preprocessing"]["split_seed"] == data.DIGITS_SPLIT_SEED
    assert meta["raw_files"] == {}
    # train and test are disjoint images of the original set
    assert not set(map(bytes, x.reshape(len(x), -1))) & set(map(bytes, xt.reshape(len(xt), -1)))


def test_prepare_is_deterministic(tmp_path):
    a = data.prepare("digits", out_dir=tmp_path / "a", digits_size=16)
    b = data.prepare("digits", out_dir=tmp_path / "b", digits_size=16)
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.npz").read_bytes() == (tmp_path / "b" / f"{split}.npz").read_bytes()
    assert a["npz_sha256"] == b["npz_sha256"]


def test_bad_digits_size(tmp_path):
    with pytest.raises(DPDMError, match="digits_size"):
        data.prepare("digits", out_dir=tmp_path, digits_size=32)


# ----------------------------------------------------------------------------
# Loading and the model range.


def test_to_model_range_and_back_is_exact():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    u = np.concatenate([u, u[:, ::-1]])
    x = data.to_model_range(u)
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 3, 16, 16)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.allclose(x[0, 0].flatten(), torch.arange(256) / 127.5 - 1)
    back = data.to_uint8(x)
    assert back.dtype == np.uint8 and back.shape == u.shape
    assert np.array_equal(back, u)
    assert np.array_equal(data.to_uint8(x.numpy()), u)  # ndarray input
    assert torch.equal(data.to_model_range(torch.from_numpy(u)), x)  # tensor input
    # out-of-range values are clipped
    clipped = data.to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0]).reshape(1, 1, 1, 5))
    assert clipped.flatten().tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(TypeError):
        data.to_model_range(u.astype(np.float32))


def test_load_split_errors(tmp_path):
    d = tmp_path / "digits"
    with pytest.raises(DPDMError, match="python -m dpdm prepare --dataset digits"):
        data.load_split(d, "train")
    with pytest.raises(DPDMError, match="python -m dpdm prepare"):
        data.load_meta(d)
    with pytest.raises(DPDMError, match="unknown split"):
        data.load_split(d, "valid")
    d.mkdir()
    (d / "train.npz").write_bytes(b"garbage")
    with pytest.raises(DPDMError, match="malformed"):
        data.load_split(d, "train")
    np.savez(d / "train.npz", x=np.zeros(3))
    with pytest.raises(DPDMError, match="'images' and 'labels'"):
        data.load_split(d, "train")
    np.savez(d / "train.npz", images=np.zeros((2, 4, 4, 1), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(DPDMError, match="uint8"):
        data.load_split(d, "train")
    np.savez(d / "train.npz", images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(DPDMError, match="2 images but 3 labels"):
        data.load_split(d, "train")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(DPDMError, match="not valid JSON"):
        data.load_meta(d)


# ----------------------------------------------------------------------------
# CIFAR-10 and CelebA on tiny synthetic raw files (their checksums registered in place of
# the official ones, so the verification path still runs).


def _register_fake(monkeypatch, dataset: str, files: list[Path]):
    spec = data.dataset_spec(dataset)
    raws = tuple(
        dataclasses.replace(r, md5=hashlib.md5(p.read_bytes()).hexdigest(),
                            sha256=hashlib.sha256(p.read_bytes()).hexdigest() if r.sha256 else None, size=None)
        for r, p in zip(spec.raw_files, files)
    )
    assert [r.name for r in raws] == [p.name for p in files]
    monkeypatch.setitem(data.DATASETS, dataset, dataclasses.replace(spec, raw_files=raws))


def _cifar_batch(images_nchw: np.ndarray, labels: list[int]) -> bytes:
    # the official batches are Python 2 pickles: bytes keys
    return pickle.dumps({b"batch_label": b"fake", b"labels": labels,
                         b"data": images_nchw.reshape(len(labels), -1), b"filenames": [b"x.png"] * len(labels)})


def test_prepare_cifar10_synthetic(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "raw" / "cifar10" / "raw"
    folder.mkdir(parents=True)
    tar_path = folder / "cifar-10-python.tar.gz"
    batches, train_x, train_y = {}, [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
        y = [i % 10, (i + 3) % 10]
        batches[f"data_batch_{i}"] = _cifar_batch(x, y)
        train_x.append(x)
        train_y += y
    planes = np.zeros((3, 3, 32, 32), np.uint8)
    planes[:, 0], planes[:, 1], planes[:, 2] = 10, 20, 30  # R, G, B planes
    planes[0, 0, 0, 1] = 200  # red value at row 0, column 1 of test image 0
    batches["test_batch"] = _cifar_batch(planes, [7, 8, 9])
    with tarfile.open(tar_path, "w:gz") as tar:
        for name, blob in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    _register_fake(monkeypatch, "cifar10", [tar_path])

    meta = data.prepare("cifar10", out_dir=tmp_path / "out", raw_dir=tmp_path / "raw", download=False)
    x, y = data.load_split(tmp_path / "out", "train")
    xt, yt = data.load_split(tmp_path / "out", "test")
    assert x.shape == (10, 32, 32, 3) and xt.shape == (3, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(x, np.concatenate(train_x).transpose(0, 2, 3, 1))  # batches 1..5 in order, NHWC
    assert y.tolist() == train_y and yt.tolist() == [7, 8, 9]
    assert xt[1, 5, 5].tolist() == [10, 20, 30]
    assert xt[0, 0, 1].tolist() == [200, 20, 30]
    assert meta["counts"] == {"train": 10, "test": 3} and meta["num_classes"] == 10
    assert meta["raw_files"]["cifar-10-python.tar.gz"]["verified_with"] == "sha256"

    # corrupting the archive is caught by the checksum, before pickle ever sees it
    tar_path.write_bytes(tar_path.read_bytes()[:-10])
    with pytest.raises(DPDMError, match="checksum"):
        data.prepare("cifar10", out_dir=tmp_path / "out2", raw_dir=tmp_path / "raw", download=False)


def _face(i: int) -> Image.Image:
    """A 178x218 'aligned CelebA' image: red bands in the 20 rows cut off at top and bottom,
    a blue stripe at the left edge (kept: the crop spans the full width), green elsewhere."""
    a = np.zeros((218, 178, 3), np.uint8)
    a[:, :, 1] = 40 + 30 * i
    a[:20], a[198:] = (255, 0, 0), (255, 0, 0)
    a[20:198, :12] = (0, 0, 255)
    return Image.fromarray(a)


def test_prepare_celeba32_synthetic(tmp_path, monkeypatch):
    folder = tmp_path / "raw" / "celeba32" / "raw"
    folder.mkdir(parents=True)
    zpath = folder / "img_align_celeba.zip"
    partition = {1: 0, 2: 2, 3: 0, 4: 1, 5: 2, 6: 0}  # image number -> partition
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in partition:
            buf = io.BytesIO()
            _face(i).save(buf, format="JPEG", quality=95)
            zf.writestr(f"img_align_celeba/{i:06d}.jpg", buf.getvalue())
    ppath = folder / "list_eval_partition.txt"
    ppath.write_text("".join(f"{i:06d}.jpg {p}\n" for i, p in partition.items()))
    _register_fake(monkeypatch, "celeba32", [zpath, ppath])

    meta = data.prepare("celeba32", out_dir=tmp_path / "out", raw_dir=tmp_path / "raw", download=False)
    x, y = data.load_split(tmp_path / "out", "train")
    xt, yt = data.load_split(tmp_path / "out", "test")
    assert x.shape == (3, 32, 32, 3) and xt.shape == (2, 32, 32, 3) and x.dtype == np.uint8
    assert y.tolist() == [0, 0, 0] and yt.tolist() == [0, 0]
    assert meta["num_classes"] == 0 and meta["counts"] == {"train": 3, "test": 2}
    assert meta["preprocessing"]["crop_size"] == data.CELEBA_CROP == 178
    assert "LANCZOS" in meta["preprocessing"]["resize"]
    assert meta["raw_files"]["img_align_celeba.zip"]["verified_with"] == "md5"

    # train = partition 0 (images 1, 3, 6), test = partition 2 (2, 5), in file order
    green = lambda imgs: imgs[:, 8:24, 8:24, 1].mean(axis=(1, 2))  # noqa: E731
    assert np.allclose(green(x), [40 + 30 * i for i in (1, 3, 6)], atol=4)
    assert np.allclose(green(xt), [40 + 30 * i for i in (2, 5)], atol=4)
    # the centre crop removed the red bands at top and bottom ...
    assert x[:, :, 4:, 0].max() < 40
    # ... and kept the full width: the left stripe is still there (12/178 of 32 columns ~ 2)
    assert x[:, 4:28, 0, 2].min() > 180 and x[:, 4:28, 8:, 2].max() < 40


def test_celeba_partition_errors(tmp_path):
    p = tmp_path / "list_eval_partition.txt"
    p.write_text("000001.jpg 0\n000002.jpg 7\n")
    with pytest.raises(DPDMError, match=":2:"):
        data.read_celeba_partition(p)


def test_outputs_respect_the_umask_and_private_files_stay_private(tmp_path):
    """Results are readable by the group/others the umask allows (shared clusters);
    files in private folders stay owner-only."""
    import stat

    from dpdm.artifacts import save_json

    old = os.umask(0o022)
    try:
        save_json(tmp_path / "results" / "fid_acc.json", {"fid": 1.0})
        save_json(tmp_path / "results" / "private" / "run.json", {"seconds": 1.0})
        os.umask(0o077)
        save_json(tmp_path / "results" / "strict.json", {"fid": 1.0})
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE((tmp_path / "results" / p).stat().st_mode)

    assert mode("fid_acc.json") == 0o644
    assert mode("private/run.json") == 0o600
    assert mode("strict.json") == 0o600


# ----------------------------------------------------------------------------
# Issue 17: the public pre-training set (imagenet32) and Camelyon17, from their official
# folder layouts (tiny stand-ins written here; the real files need an account / 10 GB).


def _imagenet32_batches(raw: Path, per_file: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split, names in data.IMAGENET32_FILES.items():
        for name in names:
            (raw / name).parent.mkdir(parents=True, exist_ok=True)
            np.savez(raw / name, data=rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                     labels=rng.integers(1, 1001, per_file))


def test_imagenet32_reads_the_official_npz_batches(tmp_path):
    raw = data.raw_folder("imagenet32", tmp_path / "rawroot")
    _imagenet32_batches(raw)
    meta = data.prepare("imagenet32", tmp_path / "out", raw_dir=tmp_path / "rawroot", download=False)
    assert meta["counts"] == {"train": 30, "test": 3} and meta["num_classes"] == 1000
    x, y = data.load_split(tmp_path / "out", "train")
    with np.load(raw / data.IMAGENET32_FILES["train"][0]) as z:
        first, labels = z["data"][0], z["labels"]
    # channel planes (R, G, B of 32x32) -> H x W x C; labels 1..1000 -> 0..999
    assert np.array_equal(x[0][..., 0].reshape(-1), first[:1024])
    assert np.array_equal(x[0][..., 2].reshape(-1), first[2048:])
    assert np.array_equal(y[:3], labels - 1)


def test_imagenet32_errors_name_the_files_and_where_to_get_them(tmp_path):
    with pytest.raises(DPDMError, match=r"imagenet32: missing raw file\(s\).*train_data_batch_1.npz.*image-net.org"):
        data.prepare("imagenet32", tmp_path / "out", raw_dir=tmp_path / "none", download=False)
    raw = data.raw_folder("imagenet32", tmp_path / "rawroot")
    _imagenet32_batches(raw)
    np.savez(raw / data.IMAGENET32_FILES["train"][3], data=np.zeros((2, 12288), np.uint8), labels=np.ones(2))
    with pytest.raises(DPDMError, match="train_data_batch_4.npz: 'data' is uint8 \\(2, 12288\\)"):
        data.prepare("imagenet32", tmp_path / "out", raw_dir=tmp_path / "rawroot", download=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def _camelyon17_folder(raw: Path) -> list[dict]:
    from PIL import Image

    root = raw / data.CAMELYON17_ROOT
    rows = [{"patient": p, "node": n, "x_coord": x, "y_coord": 7, "tumor": t, "center": c, "split": s}
            # as WILDS' own file: 'split' is 0 (train) or 1 (in-distribution validation) in every
            # hospital; the official test (hospital 2) and OOD validation (hospital 1) are by centre
            for (p, n, x, t, c, s) in [(4, 1, 10, 0, 0, 0), (4, 1, 11, 1, 0, 0), (15, 2, 3, 1, 3, 0),
                                       (15, 2, 4, 0, 3, 1), (30, 0, 5, 0, 1, 0), (99, 4, 8, 1, 2, 0),
                                       (99, 4, 9, 0, 2, 1)]]
    for i, r in enumerate(rows):
        folder = root / "patches" / f"patient_{r['patient']:03d}_node_{r['node']}"
        folder.mkdir(parents=True, exist_ok=True)
        img = np.full((96, 96, 3), 20 * i, np.uint8)
        Image.fromarray(img).save(folder / f"patch_patient_{r['patient']:03d}_node_{r['node']}_x_{r['x_coord']}"
                                           f"_y_{r['y_coord']}.png")
    with open(root / "metadata.csv", "w") as f:
        f.write("," + ",".join(rows[0]) + "\n")
        for i, r in enumerate(rows):
            f.write(f"{i}," + ",".join(str(v) for v in r.values()) + "\n")
    return rows


def test_camelyon17_reads_the_wilds_folder_with_its_hospital_splits(tmp_path):
    raw = data.raw_folder("camelyon17", tmp_path / "rawroot")
    _camelyon17_folder(raw)
    meta = data.prepare("camelyon17", tmp_path / "out", raw_dir=tmp_path / "rawroot", download=False)
    # unused: the in-distribution validation row (split 1, hospital 3) and hospital 1 (OOD
    # validation) although its 'split' is 0; the test split is all of hospital 2, whatever its 'split'
    assert meta["counts"] == {"train": 3, "test": 2}
    assert "hospitals [0, 3]" in meta["preprocessing"]["split"]["train"]
    assert "hospitals [2]" in meta["preprocessing"]["split"]["test"]
    x, y = data.load_split(tmp_path / "out", "test")
    assert x.shape == (2, 32, 32, 3) and y.tolist() == [1, 0] and int(x[0].mean()) == 100
    x, y = data.load_split(tmp_path / "out", "train")
    assert y.tolist() == [0, 1, 1] and [int(v.mean()) for v in x] == [0, 20, 40]


def test_camelyon17_errors_name_the_files_and_the_fix(tmp_path):
    with pytest.raises(DPDMError, match=r"camelyon17: missing raw file\(s\).*metadata.csv.*wilds"):
        data.prepare("camelyon17", tmp_path / "out", raw_dir=tmp_path / "none", download=False)
    raw = data.raw_folder("camelyon17", tmp_path / "rawroot")
    rows = _camelyon17_folder(raw)
    r = rows[0]
    (raw / data.CAMELYON17_ROOT / "patches" / f"patient_{r['patient']:03d}_node_{r['node']}" /
     "patch_patient_004_node_1_x_10_y_7.png").unlink()
    with pytest.raises(DPDMError, match="patch_patient_004_node_1_x_10_y_7.png listed in metadata.csv"):
        data.prepare("camelyon17", tmp_path / "out", raw_dir=tmp_path / "rawroot", download=False)
    _camelyon17_folder(raw)  # every patch again
    csv = raw / data.CAMELYON17_ROOT / "metadata.csv"
    csv.write_text("".join(line for line in csv.read_text().splitlines(keepends=True) if not line.endswith(",2,0\n")
                           and not line.endswith(",2,1\n")))  # hospital 2's rows removed
    with pytest.raises(DPDMError, match=r"no row is in WILDS' official 'test' split \(hospital == 2\)"):
        data.prepare("camelyon17", tmp_path / "out", raw_dir=tmp_path / "rawroot", download=False)
