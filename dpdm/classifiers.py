"""Downstream classifiers: the paper's synthetic-train / real-test protocol and DP-SGD baselines.

Models (paper Sec. 5 / App. C, after Cao et al. 2021): logistic regression, an MLP with
one hidden layer of 100 ReLU units, and a CNN of three 3x3 convolutions (32, 64, 128
channels, each followed by ReLU, 2x2 max-pooling and dropout 0.5), a 128-unit dense
layer and the output layer. The CNN uses 'same' padding so it works for any input
resolution >= 8 and any number of channels (28x28 -> 3x3x128 = 1152 features, as in
the paper's MNIST CNN). There is no BatchNorm, so every model also trains under
DP-SGD with Opacus. Inputs are scaled to [-1, 1] (x / 127.5 - 1) everywhere.

`classify` (Tables 1, 3): train on the synthetic set (90 %), pick the epoch with the
best accuracy on the held-out synthetic validation set (10 %, stratified), report the
accuracy on the REAL test set at that epoch. The test set never influences anything.

`dp_baseline` (Table 2): the same classifier trained on the real training set with
DP-SGD (Opacus: per-example clipping, Gaussian noise, Poisson subsampling), the noise
calibrated for (target epsilon, delta); the result carries a privacy ledger whose
epsilons are recomputed by the accountants from the steps actually taken (the same
ledger as the generator's, dpdm.privacy.privacy_ledger, with K = 1). It reports
the LAST epoch: selecting a checkpoint with (a validation split of) the private data
would leak privacy that the ledger does not account for.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dpdm.artifacts import DPDMError, provenance, save_json, sha256_file, torch_load_error
from dpdm.data import read_images
from dpdm.devices import pick_device
from dpdm.networks import count_parameters
from dpdm.registry import CLASSIFIERS

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1000
INPUT_SCALING = "[-1, 1] (x / 127.5 - 1)"


# ----------------------------------------------------------------------------
# Models.


def _nn():
    import torch.nn as nn

    return nn


def _hw(resolution) -> tuple[int, int]:
    if isinstance(resolution, (tuple, list)):
        h, w = (int(r) for r in resolution)
    else:
        h = w = int(resolution)
    if h < 1 or w < 1:
        raise DPDMError(f"image resolution must be positive, got {resolution}")
    return h, w


def LogReg(resolution, channels: int, num_classes: int):
    """Multinomial logistic regression: one linear layer on the flattened image."""
    nn = _nn()
    h, w = _hw(resolution)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * h * w, num_classes))


def MLP(resolution, channels: int, num_classes: int, hidden: int = 100):
    """One hidden layer of 100 ReLU units."""
    nn = _nn()
    h, w = _hw(resolution)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class ExampleDropout(torch.nn.Dropout):
    """Dropout whose mask for example i comes from generators[i] alone (set per batch by
    `use_example_generators`); without generators (or in eval mode), ordinary dropout.

    Under DP-SGD the masks are part of each example's loss: drawn by position from a
    shared stream, adding one example would shift the masks of every example after it
    and break the sensitivity bound; keyed per example (dpdm.privacy.example_seeds)
    they do not depend on the rest of the batch."""

    generators = None

    def forward(self, x):
        if not self.training or self.p == 0 or self.generators is None:
            return super().forward(x)
        if len(self.generators) != x.shape[0]:
            raise ValueError(f"{len(self.generators)} example generators for a batch of {x.shape[0]}")
        keep = 1.0 - self.p
        mask = [torch.rand(x.shape[1:], generator=g, device=x.device) < keep for g in self.generators]
        mask = torch.stack(mask) if mask else x.new_zeros(x.shape, dtype=torch.bool)
        return x * mask.to(x.dtype) / keep


def use_example_generators(model, generators) -> None:
    """Draw every dropout mask of the next forward from per-example generators (None: ordinary dropout)."""
    for m in model.modules():
        if isinstance(m, ExampleDropout):
            m.generators = None if generators is None else list(generators)


def CNN(resolution, channels: int, num_classes: int, widths=(32, 64, 128), dense: int = 128, dropout: float = 0.5):
    """Three [3x3 conv ('same') -> ReLU -> 2x2 max-pool -> dropout] stages, dense 128, output."""
    nn = _nn()
    h, w = _hw(resolution)
    layers, c = [], channels
    for width in widths:
        layers += [nn.Conv2d(c, width, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2), ExampleDropout(dropout)]
        c = width
        h, w = h // 2, w // 2
    if h < 1 or w < 1:
        raise DPDMError(f"the CNN needs images of at least 8x8 pixels, got {resolution}")
    layers += [nn.Flatten(), nn.Linear(c * h * w, dense), nn.ReLU(), ExampleDropout(dropout), nn.Linear(dense, num_classes)]
    return nn.Sequential(*layers)


class WideBlock(torch.nn.Module):
    """Pre-activation basic block of a wide ResNet (Zagoruyko & Komodakis 2016) with
    GroupNorm for BatchNorm (De et al. 2022: per-example gradients need no batch statistics)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int = 16):
        super().__init__()
        nn = _nn()
        self.norm0 = nn.GroupNorm(min(groups, c_in), c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if (c_in != c_out or stride != 1) else None

    def forward(self, x):
        a = torch.relu(self.norm0(x))
        y = self.conv1(torch.relu(self.norm1(self.conv0(a))))
        return y + (x if self.skip is None else self.skip(a))


def WRN(resolution, channels: int, num_classes: int, depth: int = 16, width: int = 4):
    """WRN-depth-width: a 3x3 stem of 16 channels, three stages of (depth - 4) / 6 blocks
    of 16w, 32w, 64w channels (strides 1, 2, 2), GroupNorm, ReLU, global average pool,
    linear. The classifier of Ghalebikesabi et al. 2023 for CIFAR-10 / Camelyon17."""
    nn = _nn()
    _hw(resolution)
    if (depth - 4) % 6:
        raise DPDMError(f"WRN depth must be 6n + 4 (16, 22, 28, ...), got {depth}")
    n = (depth - 4) // 6
    layers, c = [nn.Conv2d(channels, 16, 3, padding=1, bias=False)], 16
    for stage, stride in zip((16 * width, 32 * width, 64 * width), (1, 2, 2)):
        for i in range(n):
            layers.append(WideBlock(c, stage, stride if i == 0 else 1))
            c = stage
    layers += [nn.GroupNorm(16, c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


_BUILDERS = {"logreg": LogReg, "mlp": MLP, "cnn": CNN,
             "wrn-16-4": lambda r, c, k: WRN(r, c, k, 16, 4), "wrn-28-10": lambda r, c, k: WRN(r, c, k, 28, 10)}


def build_classifier(name: str, resolution, channels: int, num_classes: int):
    """A fresh classifier (torch.nn.Module) for images of `resolution` x `channels`; logits out."""
    if name not in _BUILDERS:
        raise DPDMError(f"unknown classifier '{name}'; choose one of {list(CLASSIFIERS)}")
    if num_classes < 2:
        raise DPDMError(f"a classifier needs at least 2 classes, got num_classes = {num_classes}")
    if channels < 1:
        raise DPDMError(f"channels must be >= 1, got {channels}")
    return _BUILDERS[name](resolution, int(channels), int(num_classes))


# ----------------------------------------------------------------------------
# Data.


def _registry_num_classes(dataset: str | None) -> int | None:
    if not dataset:
        return None
    try:
        from dpdm.data import dataset_spec

        return int(dataset_spec(dataset).num_classes)
    except Exception:  # registry unavailable or unknown name: fall back to meta.json / labels
        return None


def _meta_num_classes(folder: Path) -> int | None:
    import json

    path = Path(folder) / "meta.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("num_classes")
    except (ValueError, OSError, AttributeError):
        return None
    return None if value is None else int(value)


def _num_classes(settings: dict, data_folder: Path, *label_sets: np.ndarray) -> int:
    """Classes of the cell's dataset: registry, else meta.json, else the labels. 0 = unconditional."""
    dataset = (settings.get("cell") or {}).get("dataset")
    for source, value in (("dataset registry", _registry_num_classes(dataset)),
                          (f"{data_folder}/meta.json", _meta_num_classes(data_folder))):
        if value is not None:
            log.debug("num_classes = %d (from the %s)", value, source)
            return value
    return int(max(int(lab.max(initial=-1)) for lab in label_sets) + 1)


def _unconditional_error(what: str) -> DPDMError:
    return DPDMError(
        f"{what}: classification accuracy needs class labels, but this dataset/sample set is unconditional "
        "(num_classes = 0, labels absent or -1). Classifier evaluation (paper Tables 1-3) applies only to "
        "class-conditional datasets (mnist, fashion_mnist, cifar10, digits); remove 'classify'/'baseline' for it "
        "from the config."
    )


def _check_labels(labels: np.ndarray | None, num_classes: int, what: str) -> np.ndarray:
    if num_classes == 0 or labels is None or len(labels) == 0 or (labels < 0).any():
        raise _unconditional_error(what)
    if labels.max() >= num_classes:
        raise DPDMError(f"{what}: label {labels.max()} is out of range 0..{num_classes - 1}")
    return labels


def _to_tensors(images: np.ndarray, labels: np.ndarray, device):
    """uint8 NHWC -> uint8 NCHW on `device` (scaled per batch, which keeps memory at 1 byte/pixel)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    return x, y


def _scale(x):
    """uint8 -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def _predict(model, x, batch_size: int = EVAL_BATCH_SIZE):
    """Predicted classes of `model` (in eval mode for the call) on uint8 images `x`."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = [model(_scale(x[start:start + batch_size])).argmax(dim=1) for start in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(pred) if pred else torch.zeros(0, dtype=torch.long)


def _accuracy(model, x, y, *, split: str = "", batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Top-1 accuracy of `model` on uint8 images `x`, labels `y` (`split` names the set for
    tests that check which one a selection reads)."""
    return int((_predict(model, x, batch_size) == y).sum()) / max(len(y), 1)


def _train_epoch(model, optimizer, x, y, batch_size: int, generator) -> tuple[float, int]:
    """One pass of cross-entropy Adam steps over a random permutation of (x, y); returns
    the summed loss and the number of correct training predictions."""
    import torch
    import torch.nn.functional as F

    model.train()
    perm = torch.randperm(len(y), generator=generator).to(x.device)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(perm), batch_size):
        b = perm[start:start + batch_size]
        logits = model(_scale(x[b]))
        loss = F.cross_entropy(logits, y[b])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(b)
        correct += int((logits.detach().argmax(1) == y[b]).sum())
    return loss_sum, correct


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Shuffled (train, val) index arrays, ceil(val_fraction * n) of them for validation.

    Stratified by label when every class has >= 2 examples (and the set is large enough
    for one of each class on both sides): class c gives val_fraction of its n_c examples,
    the fractional shares rounded by largest remainder so the counts sum to the total;
    else a random split. numpy only (sklearn's import alone cost ~2 s per job)."""
    n = len(labels)
    n_val = math.ceil(val_fraction * n)
    if not 0 < n_val < n:
        raise DPDMError(f"classify: cannot split {n} samples into train/validation (val_fraction {val_fraction}): "
                        f"{n_val} validation and {n - n_val} training samples; generate more samples")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2 or n_val < len(classes) or n - n_val < len(classes):
        log.warning("classify: some class has fewer than 2 samples (or the set is too small); "
                    "the train/validation split is random, not stratified")
        perm = rng.permutation(n)
        return perm[n_val:], perm[:n_val], False
    share = counts * n_val / n
    take = np.floor(share).astype(int)  # < n_c, since n_val < n
    for c in np.argsort(-(share - take), kind="stable")[: n_val - int(take.sum())]:
        take[c] += 1
    train, val = [], []
    for cls, k in zip(classes, take):
        members = rng.permutation(np.flatnonzero(labels == cls))
        val.append(members[:k])
        train.append(members[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val)), True


# ----------------------------------------------------------------------------
# The synthetic-train / real-test protocol.


MIN_SAMPLES_PER_CLASS = 10  # fewer: the accuracy of a classifier trained on them means nothing


# Longer than most functions here on purpose: the paper's protocol (90/10 split of the
# samples, train, select on synthetic validation, test once on real data, record) reads
# top to bottom in one place.
def classify(settings: dict, samples_path, test_path, classifier: str, out_path) -> dict:
    """Train `classifier` on samples, select by synthetic validation accuracy, test on real data -> JSON."""
    import torch
    from tqdm import tqdm

    started = time.time()
    samples_path, test_path = Path(samples_path), Path(test_path)
    cfg = settings["classify"]
    seed = int((settings.get("cell") or {}).get("seed", 0))
    epochs, batch_size, lr = int(cfg["epochs"]), int(cfg["batch_size"]), float(cfg["lr"])
    val_fraction = float(cfg["val_fraction"])
    device = pick_device(settings.get("device", "auto"))

    syn_x, syn_y = read_images(samples_path, "samples")
    test_x, test_y = read_images(test_path, "real test split")
    num_classes = _num_classes(settings, test_path.parent, *(lab for lab in (syn_y, test_y) if lab is not None))
    syn_y = _check_labels(syn_y, num_classes, f"samples {samples_path}")
    test_y = _check_labels(test_y, num_classes, f"real test split {test_path}")
    if syn_x.shape[1:] != test_x.shape[1:]:
        raise DPDMError(f"samples are {syn_x.shape[1:]} (H, W, C) but the real test images are {test_x.shape[1:]}")
    h, w, c = syn_x.shape[1:]
    if len(syn_y) < MIN_SAMPLES_PER_CLASS * num_classes:
        raise DPDMError(f"samples {samples_path} hold {len(syn_y)} images; a classifier needs at least "
                        f"{MIN_SAMPLES_PER_CLASS} per class ({MIN_SAMPLES_PER_CLASS * num_classes} for {num_classes} "
                        "classes) to say anything: sample more (sample.num_samples)")

    train_idx, val_idx, stratified = _stratified_split(syn_y, val_fraction, seed)
    xtr, ytr = _to_tensors(syn_x[train_idx], syn_y[train_idx], device)
    xva, yva = _to_tensors(syn_x[val_idx], syn_y[val_idx], device)
    xte, yte = _to_tensors(test_x, test_y, device)

    torch.manual_seed(seed)
    model = build_classifier(classifier, (h, w), c, num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    log.info("classify %s: %d synthetic (%d train / %d val), %d real test, %d classes, %d epochs on %s",
             classifier, len(syn_y), len(ytr), len(yva), len(yte), num_classes, epochs, device)

    curves = {"epoch": [], "train_loss": [], "train_acc": [], "val_acc": [], "test_acc": [], "epoch_s": []}
    train_started = time.time()
    for epoch in tqdm(range(1, epochs + 1), desc=f"classify {classifier}", unit="epoch"):
        t0 = time.time()
        loss_sum, correct = _train_epoch(model, optimizer, xtr, ytr, batch_size, gen)
        val_acc = _accuracy(model, xva, yva, split="val")
        test_acc = _accuracy(model, xte, yte, split="test")  # recorded for the curves; never used to choose
        curves["epoch"].append(epoch)
        curves["train_loss"].append(loss_sum / len(ytr))
        curves["train_acc"].append(correct / len(ytr))
        curves["val_acc"].append(val_acc)
        curves["test_acc"].append(test_acc)
        curves["epoch_s"].append(round(time.time() - t0, 3))
        log.info("classify %s epoch %d/%d: train loss %.4f, val acc %.4f, test acc %.4f", classifier, epoch,
                 epochs, curves["train_loss"][-1], val_acc, test_acc)
    train_s = time.time() - train_started

    best = int(np.argmax(curves["val_acc"]))  # earliest epoch among ties, by validation accuracy ONLY
    result = {
        "classifier": classifier,
        "test_acc": curves["test_acc"][best],
        "chosen_epoch": curves["epoch"][best],
        "val_acc": curves["val_acc"][best],
        "test_acc_last": curves["test_acc"][-1],
        "val_acc_last": curves["val_acc"][-1],
        "selection": ("epoch with the best accuracy on the held-out synthetic validation split (earliest on ties); "
                      "the real test set is never used for selection, only evaluated"),
        "protocol": "train on synthetic samples, select on synthetic validation, test on the real test set",
        "num_classes": num_classes,
        "image_shape": [int(h), int(w), int(c)],
        "sizes": {"synthetic": int(len(syn_y)), "train": int(len(ytr)), "val": int(len(yva)),
                  "test": int(len(yte))},
        "split": {"val_fraction": val_fraction, "stratified": stratified, "seed": seed,
                  "method": "per-class shuffle, shares by largest remainder (numpy default_rng(seed))"},
        "seed": seed,
        "hyperparameters": {"optimizer": "adam", "lr": lr, "batch_size": batch_size, "epochs": epochs,
                            "input_scaling": INPUT_SCALING, "loss": "cross-entropy"},
        "num_params": count_parameters(model),
        "curves": curves,
        "timing": {"train_s": round(train_s, 3), "total_s": round(time.time() - started, 3)},
        "samples_path": str(samples_path),
        "test_path": str(test_path),
    }
    result["provenance"] = provenance(cell=settings.get("cell"), settings=settings,
                                      inputs=[samples_path, test_path], started=started, device=device)
    save_json(out_path, result)
    log.info("classify %s: real test accuracy %.4f at epoch %d (best validation %.4f); last epoch %.4f",
             classifier, result["test_acc"], result["chosen_epoch"], result["val_acc"], result["test_acc_last"])
    return result


# ----------------------------------------------------------------------------
# The judge: how class-faithful are the samples?
#
# A classifier trained (non-privately) on the REAL training split labels the samples the
# model generated for each class; its accuracy against the requested labels reads how
# well the samples carry their class, independently of FID. The judge is a function of
# the private training data, so its numbers are NOT covered by the DP guarantee (like
# FID against the training split); it is a diagnostic and a learning test (a wrong label
# mapping or a sampler that ignores the model scores at chance).

JUDGE_LR = 1e-3
JUDGE_BATCH = 128


def fit_judge(data_dir, classifier: str, epochs: int, out_path, seed: int = 0) -> dict:
    """Train `classifier` on the real training split (last epoch, fixed seed), record its
    accuracy on the real test split, save {"state", "spec", "test_acc"} to out_path."""

    from dpdm.artifacts import save_torch
    from dpdm.data import load_split

    started = time.time()
    data_dir = Path(data_dir)
    train_x, train_y = load_split(data_dir, "train")
    test_x, test_y = load_split(data_dir, "test")
    num_classes = int(max(train_y.max(), test_y.max()) + 1)
    train_y = _check_labels(train_y, num_classes, f"real training split {data_dir}/train.npz")
    h, w, c = train_x.shape[1:]
    torch.manual_seed(seed)
    model = build_classifier(classifier, (h, w), c, num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=JUDGE_LR)
    x, y = _to_tensors(train_x, train_y, "cpu")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(int(epochs)):
        _train_epoch(model, optimizer, x, y, JUDGE_BATCH, gen)
    xte, yte = _to_tensors(test_x, test_y, "cpu")
    test_acc = _accuracy(model, xte, yte)
    spec = {"classifier": classifier, "image_shape": [int(h), int(w), int(c)], "num_classes": num_classes,
            "epochs": int(epochs), "seed": int(seed), "lr": JUDGE_LR, "batch_size": JUDGE_BATCH}
    save_torch(out_path, {"format": "dpdm-judge-v1", "state": model.state_dict(), "spec": spec,
                          "test_acc": test_acc, "seconds": round(time.time() - started, 3)})
    log.info("judge %s: trained on %d real training images, real test accuracy %.4f", classifier, len(y), test_acc)
    return {"test_acc": test_acc, "spec": spec}


def judge_samples(settings: dict, judge_path, samples_path, out_path) -> dict:
    """The judge's accuracy on class-conditional samples (the labels they were generated
    for), overall and per class -> JSON, labelled as not covered by the DP guarantee."""
    judge_path, samples_path = Path(judge_path), Path(samples_path)
    try:
        judge = torch.load(judge_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DPDMError(f"judge {judge_path} cannot be read ({torch_load_error(e)}); delete it and rerun "
                        "(python -m dpdm judge-fit)") from e
    spec = judge["spec"]
    images, labels = read_images(samples_path, "samples")
    labels = _check_labels(labels, int(spec["num_classes"]), f"samples {samples_path}")
    if list(images.shape[1:]) != list(spec["image_shape"]):
        raise DPDMError(f"samples {samples_path} are {list(images.shape[1:])} (H, W, C) but the judge {judge_path} "
                        f"was trained on {spec['image_shape']} images")
    model = build_classifier(spec["classifier"], tuple(spec["image_shape"][:2]), spec["image_shape"][2],
                             spec["num_classes"])
    model.load_state_dict(judge["state"])
    x, y = _to_tensors(images, labels, "cpu")
    correct = (_predict(model, x) == y)
    per_class = {int(k): float(correct[y == k].float().mean()) for k in torch.unique(y).tolist()}
    result = {
        "judge_acc": float(correct.float().mean()),
        "per_class": per_class,
        "num_samples": int(len(y)),
        "judge": {**spec, "real_test_acc": judge["test_acc"]},
        "covered_by_dp": False,
        "not_covered": "the judge is trained on the private training split: its accuracy on the samples is a "
                       "diagnostic, NOT covered by the DP guarantee",
        "chance": 1.0 / spec["num_classes"],
    }
    result["provenance"] = provenance(cell=settings.get("cell"), settings=settings, inputs=[samples_path],
                                      private_inputs=[judge_path])
    save_json(out_path, result)
    log.info("judge accuracy on %s: %.4f (chance %.3f; the judge scores %.4f on real test images)", samples_path,
             result["judge_acc"], result["chance"], judge["test_acc"])
    return result


# ----------------------------------------------------------------------------
# DP-SGD baselines on real data.


def make_private(model, optimizer, images, labels, sample_rate: float, noise_multiplier: float, clip: float,
                 dp_seed: int | None, device, accountant: str = "rdp"):
    """Stock Opacus DP-SGD around `model`: (private model, DP optimizer, Poisson loader of
    (image uint8, label, index), secret per-example key).

    Every example is in a step's batch independently with probability q (Opacus'
    DPDataLoader, rate exactly q = batch/N); clipped gradients plus N(0, sigma^2 C^2) are
    divided by the expected batch size q N. Which examples were sampled, what noise was
    added and each example's dropout masks (keyed by `example_key`, the step and the
    example's index: `private_backward`) are secret (OS entropy) unless `dp_seed` is
    given (see dpdm.privacy)."""
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    from dpdm import privacy

    base = privacy.secret_seed() if dp_seed is None else int(dp_seed)
    dataset = TensorDataset(images, labels, torch.arange(len(labels)))
    loader = DPDataLoader(dataset, sample_rate=sample_rate,
                          generator=torch.Generator().manual_seed(privacy.derive_seed(base, "poisson")))
    noise_gen = torch.Generator(device=device).manual_seed(privacy.derive_seed(base, "dp-noise"))
    example_key = privacy.derive_seed(base, "example-draws")
    del base
    engine = PrivacyEngine(accountant=accountant)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier, max_grad_norm=clip,
        poisson_sampling=False,  # the loader already samples Poisson with rate exactly q = batch/N
        noise_generator=noise_gen,
    )
    optimizer.expected_batch_size = sample_rate * len(labels)  # clipped + noised sum divided by q*N
    return model, optimizer, loader, example_key


def private_backward(model, images, labels, indices, example_key: int, step: int, device):
    """Forward and backward of one Poisson batch (uint8 images) with each example's
    dropout masks drawn from its own secret generator (key, step, index); Opacus' hooks
    then hold the per-example gradients for the optimizer to clip and noise. Returns the
    mean loss (a statistic of private data without noise: private)."""
    import torch.nn.functional as F

    from dpdm import privacy

    use_example_generators(model, privacy.example_generators(example_key, step, indices.tolist(), device))
    try:
        labels = labels.to(device)
        loss = F.cross_entropy(model(_scale(images.to(device))), labels, reduction="sum") / max(len(labels), 1)
        loss.backward()
    finally:
        use_example_generators(model, None)
    return loss


def dp_baseline(settings: dict, data_dir, classifier: str, out_path) -> dict:
    """DP-SGD `classifier` on the real training set, evaluated on the real test set -> JSON with ledger."""
    with warnings.catch_warnings():
        # Opacus' "Secure RNG turned off" (we seed its generators from OS entropy instead; the ledger's
        # dp_randomness says which) and torch's note that
        # the first layer's full backward hook fires without input gradients (harmless for per-sample grads).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _dp_baseline(settings, data_dir, classifier, out_path)


def _baseline_mechanism(settings: dict, n: int, classifier: str) -> tuple[float, int, float]:
    """(q, steps, sigma) of a DP-SGD baseline: q = B / N, the steps of `epochs`, and the
    noise multiplier the accountant calibrates to the cell's (eps, delta)."""
    from dpdm import privacy

    cfg, priv = settings["baseline"], settings["privacy"]
    target_eps, delta, batch_size = float(priv["target_eps"]), float(priv["delta"]), int(cfg["batch_size"])
    privacy.check_privacy_params(target_eps, delta, n)
    if not 1 <= batch_size <= n:
        raise DPDMError(f"baseline.batch_size = {batch_size} must be in 1..N = {n}")
    q = batch_size / n
    steps = privacy.steps_for(int(cfg["epochs"]), q)
    sigma = privacy.noise_multiplier_for(target_eps, delta, q, steps, accountant=priv["accountant"],
                                         calibration=priv["calibration"])
    log.info("baseline %s: N=%d q=%.6g steps=%d sigma=%.4f C=%g for eps=%g delta=%g (%s, %s)", classifier, n, q,
             steps, sigma, float(cfg["clip"]), target_eps, delta, priv["accountant"], priv["calibration"])
    return q, steps, sigma


def _baseline_ledger(settings: dict, classifier: str, out_path, n: int, q: float, sigma: float, planned: int,
                     steps_taken: int, seed: int, dp_seed) -> dict:
    """The baseline's privacy ledger (dpdm.privacy.privacy_ledger): what it covers and how
    the model was chosen (the last epoch: nothing is selected on private data)."""
    from dpdm import privacy

    priv = settings["privacy"]
    return privacy.privacy_ledger(
        history=[[sigma, q, steps_taken]], num_examples=n, sample_rate=q, noise_multiplier=sigma,
        clip=float(settings["baseline"]["clip"]), noise_multiplicity=1, delta=float(priv["delta"]),
        target_eps=float(priv["target_eps"]), calibration=priv["calibration"], accountant=priv["accountant"],
        planned_steps=planned, seed=seed, provenance=None, secret_randomness=dp_seed is None,
        per_example_gradients="opacus GradSampleModule hooks",
        covers=[f"the trained {classifier} (last epoch)", "its test accuracy and the per-epoch test accuracies "
                "(`curves`: the model evaluated on the public test set)"],
        not_covered=[f"private/{Path(out_path).stem}.json: training losses, realised batch sizes and timings "
                     "(computed on private data without noise)", "logs/ and benchmarks/ of the job",
                     "the baseline hyperparameters are fixed defaults; tuning them on private data is not covered"],
        choices=priv["choices_on_private_data"],
        mechanism="DP-SGD (Opacus optimizer): per-example gradient clipping, Gaussian noise, Poisson sampling",
        model_selection=("last epoch. No validation split is carved out of the private training data and no "
                         "checkpoint is chosen: selecting an epoch with private data is itself a release that this "
                         "ledger does not account for. The real test set is only evaluated, never used to choose."))


def _dp_training_loop(model, optimizer, loader, example_key, steps: int, q: float, epochs: int, xte, yte, device,
                      classifier: str) -> dict:
    """`steps` DP-SGD steps on Poisson batches from `loader`; per epoch the training loss
    and realised batch size (both private) and the test accuracy (curves only: nothing is
    selected on them). Returns the curves; curves["step"][-1] is the number of steps taken."""
    from tqdm import tqdm

    from dpdm import privacy

    epoch_ends = [min(steps, privacy.steps_for(e, q)) for e in range(1, epochs + 1)]
    curves = {"epoch": [], "step": [], "train_loss": [], "mean_batch": [], "test_acc": [], "epoch_s": []}
    batches = iter(loader)
    steps_taken, loss_sum, seen, epoch, t0 = 0, 0.0, 0, 0, time.time()
    model.train()
    with tqdm(total=steps, desc=f"dp-sgd {classifier}", unit="step", mininterval=5.0) as bar:
        while steps_taken < steps:
            try:
                xb, yb, ib = next(batches)
            except StopIteration:
                batches = iter(loader)
                xb, yb, ib = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = private_backward(model, xb, yb, ib, example_key, steps_taken, device)
            optimizer.step()
            steps_taken += 1
            loss_sum += float(loss.detach()) * len(yb)
            seen += len(yb)
            bar.update(1)
            if steps_taken == epoch_ends[epoch]:
                test_acc = _accuracy(model, xte, yte, split="test")  # curves only; nothing is selected
                model.train()
                n_steps = steps_taken - (curves["step"][-1] if curves["step"] else 0)
                curves["epoch"].append(epoch + 1)
                curves["step"].append(steps_taken)
                curves["train_loss"].append(loss_sum / max(seen, 1))
                curves["mean_batch"].append(seen / max(n_steps, 1))
                curves["test_acc"].append(test_acc)
                curves["epoch_s"].append(round(time.time() - t0, 3))
                log.info("baseline %s epoch %d/%d (step %d): train loss %.4f, test acc %.4f", classifier,
                         epoch + 1, epochs, steps_taken, curves["train_loss"][-1], test_acc)
                epoch, loss_sum, seen, t0 = epoch + 1, 0.0, 0, time.time()
    return curves


def _dp_baseline(settings: dict, data_dir, classifier: str, out_path) -> dict:
    from opacus.validators import ModuleValidator

    from dpdm import privacy
    from dpdm.data import load_split

    started = time.time()
    data_dir = Path(data_dir)
    cfg, priv = settings["baseline"], settings["privacy"]
    seed = int((settings.get("cell") or {}).get("seed", 0))
    epochs, batch_size, lr, clip = int(cfg["epochs"]), int(cfg["batch_size"]), float(cfg["lr"]), float(cfg["clip"])
    target_eps, accountant = float(priv["target_eps"]), priv["accountant"]
    if priv["sampling"] != "poisson":
        raise DPDMError(f"privacy.sampling = {priv.get('sampling')!r}: only poisson sampling is supported")
    device = pick_device(settings.get("device", "auto"))

    train_x, train_y = load_split(data_dir, "train")
    test_x, test_y = load_split(data_dir, "test")
    num_classes = _num_classes(settings, data_dir, train_y, test_y)
    train_y = _check_labels(train_y, num_classes, f"real training split {data_dir}/train.npz")
    test_y = _check_labels(test_y, num_classes, f"real test split {data_dir}/test.npz")
    h, w, c = train_x.shape[1:]

    n = len(train_y)
    q, steps, sigma = _baseline_mechanism(settings, n, classifier)

    torch.manual_seed(seed)
    model = build_classifier(classifier, (h, w), c, num_classes)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise DPDMError(f"classifier {classifier} is not DP-SGD compatible: {errors}")
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x_cpu = torch.from_numpy(np.ascontiguousarray(train_x)).permute(0, 3, 1, 2).contiguous()
    dp_seed = privacy.dp_seed_from_env()
    model, optimizer, loader, example_key = make_private(model, optimizer, x_cpu, torch.from_numpy(train_y), q, sigma,
                                                         clip, dp_seed, device, accountant)
    xte, yte = _to_tensors(test_x, test_y, device)

    curves = _dp_training_loop(model, optimizer, loader, example_key, steps, q, epochs, xte, yte, device, classifier)
    steps_taken = curves["step"][-1]

    ledger = _baseline_ledger(settings, classifier, out_path, n, q, sigma, steps, steps_taken, seed, dp_seed)
    result = {
        "classifier": classifier,
        "test_acc": curves["test_acc"][-1],
        "test_acc_last": curves["test_acc"][-1],
        "chosen_epoch": curves["epoch"][-1],
        "selection": "last epoch (no selection on private data)",
        "num_classes": num_classes,
        "image_shape": [int(h), int(w), int(c)],
        "sizes": {"train": n, "test": int(len(yte))},
        "seed": seed,
        "hyperparameters": {"optimizer": "adam (on clipped, noised gradients)", "lr": lr, "batch_size": batch_size,
                            "epochs": epochs, "clip": clip, "input_scaling": INPUT_SCALING,
                            "loss": "cross-entropy"},
        "num_params": count_parameters(model),
        "privacy": ledger,
        "curves": {k: curves[k] for k in ("epoch", "step", "test_acc")},
        "data_dir": str(data_dir),
    }
    result["provenance"] = provenance(cell=settings.get("cell"), settings=settings, inputs=[data_dir / "test.npz"],
                                      private_inputs=[data_dir / "train.npz"], device=device)
    # Statistics of the private data without noise, and timings that depend on the secret
    # batch sizes: beside the result, in its private folder (never published).
    private = {"curves": {k: curves[k] for k in ("epoch", "step", "train_loss", "mean_batch", "epoch_s")},
               "train_npz_sha256": sha256_file(data_dir / "train.npz"),
               "timing": {"total_s": round(time.time() - started, 3)}}
    save_json(Path(out_path).parent / "private" / f"{Path(out_path).stem}.json", private)
    save_json(out_path, result)
    result["private"] = private
    log.info("baseline %s: real test accuracy %.4f after %d steps, eps_rdp = %.4f, eps_prv = %s (target %g)",
             classifier, result["test_acc"], steps_taken, ledger["eps_rdp"], ledger["eps_prv"], target_eps)
    return result
