"""Memorisation check: does a sample set copy training images?

For every sample, its nearest training image and its nearest test image in pixel L2
(images in [0, 1]), and:

* the ratio d(sample, train) / d(sample, test): a sample that copies a training image
  has a ratio near 0. The ratio also depends on the sizes of the two sets (a larger
  training set is closer by being larger), so the same ratio of real held-out images is
  reported beside it: a model that generalises matches that distribution.
* near-copies by the criterion of Carlini et al. 2023 ("Extracting Training Data from
  Diffusion Models", Sec. 5.1): a sample x^ copies its nearest training image x when

      l(x^, x; S) = l2(x^, x) / (alpha * mean_{y in S} l2(x^, y))  <  1,

  S the n training images nearest to x^ (x among them), alpha = 0.5, n = 50 (their
  CIFAR-10 values): x^ is at least 1 / alpha times closer to x than to its typical
  close neighbours, so a sample in a dense region is not flagged for being close to
  many images at once. Real data has near-duplicates too (the same writer's digits),
  so the same fraction of real held-out images is reported: the rate of a model that
  samples fresh real data. Samples flagged well above that rate are copies.

With a feature extractor (the workflow passes FID's Inception when its weights are
configured) every statistic is also computed on the features ("feature_space"): a copy
that is shifted or re-coloured is far in pixels but near in features.

This reads the private training set: its numbers are NOT covered by the DP guarantee
(the JSON says so), and the figure of the closest sample / training pairs shows
training images, so the workflow writes it to the cell's private/ folder unless the
user opts in (config memorisation.publish_pairs).

Speed: one matrix product per chunk of samples against all training images on CPU;
measured in docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from dpdm.artifacts import DPDMError, provenance, save_json
from dpdm.data import read_images

log = logging.getLogger("dpdm")

ALPHA, NEIGHBOURS = 0.5, 50  # Carlini et al. 2023, Sec. 5.1 (CIFAR-10)
PAIRS_SHOWN = 16
RATIO_QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95)


def _flat(images: np.ndarray):
    """uint8 N x H x W x C -> float32 torch N x D in [0, 1]."""
    import torch

    return torch.from_numpy(images.reshape(len(images), -1)).float().div_(255.0)


def nearest(queries, refs, k: int = 1, chunk: int = 1024):
    """(distances [M, k], indices [M, k]) of each query row's k nearest rows of refs in
    L2, ascending; chunked over the queries: one chunk x N block of squared distances
    ||a||^2 + ||b||^2 - 2 a.b (float32; one addmm, no other temporaries of that size)."""
    import torch

    if not 1 <= k <= len(refs):
        raise DPDMError(f"nearest neighbours: k = {k} with {len(refs)} reference images")
    ref_t = refs.T.contiguous()
    ref_sq = refs.pow(2).sum(1)[None, :]
    dists, idx = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        d2 = torch.addmm(ref_sq, q, ref_t, alpha=-2.0).add_(q.pow(2).sum(1, keepdim=True)).clamp_min_(0)
        top = torch.topk(d2, k, dim=1, largest=False)  # sorted, smallest first
        dists.append(top.values.double().sqrt())
        idx.append(top.indices)
        del d2
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def _summary(ratio: np.ndarray) -> dict:
    return {"quantiles": {str(q): float(np.quantile(ratio, q)) for q in RATIO_QUANTILES},
            "mean": float(ratio.mean()), "fraction_below_0.5": float((ratio < 0.5).mean())}


def memorisation(samples: np.ndarray, train: np.ndarray, test: np.ndarray, alpha: float = ALPHA,
                 neighbours: int = NEIGHBOURS, chunk: int = 512, features=None) -> dict:
    """The statistics above for uint8 image arrays (samples, train, test); also the
    per-sample arrays (under "_arrays", not written to JSON) for the figure.

    The test split is cut in two fixed halves: the second is the reference of every
    d(., test); the first, real images the model never saw, gets the same statistics as
    the samples (their ratio and near-copy rate), so each number has its real-data
    baseline beside it, with the same set sizes.

    features: a feature extractor (dpdm.fid's, images -> [N, D]); then the same
    statistics in its feature space as well, under "feature_space"."""
    if samples.shape[1:] != train.shape[1:] or test.shape[1:] != train.shape[1:]:
        raise DPDMError(f"memorisation: samples {samples.shape[1:]}, training {train.shape[1:]} and test "
                        f"{test.shape[1:]} images differ in shape; compare samples with their own dataset")
    if not 0 < alpha <= 1 or neighbours < 2:
        raise DPDMError(f"memorisation: alpha must lie in (0, 1] and neighbours be >= 2 (got {alpha}, {neighbours})")
    if len(test) < 2:
        raise DPDMError(f"memorisation needs at least 2 test images (got {len(test)})")
    neighbours = min(int(neighbours), len(train))
    half = len(test) // 2
    tr, probe, ref = _flat(train), _flat(test[:half]), _flat(test[half:])
    d1, i1, dt, ratio, relative = _space_stats(_flat(samples), tr, ref, alpha, neighbours, chunk)
    _, _, _, real_ratio, real_relative = _space_stats(probe, tr, ref, alpha, neighbours, chunk)
    rms = 1.0 / np.sqrt(tr.shape[1])  # distances as root-mean-square per pixel value in [0, 1], as Carlini et al.
    out = {
        "num_samples": int(len(samples)), "num_train": int(len(train)), "num_test_reference": int(len(ref)),
        "num_real_probes": int(len(probe)),
        "criterion": {"name": "Carlini et al. 2023, Sec. 5.1", "alpha": float(alpha), "neighbours": neighbours,
                      "rule": "l2(x^, nearest train) < alpha * mean l2(x^, its `neighbours` nearest train)"},
        "near_copies": int((relative < 1).sum()),
        "near_copy_fraction": float((relative < 1).mean()),
        "near_copy_fraction_real": float((real_relative < 1).mean()),  # real images never trained on
        "ratio_train_test": _summary(ratio),
        "ratio_train_test_real": _summary(real_ratio),
        "nearest_train_rms": {"min": float(d1.min() * rms), "median": float(np.median(d1) * rms)},
        "nearest_test_rms": {"min": float(dt.min() * rms), "median": float(np.median(dt) * rms)},
        "_arrays": {"d_train": d1, "i_train": i1, "d_test": dt, "ratio": ratio, "relative": relative},
    }
    if features is not None:
        out["feature_space"] = _feature_space(samples, train, test, half, features, alpha, neighbours, chunk, i1)
    return out


def _space_stats(queries, tr, ref, alpha: float, neighbours: int, chunk: int):
    """(d to the nearest training row, its index, d to the nearest reference row, their
    ratio, Carlini et al.'s relative distance) of every query row."""
    d_train, i_train = nearest(queries, tr, k=neighbours, chunk=chunk)  # the whole training set
    d_test = nearest(queries, ref, k=1, chunk=chunk)[0][:, 0]
    d1 = d_train[:, 0]
    relative = d1 / np.maximum(alpha * d_train.mean(axis=1), 1e-12)  # Carlini et al.'s l(x^, x; S)
    return d1, i_train[:, 0], d_test, d1 / np.maximum(d_test, 1e-12), relative


def _feature_space(samples, train, test, half, features, alpha, neighbours, chunk, pixel_nearest) -> dict:
    """The same statistics on feature vectors (e.g. Inception's, as FID): a copy that is
    shifted or re-coloured is far in pixels but near in features."""
    import torch

    def feats(images):
        return torch.from_numpy(np.asarray(features(images), dtype=np.float32))

    tr, probe, ref = feats(train), feats(test[:half]), feats(test[half:])
    _, i1, _, ratio, relative = _space_stats(feats(samples), tr, ref, alpha, neighbours, chunk)
    _, _, _, real_ratio, real_relative = _space_stats(probe, tr, ref, alpha, neighbours, chunk)
    return {
        "extractor": getattr(features, "identity", {}).get("name", type(features).__name__),
        "near_copies": int((relative < 1).sum()),
        "near_copy_fraction": float((relative < 1).mean()),
        "near_copy_fraction_real": float((real_relative < 1).mean()),
        "ratio_train_test": _summary(ratio),
        "ratio_train_test_real": _summary(real_ratio),
        "same_nearest_as_pixels": float((i1 == pixel_nearest).mean()),
    }


NOT_COVERED = ("computed from the private training set (nearest training images of every sample): these numbers "
               "are NOT covered by the DP guarantee; publish them only as a statistic of the private data")


def check_memorisation(samples_path, train_path, test_path, out_path, pairs_path, settings: dict | None = None,
                       alpha: float = ALPHA, neighbours: int = NEIGHBOURS, extractor: str | None = None,
                       weights_path=None, device="auto") -> dict:
    """memorisation() of a sample file against the prepared splits -> JSON at out_path and
    the figure of the PAIRS_SHOWN closest sample / training pairs at pairs_path.
    extractor: also in the feature space of dpdm.fid's extractor ("inception" with its
    weights; "untrained" for tests only)."""
    started = time.time()
    samples = read_images(samples_path, "samples", labels="ignored")[0]
    train = read_images(train_path, "training split", labels="ignored")[0]
    test = read_images(test_path, "test split", labels="ignored")[0]
    features = None
    if extractor:
        from dpdm import fid

        features = fid.build_extractor(extractor, weights_path, device)
    result = memorisation(samples, train, test, alpha, neighbours, features=features)
    arrays = result.pop("_arrays")
    closest = np.argsort(arrays["d_train"], kind="stable")[:PAIRS_SHOWN]
    _pairs_figure(samples[closest], train[arrays["i_train"][closest]], arrays["relative"][closest], pairs_path)
    result.update(covered_by_dp=False, not_covered=NOT_COVERED, samples_path=str(samples_path),
                  pairs_figure=str(pairs_path), seconds=round(time.time() - started, 2))
    result["provenance"] = provenance(cell=(settings or {}).get("cell"), settings=settings,
                                      inputs=[samples_path, test_path], private_inputs=[train_path],
                                      started=started)
    save_json(out_path, result)
    log.info("memorisation %s: %d of %d samples are near-copies of a training image (Carlini et al.; real held-out "
             "images: %.2f%%); median d(train) / d(test) = %.3f; %.1f s", samples_path, result["near_copies"],
             result["num_samples"], 100 * result["near_copy_fraction_real"],
             result["ratio_train_test"]["quantiles"]["0.5"], result["seconds"])
    return result


def _pairs_figure(samples: np.ndarray, train: np.ndarray, relative: np.ndarray, path) -> None:
    """Two rows per block: the samples closest to a training image, and those images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpdm.artifacts import atomic_path

    n = len(samples)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(0.9 * max(n, 1), 2.3), squeeze=False)
    for j in range(n):
        for row, img in ((0, samples[j]), (1, train[j])):
            ax = axes[row, j]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(f"{relative[j]:.2f}", fontsize=6)
    axes[0, 0].set_ylabel("sample", fontsize=7)
    axes[1, 0].set_ylabel("train", fontsize=7)
    fig.suptitle("closest sample / training pairs (PRIVATE: shows training images); titles: Carlini et al.'s "
                 "relative distance, < 1 is a near-copy", fontsize=7)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    plt.close(fig)
