"""Scoring a generator: batches through the classifier, the real statistics and their cache, make_scorer."""

from __future__ import annotations

import copy
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from gan_tune.quality.measures import GaussianFit, Outputs, calc_metrics, gaussian_fit
from gan_tune.quality.mnist_classifier import (
    MnistClassifier,
    classifier_checksum,
    load_classifier,
)
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import Mnist, to_float
from gan_tune.training.loop import (
    Scorer,
)
from gan_tune.training.models import fuse_upsample_conv

CACHE_ENV = "GAN_TUNE_CACHE"  # cache root; the real statistics go in its fid_stats/ folder


DEFAULT_CACHE_ROOT = "~/.cache/gan_tune"


GPU_FID_SAMPLES = 10_000  # the customary FID sample count (Heusel et al. 2017 recommend >= 10k)


CPU_FID_SAMPLES = 2_000  # keeps a CPU evaluation to seconds; FID at 2k reads higher than at 10k


DEFAULT_BATCH_SIZE = 0  # 0: the device's, below


CPU_BATCH_SIZE = 100  # activations stay in cache: on the 2-core CPU the balanced G runs 1.5x faster than at 500


GPU_BATCH_SIZE = 1000


SCORE_SEED = 0  # the scorer's latent draws: the same generator weights always get the same score


@torch.no_grad()
def classify(batches: Iterable[Tensor], classifier: MnistClassifier) -> Outputs:
    """Classifier outputs over batches of (B, 1, 28, 28) float images in [-1, 1]."""
    features, logits = [], []
    for x in batches:
        batch_features, batch_logits = classifier.features_and_logits(x)
        features.append(batch_features)
        logits.append(batch_logits)
    return Outputs(torch.cat(features).cpu().double(), torch.cat(logits).cpu().double())  # one host sync


def batch_for(device: torch.device, batch_size: int) -> int:
    return batch_size or (GPU_BATCH_SIZE if torch.device(device).type == "cuda" else CPU_BATCH_SIZE)


def image_batches(images: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    """Float batches in [-1, 1] on `device` from (N, 28, 28) uint8 or (N, 1, 28, 28) float images."""
    batch_size = batch_for(device, batch_size)
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        yield to_float(x) if x.dtype == torch.uint8 else x


def generated_batches(g: nn.Module, latent_dim: int, n: int, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    # latents drawn on the CPU, as loop.fixed_noise does: every device scores the same latent points
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(SCORE_SEED))
    batch_size = batch_for(device, batch_size)
    for start in range(0, n, batch_size):
        yield g(z[start:start + batch_size].to(device)).float()


def scoring_copy(g: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of G (BatchNorm running statistics), in channels_last, upsampling fused.

    A copy, so the training model keeps its mode and memory layout. channels_last because oneDNN's
    convolutions run in NHWC; models.NearestUpConv computes upsample + conv with 4/9 of the work.
    On the 2-core CPU the balanced G generates 10k images in ~13 s instead of ~50 s
    (`python -m gan_tune.bench` prints the scoring time).
    """
    frozen = copy.deepcopy(g).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    return fuse_upsample_conv(frozen)


def score_images(images: Tensor, real: GaussianFit, device: torch.device,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, float]:
    """All metrics for a fixed set of images (uint8 (N, 28, 28) or float (N, 1, 28, 28) in [-1, 1])."""
    return calc_metrics(classify(image_batches(images, batch_size, device), load_classifier(device)), real)


def stats_dir(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` itself when given, else $GAN_TUNE_CACHE/fid_stats (default ~/.cache/gan_tune/fid_stats)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_ROOT)).expanduser() / "fid_stats"


def stats_path(source: str, checksum: str, cache_dir: str | Path | None = None) -> Path:
    safe_source = re.sub(r"[^A-Za-z0-9._-]+", "_", source)  # "...[:1000]" -> "..._1000_"
    return stats_dir(cache_dir) / f"{safe_source}-{checksum[:16]}.pt"


def read_stats(path: Path, key: dict) -> GaussianFit | None:
    """The cached fit when `path` holds one for exactly `key`; a missing, stale or unreadable file is a miss."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None  # the caller recomputes and replaces it: the cache only saves time
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in key.items()):
        return None  # the sanitised file name can collide; the stored key cannot
    return GaussianFit(saved["mean"], saved["cov"])


def write_stats(path: Path, key: dict, fit: GaussianFit) -> None:
    """Write through a temporary file and os.replace: trials racing on one file each write it whole."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            torch.save({**key, "mean": fit.mean, "cov": fit.cov}, fh)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is as readable as any other file
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        warnings.warn(f"{path}: cannot cache real FID statistics ({err}); they are recomputed next time")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def real_stats(data: Mnist, device: torch.device, cache_dir: str | Path | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE) -> GaussianFit:
    """Gaussian fit of the classifier features of `data`, cached on disk by data.source + classifier sha256."""
    key = {"source": data.source, "classifier_sha256": classifier_checksum(), "count": len(data)}
    path = stats_path(data.source, key["classifier_sha256"], cache_dir)
    fit = read_stats(path, key)
    if fit is None:
        out = classify(image_batches(data.images, batch_size, device), load_classifier(device))
        fit = gaussian_fit(out.features)
        write_stats(path, key, fit)
    return fit


def default_fid_samples(device: torch.device) -> int:
    return GPU_FID_SAMPLES if torch.device(device).type == "cuda" else CPU_FID_SAMPLES


def make_scorer(data: Mnist, device: torch.device, n_samples: int = 0, batch_size: int = DEFAULT_BATCH_SIZE
                ) -> Callable[[nn.Module, int], dict[str, float]]:
    """score(g, latent_dim) -> every metric plus fid_samples, on n_samples images from g in eval mode.

    The classifier and the real statistics are loaded here, once; each call only generates and classifies.
    """
    if n_samples < 0 or n_samples == 1:
        raise ValueError(f"n_samples must be 0 (device default) or >= 2, got {n_samples}")
    device = torch.device(device)
    n = n_samples or default_fid_samples(device)
    classifier = load_classifier(device)
    real = real_stats(data, device, batch_size=batch_size)

    def score(g: nn.Module, latent_dim: int) -> dict[str, float]:
        with torch.inference_mode():
            out = classify(generated_batches(scoring_copy(g), latent_dim, n, batch_size, device), classifier)
        return {**calc_metrics(out, real), "fid_samples": n}

    return score


def build_scorer(cfg: TrainConfig, data: Mnist, device: torch.device) -> Scorer | None:
    if not cfg.eval_every:
        return None
    return make_scorer(data, device, cfg.fid_samples)
