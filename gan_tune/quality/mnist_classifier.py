"""The bundled MNIST classifier whose features and softmax the quality metrics (quality.measures) read.

The weights ship as `gan_tune/assets/classifier.pt` with a JSON sidecar (`classifier.json`) that records
their sha256, the data they were trained on and their held-out accuracy. The held-out set is always the
last 1k images of the bundled 10k test split (`mnist-test-10k-bundled[9000:]`), so it is available offline
whatever the classifier was trained on:
- `mnist-train-60k`: trains on all 60k training images;
- `mnist-test-10k-bundled`: trains on the first 9k bundled images.

Retrain with `python -m gan_tune.classifier train [--data-source auto|mnist-train-60k|mnist-test-10k-bundled]`.
Retraining changes the checksum, which is part of every cached FID statistic's key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gan_tune.training.data import BUNDLED, FULL, DataError, Mnist, load_mnist, to_float

FEATURE_DIM = 128  # penultimate width: the space the Fréchet distance is measured in
NUM_CLASSES = 10
HELD_OUT_START = 9000  # bundled test images [9000:] are never trained on
WEIGHTS_FILE = "classifier.pt"
# Light augmentation: digits keep their identity under these (a 6 rotated 10 degrees is still a 6).
MAX_ROTATION_DEG = 10.0
MAX_SHIFT_PX = 2.0
SCALE_RANGE = (0.9, 1.1)
DROPOUT = 0.3
LR = 3e-3  # OneCycle peak; Adam on this small BN network
WEIGHT_DECAY = 1e-4
BATCH_SIZE = 128
EVAL_BATCH_SIZE = 1000


class ClassifierError(RuntimeError):
    """Missing or tampered classifier files; the message names the file."""


class MnistClassifier(nn.Module):
    """LeNet-like CNN: three conv blocks 28 -> 14 -> 7 -> 3, a 128-unit feature layer, 10 logits.

    Input (B, 1, 28, 28) float in [-1, 1], the generator's tanh range (gan_tune.training.data.to_float).
    About 2.2M multiply-adds per image (a 1/50 of the balanced generator's), so it adds little to scoring.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.num_features = feature_dim  # read by torchmetrics' FID when this is its feature extractor
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 3x3
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(feature_dim, NUM_CLASSES))

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, 28, 28) -> (B, feature_dim) penultimate activations."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, 28, 28) -> (B, 10) logits."""
        return self.head(self.body(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both outputs from one pass: the metrics need the features (FID) and the logits (IS, coverage)."""
        feats = self.body(x)
        return feats, self.head(feats)


def asset_path(name: str) -> Path:
    return Path(str(resources.files("gan_tune") / "assets" / name))


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_info(weights: Path) -> dict[str, Any]:
    """The sidecar of `weights`: sha256, train_data, held_out, held_out_accuracy, ..."""
    side = sidecar_path(weights)
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ClassifierError(f"{side}: cannot read classifier sidecar ({err})") from None
    if not isinstance(info, dict) or "sha256" not in info:
        raise ClassifierError(f"{side}: no 'sha256' key")
    return info


@functools.lru_cache(maxsize=None)
def classifier_info() -> dict[str, Any]:
    """The shipped classifier's sidecar (training data, split, held-out accuracy, sha256)."""
    return read_info(asset_path(WEIGHTS_FILE))


def classifier_checksum() -> str:
    """sha256 of the shipped weights: part of the key of every cached real-data statistic."""
    return classifier_info()["sha256"]


def load_classifier(device: torch.device | str = "cpu", path: str | Path | None = None) -> MnistClassifier:
    """The frozen classifier (eval mode, no grads) on `device`; loaded once per process and device."""
    weights = Path(path) if path is not None else asset_path(WEIGHTS_FILE)
    return _load_verified(str(torch.device(device)), str(weights.resolve()))


@functools.lru_cache(maxsize=None)
def _load_verified(device: str, weights: str) -> MnistClassifier:
    path = Path(weights)
    if not path.is_file():
        raise ClassifierError(f"{path}: classifier weights not found")
    expected, actual = read_info(path)["sha256"], file_sha256(path)
    if actual != expected:
        raise ClassifierError(
            f"{path}: sha256 {actual[:12]}... does not match {expected[:12]}... recorded in "
            f"{sidecar_path(path).name}; the weights are corrupt or were replaced without their sidecar"
        )
    model = MnistClassifier()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except RuntimeError as err:  # weights of another architecture
        raise ClassifierError(f"{path}: weights do not fit MnistClassifier ({str(err).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    return model.to(device, memory_format=torch.channels_last)  # NHWC: oneDNN's faster convolutions (scorer.scoring_copy)


@torch.no_grad()
def accuracy(model: nn.Module, data: Mnist, device: torch.device) -> float:
    """Top-1 accuracy of `model` on `data`, in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, len(data), EVAL_BATCH_SIZE):
        images = to_float(data.images[start:start + EVAL_BATCH_SIZE].to(device))
        labels = data.labels[start:start + EVAL_BATCH_SIZE].to(device)
        correct += int((model(images).argmax(1) == labels).sum())
    return correct / len(data)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per-image random rotation, scale and shift of a (B, 1, 28, 28) batch in [-1, 1]."""
    b = x.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return torch.rand(b, generator=generator, device=x.device) * (high - low) + low

    angle = uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG) * (math.pi / 180)
    scale = uniform(*SCALE_RANGE)
    shift = MAX_SHIFT_PX * 2 / 28  # affine_grid works in [-1, 1] coordinates: 28 px span 2 units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin, uniform(-shift, shift)], 1),
        torch.stack([sin, cos, uniform(-shift, shift)], 1),
    ], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # shift the background to 0 so that zero padding fills new pixels with background, not grey
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_classifier(train: Mnist, epochs: int, seed: int, device: torch.device, log=print) -> MnistClassifier:
    """Adam + OneCycle with augmentation; `train.images` is moved to `device` once."""
    torch.manual_seed(seed)  # weight init and dropout
    generator = torch.Generator(device=device).manual_seed(seed)
    model = MnistClassifier().to(device)
    images, labels = train.images.to(device), train.labels.to(device)
    steps_per_epoch = len(train) // BATCH_SIZE
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(train), device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            x = augment(to_float(images[idx]), generator)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
        log(f"epoch {epoch + 1}/{epochs}: loss {loss_sum.item() / steps_per_epoch:.4f} "
            f"({time.perf_counter() - start:.1f} s)")  # one host sync per epoch
    return model.eval()


def split(source: str, data_dir: str) -> tuple[Mnist, Mnist, str]:
    """(train set, held-out set, train description) for a data source; see the module docstring."""
    bundled = load_mnist(BUNDLED)
    held_out = Mnist(bundled.images[HELD_OUT_START:], bundled.labels[HELD_OUT_START:],
                     f"{BUNDLED}[{HELD_OUT_START}:]")
    try:
        data = bundled if source == BUNDLED else load_mnist(source, data_dir)
    except RuntimeError as err:  # torchvision's download failure for mnist-train-60k
        raise DataError(f"{data_dir}: cannot load {source} ({err})") from None
    if data.source == FULL:
        return data, held_out, FULL
    train = Mnist(bundled.images[:HELD_OUT_START], bundled.labels[:HELD_OUT_START], f"{BUNDLED}[:{HELD_OUT_START}]")
    return train, held_out, train.source


def save_classifier(model: nn.Module, path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write the state dict and its sidecar (with the sha256 of the written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    info = {"sha256": file_sha256(path), **info}
    sidecar_path(path).write_text(json.dumps(info, indent=2) + "\n")
    return info
