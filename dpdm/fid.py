"""Frechet Inception Distance: Inception features, reference statistics, the distance.

Features are pytorch-fid's: the 2048-d pool3 output of the FID Inception network
(TensorFlow's 2015-12-05 Inception ported to PyTorch, with its patched blocks), fed
uint8 images scaled to [0, 1], grayscale repeated to three channels, resized
bilinearly to 299 x 299 and mapped to [-1, 1] exactly as pytorch-fid's
`InceptionV3(resize_input=True, normalize_input=True)` does. The network is built here
from pytorch-fid's blocks on top of torchvision's Inception (no weights downloaded),
and the weights are loaded from a local file whose SHA-256 is checked.

Weights are looked up in this order: an explicit path (config `paths.fid_weights`,
env `DPDM_FID_WEIGHTS`, CLI `--weights`), then torch hub's checkpoint folder (where
pytorch-fid itself would have cached them). `python -m dpdm fetch-weights` downloads
them on a machine with internet.

`extractor="untrained"` uses the same architecture with random weights from a fixed
seed. It exists so the pipeline can be tested offline: its numbers are NOT FIDs and
every file it touches says so (`"test_only": true`).

Statistics remember which extractor made them, and `compute_fid` refuses to compare
statistics made by different extractors.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dpdm.artifacts import DPDMError, atomic_path, provenance, save_json, save_npz, sha256_file
from dpdm.data import read_images
from dpdm.devices import pick_device
from dpdm.prdc import PRDC_METRICS

log = logging.getLogger(__name__)

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILENAME}"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_SIZE = 95_628_359
WEIGHTS_ENV = "DPDM_FID_WEIGHTS"
FETCH_COMMAND = f"python -m dpdm fetch-weights --out weights/{WEIGHTS_FILENAME}"

EXTRACTORS = ("inception", "untrained")
UNTRAINED_SEED = 0
FEATURE_DIM = 2048
INCEPTION_NAME = "pytorch-fid-inception-v3-pool3"
UNTRAINED_NAME = "untrained"

# (resolved path, size, mtime_ns) -> sha256, so a weights file is hashed once per process.


# ----------------------------------------------------------------------------
# Weights: download, lookup, verification.


def _missing_weights_message(detail: str) -> str:
    return (
        f"{detail}\n"
        f"FID needs pytorch-fid's Inception weights: file {WEIGHTS_FILENAME} "
        f"({WEIGHTS_SIZE:,} bytes, sha256 {WEIGHTS_SHA256}) from {WEIGHTS_URL}.\n"
        f"Fix: on a machine with internet run `{FETCH_COMMAND}` (or download the URL), copy the file here, "
        f"and point to it with config key paths.fid_weights, env {WEIGHTS_ENV}=/path/{WEIGHTS_FILENAME}, "
        f"or --weights; or place it in torch hub's cache {_hub_weights_path()}."
    )


def _hub_weights_path() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def verify_weights(path: str | os.PathLike) -> str:
    """Check that `path` holds the FID Inception weights; return its sha256."""
    path = Path(path)
    if not path.is_file():
        raise DPDMError(_missing_weights_message(f"Inception weights file {path} does not exist."))
    digest = sha256_file(path)
    if digest != WEIGHTS_SHA256:
        raise DPDMError(
            f"Inception weights file {path} has sha256 {digest} ({path.stat().st_size:,} bytes), "
            f"but pytorch-fid's FID weights have sha256 {WEIGHTS_SHA256} ({WEIGHTS_SIZE:,} bytes). "
            f"The file is corrupt, truncated or a different network. Delete it and fetch it again with "
            f"`{FETCH_COMMAND}` (on a machine with internet), from {WEIGHTS_URL}."
        )
    return digest


def resolve_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The verified weights file: explicit path, else env DPDM_FID_WEIGHTS, else torch hub's cache."""
    if weights_path is None or str(weights_path) == "":
        weights_path = os.environ.get(WEIGHTS_ENV) or None
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        verify_weights(path)
        return path
    hub = _hub_weights_path()
    if hub.is_file():
        verify_weights(hub)
        return hub
    raise DPDMError(
        _missing_weights_message(
            f"no Inception weights file was given (paths.fid_weights / {WEIGHTS_ENV} / --weights) "
            f"and none is in torch hub's cache ({hub})."
        )
    )


def fetch_weights(out_path: str | os.PathLike, url: str = WEIGHTS_URL, timeout: float = 60.0) -> Path:
    """Download the FID Inception weights to `out_path`, verify the sha256, rename into place."""
    import hashlib

    from tqdm import tqdm

    out_path = Path(out_path)
    if out_path.is_file():
        try:
            verify_weights(out_path)
            log.info("%s already present and verified (sha256 %s)", out_path, WEIGHTS_SHA256)
            return out_path
        except DPDMError:
            log.warning("%s exists but its checksum is wrong; downloading again", out_path)
    log.info("downloading %s -> %s", url, out_path)
    h = hashlib.sha256()
    try:
        with atomic_path(out_path) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                total = int(resp.headers.get("Content-Length") or WEIGHTS_SIZE)
                with tqdm(total=total, unit="B", unit_scale=True, desc=WEIGHTS_FILENAME) as bar:
                    while block := resp.read(1 << 20):
                        f.write(block)
                        h.update(block)
                        bar.update(len(block))
            if h.hexdigest() != WEIGHTS_SHA256:
                raise DPDMError(
                    f"downloaded {url} but its sha256 is {h.hexdigest()}, expected {WEIGHTS_SHA256}; "
                    "the download was corrupted or the file changed upstream. Try again."
                )
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DPDMError(
            f"could not download {url}: {e}. This command needs the internet: run `{FETCH_COMMAND}` on a machine "
            f"that has it and copy the file ({WEIGHTS_SIZE:,} bytes, sha256 {WEIGHTS_SHA256}) here, then set "
            f"paths.fid_weights or {WEIGHTS_ENV}."
        ) from e
    log.info("wrote %s (sha256 verified)", out_path)
    return out_path


# ----------------------------------------------------------------------------
# The network.


def _fid_inception_backbone():
    """torchvision's Inception v3 with pytorch-fid's FID blocks, on the meta device: no
    weights until the caller loads or draws them (PyTorch's default init of the 24M
    weights, always replaced, cost ~3 s per FID job on CPU)."""
    import torch
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

    with torch.device("meta"):
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE_1(1280)
        net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def _untrained_backbone(seed: int):
    """The FID architecture with random weights, identical for a given seed (TEST ONLY).

    Convolutions get He-normal weights so activations keep their scale through the
    network (PyTorch's default init shrinks them by orders of magnitude over ~40 layers);
    batch norms are the identity.
    """
    import torch

    net = _fid_inception_backbone().to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.reset_parameters()  # weight 1, bias 0, running mean 0 and var 1
            elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
                raise DPDMError(f"untrained FID extractor: no rule to initialise {type(m).__name__}")
    return net


@functools.lru_cache(maxsize=2)
def untrained_state_dict(seed: int = UNTRAINED_SEED) -> dict:
    """The untrained extractor's weights (TEST ONLY), e.g. to save as a stand-in weights file."""
    return {k: v.clone() for k, v in _untrained_backbone(seed).state_dict().items()}


class InceptionFeatures:
    """Callable: uint8 NHWC batch (numpy or tensor) -> float64 (B, 2048) pool3 features.

    On CPU a batch goes through the network CPU_CHUNK images at a time: large calls are
    slower there (2 cores, 96 images in one process: 8.4 images/s at 16 per call, 6.1 at
    96), mostly from faulting in fresh memory for the 299x299 activations (system time
    3.1 s against 9.1 s; with dpdm.memory.keep_freed_memory, as the CLI runs, 10.5
    images/s at 16 and 7.8 at 96). Features are per image (eval mode), so the chunking
    changes nothing but float rounding."""

    CPU_CHUNK = 16

    def __init__(self, net, device, identity: dict):
        self.net = net.to(device).eval()
        self.device = device
        self.identity = identity

    def _forward(self, x):
        import torch.nn.functional as F

        n = self.net
        # pytorch-fid InceptionV3(resize_input=True, normalize_input=True): input in [0, 1].
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        # Block 0
        x = n.Conv2d_1a_3x3(x)
        x = n.Conv2d_2a_3x3(x)
        x = n.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        # Block 1
        x = n.Conv2d_3b_1x1(x)
        x = n.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        # Block 2
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = getattr(n, name)(x)
        # Block 3
        for name in ("Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        x = F.adaptive_avg_pool2d(x, output_size=(1, 1))
        return x.flatten(1)

    def __call__(self, images) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.ascontiguousarray(images)).to(self.device)
            x = uint8_to_unit(x)
            chunk = self.CPU_CHUNK if x.device.type == "cpu" else max(len(x), 1)
            return torch.cat([self._forward(c) for c in x.split(chunk)]).double().cpu().numpy()


def uint8_to_unit(x):
    """uint8 NHWC (C in {1, 3}) -> float32 NCHW in [0, 1] with three channels."""
    import torch

    if x.dtype != torch.uint8:
        raise DPDMError(f"images must be uint8, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DPDMError(f"images must be uint8 NHWC with 1 or 3 channels, got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x


def build_extractor(extractor: str = "inception", weights_path=None, device: Any = "auto") -> InceptionFeatures:
    """The feature extractor and its identity (name, weights, test_only)."""
    import torch

    if not isinstance(device, torch.device):
        device = pick_device(device or "auto")
    if extractor == "inception":
        net = _fid_inception_backbone()
        path = resolve_weights(weights_path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state, assign=True)  # every tensor from the file (strict)
        except RuntimeError as e:
            raise DPDMError(f"Inception weights file {path} does not fit the FID Inception network: {e}") from e
        identity = {
            "name": INCEPTION_NAME,
            "weights": sha256_file(path),
            "weights_path": str(path),
            "test_only": False,
        }
    elif extractor == "untrained":
        log.warning(
            "FID extractor 'untrained': random Inception weights (seed %d). These numbers are NOT FIDs "
            "and are for offline tests only.", UNTRAINED_SEED,
        )
        net = _untrained_backbone(UNTRAINED_SEED)
        identity = {
            "name": UNTRAINED_NAME,
            "weights": f"untrained-seed-{UNTRAINED_SEED}",
            "weights_path": None,
            "test_only": True,
        }
    else:
        raise DPDMError(f"unknown FID extractor '{extractor}'; choose one of {EXTRACTORS}")
    identity["feature_dim"] = FEATURE_DIM
    identity["preprocessing"] = "uint8/255, gray->RGB, bilinear resize to 299x299 (align_corners=False), 2x-1"
    for p in net.parameters():
        p.requires_grad_(False)
    return InceptionFeatures(net, device, identity)


# ----------------------------------------------------------------------------
# Statistics.


def activation_statistics(images: np.ndarray, features: InceptionFeatures, batch_size: int = 200,
                          desc: str = "inception features", keep: int = 0) -> tuple:
    """Mean and covariance (float64) of the features of `images`, streamed batch by batch;
    with keep > 0 also the features (float32) of the first `keep` images, for precision /
    recall (dpdm.prdc): (mu, sigma) or (mu, sigma, kept).

    Sums are taken around a shift (the first batch's mean) so the covariance is as
    accurate as numpy's two-pass `np.cov`.
    """
    from tqdm import tqdm

    n = len(images)
    if n < 2:
        raise DPDMError(f"need at least 2 images for a covariance, got {n}")
    if batch_size < 1:
        raise DPDMError(f"batch_size must be >= 1, got {batch_size}")
    shift = s1 = s2 = None
    kept = []
    with tqdm(total=n, desc=desc, unit="img", mininterval=5.0) as bar:
        for start in range(0, n, batch_size):
            act = features(images[start:start + batch_size])
            if shift is None:
                shift = act.mean(axis=0)
                s1 = np.zeros_like(shift)
                s2 = np.zeros((act.shape[1], act.shape[1]))
            d = act - shift
            s1 += d.sum(axis=0)
            s2 += d.T @ d
            if start < keep:
                kept.append(act[:keep - start].astype(np.float32))
            bar.update(len(act))
    mu = shift + s1 / n
    sigma = (s2 - np.outer(s1, s1) / n) / (n - 1)
    sigma = 0.5 * (sigma + sigma.T)
    return (mu, sigma, np.concatenate(kept)) if keep > 0 else (mu, sigma)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (eigen-decomposition; tiny negative
    eigenvalues from rounding are clipped to 0)."""
    w, v = np.linalg.eigh(0.5 * (sigma + sigma.T))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma1: np.ndarray | None = None) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), the quantity pytorch-fid computes.

    pytorch-fid takes scipy's sqrtm of the non-symmetric S1 S2 (about a minute for
    2048 x 2048 on 2 CPU cores). S1 S2 is similar to the symmetric A S2 A with A = S1^(1/2),
    so Tr sqrt(S1 S2) = sum_i sqrt(lambda_i(A S2 A)): two symmetric eigen-decompositions,
    seconds, exact for positive semi-definite covariances (tests/test_fid.py checks it
    against scipy.linalg.sqrtm), and no singular-matrix fallback is needed. Pass
    `sqrt_sigma1` (psd_sqrt(sigma1)) to compare one sample set with several references."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DPDMError(f"statistics have different shapes: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {sigma1.shape} vs {sigma2.shape}")
    root = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    inner = root @ sigma2 @ root
    lam = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    trace_covmean = float(np.sqrt(np.clip(lam, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def _identity_fields(identity: dict) -> dict:
    return {
        "extractor_name": np.array(identity["name"]),
        "extractor_weights": np.array(identity["weights"]),
        "test_only": np.array(bool(identity["test_only"])),
        "feature_dim": np.array(int(identity["feature_dim"])),
    }


def _scalar(a):
    """A python scalar from a 0-d (or one-element) npz entry."""
    a = np.asarray(a)
    if a.size != 1:
        raise DPDMError(f"expected a single value, got an array of shape {a.shape}")
    return a.reshape(-1)[0].item()


def load_reference(path: str | os.PathLike) -> dict:
    """Reference statistics: mu, sigma (arrays) and python scalars for everything else."""
    path = Path(path)
    if not path.is_file():
        raise DPDMError(f"FID reference statistics {path} do not exist; make them with `python -m dpdm fid-ref`")
    try:
        with np.load(path, allow_pickle=False) as d:
            ref = {k: (d[k] if k in ("mu", "sigma", "features") else d[k].tolist() if k == "image_shape" else _scalar(d[k]))
                   for k in d.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DPDMError(f"FID reference statistics {path} are truncated or not an .npz ({type(e).__name__}: {e}); "
                        "delete the file and recompute it with `python -m dpdm fid-ref`") from e
    for key in ("mu", "sigma", "extractor_name", "extractor_weights", "image_shape"):
        if key not in ref:
            raise DPDMError(f"{path} lacks '{key}': it was not written by `python -m dpdm fid-ref` (statistics "
                            "must record the extractor and the image shape they were made with). Recompute it with `python -m dpdm fid-ref`.")
    return ref


def compute_reference(data_dir, split, out_path, extractor="inception", weights_path=None, batch_size=200,
                      device="auto", num_images: int | None = None, keep_features: int = 0) -> dict:
    """Inception statistics of a real split -> npz (mu, sigma, n, extractor identity).

    num_images: use the split's first N images (config fid.reference_images; None: all,
    as the paper). Fewer images make a noisier reference: for smoke tests.
    keep_features: also store the features of the first N images (config fid.prdc_images),
    the real side of precision / recall and density / coverage."""
    started = time.time()
    data_path = Path(data_dir) / f"{split}.npz"
    images = read_images(data_path, "image file", labels="ignored")[0]
    if num_images is not None:
        if not 2 <= num_images:
            raise DPDMError(f"fid.reference_images = {num_images}: a covariance needs at least 2 images")
        images = images[:num_images]
    features = build_extractor(extractor, weights_path, device)
    stats = activation_statistics(images, features, batch_size, desc=f"fid-ref {split}", keep=keep_features)
    mu, sigma = stats[:2]
    kept = {"features": stats[2]} if keep_features else {}
    ident = features.identity
    save_npz(
        out_path,
        mu=mu,
        sigma=sigma,
        **kept,
        n=np.array(len(images)),
        image_shape=np.array(images.shape[1:]),  # H, W, C: samples of another shape are refused
        split=np.array(split),
        source_path=np.array(str(data_path)),
        source_sha256=np.array(sha256_file(data_path)),
        wall_time_s=np.array(time.time() - started),
        **_identity_fields(ident),
    )
    log.info("wrote %s: %d %s images, extractor %s (%s)%s", out_path, len(images), split, ident["name"],
             ident["weights"], " TEST ONLY" if ident["test_only"] else "")
    return {"mu": mu, "sigma": sigma, "n": len(images), "extractor": ident}


def _shape_text(shape) -> str:
    h, w, c = (int(v) for v in shape)
    return f"{h}x{w} {'grayscale' if c == 1 else 'RGB' if c == 3 else f'{c}-channel'}"


def _prdc_sample_count(ref_paths, refs, num_images: int) -> int:
    """How many samples' features precision / recall use: as many as the references
    hold (fid-ref --keep-features), at most the samples there are."""
    missing = [str(p) for p, r in zip(ref_paths, refs) if "features" not in r]
    if missing:
        raise DPDMError(f"precision / recall need the reference's features, but {', '.join(missing)} hold only the "
                        "mean and covariance: recompute them with `python -m dpdm fid-ref --keep-features N` (the "
                        "workflow does this when config fid.prdc_k is set)")
    return min(num_images, max(len(r["features"]) for r in refs))


PRIVATE_SPLIT = "train"  # the split DP training reads: statistics of it are not covered by the guarantee


def compute_fid(samples_path, ref_path, out_path, extractor="inception", weights_path=None, num_samples=None,
                batch_size=200, device="auto", settings: dict | None = None, prdc_k: int | None = None) -> dict:
    """FID of the samples against one or more reference statistics -> JSON.

    `ref_path` is one path or a list (e.g. the train and the test split's statistics):
    the samples' features are computed once. "fid" is the first reference's value (the
    paper's: the training split), "fids" maps each reference's split to its value. A FID
    against the training split is a statistic of the private data, not post-processing
    of the DP model: "covered_by_dp" says so per reference.

    prdc_k: also precision / recall and density / coverage (dpdm.prdc, k nearest
    neighbours) against each reference's stored features (fid-ref --keep-features), on
    as many samples as the reference has features: "prdc" per split, and the first
    reference's four values beside "fid"."""
    started = time.time()
    ref_paths = [Path(p) for p in (ref_path if isinstance(ref_path, (list, tuple)) else [ref_path])]
    if not ref_paths:
        raise DPDMError("fid needs at least one reference statistics file (--ref)")
    refs = [load_reference(p) for p in ref_paths]
    features = build_extractor(extractor, weights_path, device)
    ident = features.identity
    for path, ref in zip(ref_paths, refs):
        ref_ident = (ref["extractor_name"], ref["extractor_weights"])
        if ref_ident != (ident["name"], ident["weights"]):
            raise DPDMError(
                f"refusing to compare statistics made by different feature extractors: reference {path} was "
                f"made by {ref_ident[0]} (weights {ref_ident[1]}), the samples would use {ident['name']} "
                f"(weights {ident['weights']}). Recompute the reference with the same --extractor/--weights "
                "(`python -m dpdm fid-ref`)."
            )
    images = read_images(samples_path, "image file", labels="ignored")[0]
    for path, ref in zip(ref_paths, refs):
        if tuple(ref["image_shape"]) != images.shape[1:]:
            raise DPDMError(f"samples {samples_path} are {_shape_text(images.shape[1:])} images but reference {path} "
                            f"was computed on {_shape_text(ref['image_shape'])} images: compare samples with the "
                            "statistics of their own dataset")
    if num_samples is not None:
        if num_samples > len(images):
            raise DPDMError(f"--num-samples {num_samples} but {samples_path} holds only {len(images)} images")
        images = images[:num_samples]
    keep = _prdc_sample_count(ref_paths, refs, len(images)) if prdc_k else 0
    mu, sigma, *kept = activation_statistics(images, features, batch_size, desc="fid samples", keep=keep)
    references, root = [], psd_sqrt(sigma)
    for path, ref in zip(ref_paths, refs):
        split = ref.get("split")
        references.append({"path": str(path), "split": split, "n": ref.get("n"),
                           "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"], sqrt_sigma1=root),
                           "covered_by_dp": split != PRIVATE_SPLIT})
        if prdc_k:
            from dpdm.prdc import prdc

            references[-1]["prdc"] = prdc(ref["features"], kept[0], k=int(prdc_k))
    splits = [r["split"] for r in references]
    if len(set(splits)) != len(splits):
        raise DPDMError(f"fid: two references of the same split {splits}; give one per split")
    value = references[0]["fid"]
    result = {
        "fid": value,
        "fids": {r["split"]: r["fid"] for r in references},
        **({"prdc": {r["split"]: r["prdc"] for r in references}, **{m: references[0]["prdc"][m] for m in PRDC_METRICS}}
           if prdc_k else {}),
        "num_samples": len(images),
        "samples_path": str(samples_path),
        "reference": references[0],
        "references": references,
        "covered_by_dp": references[0]["covered_by_dp"],
        "extractor": ident,
        "test_only": bool(ident["test_only"]),
    }
    if not all(r["covered_by_dp"] for r in references):
        result["not_covered"] = ("FID against the training split is a statistic of the private data, not "
                                 "post-processing of the DP model: the DP guarantee does not cover it")
    if ident["test_only"]:
        result["warning"] = "computed with the untrained (random-weight) extractor: NOT an FID; for tests only"
    result["provenance"] = provenance(
        cell=(settings or {}).get("cell"),
        settings=settings,
        inputs=[samples_path] + [p for p, r in zip(ref_paths, references) if r["covered_by_dp"]],
        private_inputs=[p for p, r in zip(ref_paths, references) if not r["covered_by_dp"]],
        started=started,
        device=features.device,
    )
    save_json(out_path, result)
    log.info("FID %s = %s (%d samples, extractor %s)%s", samples_path,
             ", ".join(f"{r['split']} {r['fid']:.4f}" for r in references), len(images), ident["name"],
             " TEST ONLY" if ident["test_only"] else "")
    return result
