"""Quality scores of a generator, read off the bundled MNIST classifier (gan_tune.classifier).

A metric is one decorated function in METRICS (stylegan2's metric_main pattern) that reads the classifier's
outputs on N images (`Outputs`) and the Gaussian fit of the real data's features (`GaussianFit`). Its spec
also says which direction is better, the worst value (what a diverged epoch reports) and whether a study
may optimise it; OBJECTIVES, SCORE_KEYS and DIVERGED_SCORES are derived from the specs, nowhere else:
- fid: Fréchet distance between Gaussian fits of classifier features, generated vs real (lower is better);
- is: inception score with the classifier's softmax (10 is the most a 10-class classifier allows);
- coverage: digit classes that get at least 2 % of the samples (10 for a healthy generator);
- coverage_entropy: entropy of the predicted-class histogram in nats (log 10 = 2.303 is perfectly balanced);
- mean_confidence: mean max-softmax (low for blurry or ambiguous digits).

The training loop and the Ray trainable call `make_scorer(data, device)` once, then the returned
`score(g, latent_dim)` at each evaluation. Real statistics are computed once per data source and classifier
and cached in `$GAN_TUNE_CACHE/fid_stats/` (default `~/.cache/gan_tune/fid_stats/`).

CLI:
  python -m gan_tune.metrics score RUN_DIR_OR_CHECKPOINT [--n N]   scores of a trained generator
  python -m gan_tune.metrics baselines [--n N]                     what good and bad scores look like
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import pickle
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from gan_tune.classifier import NUM_CLASSES, ClassifierError, MnistClassifier, classifier_checksum, load_classifier
from gan_tune.config import CliParser, ConfigError, device_arg
from gan_tune.data import BUNDLED, DataError, Mnist, load_mnist, to_float
from gan_tune.models import fuse_upsample_conv
from gan_tune import checkpoint

CACHE_ENV = "GAN_TUNE_CACHE"  # cache root; the real statistics go in its fid_stats/ folder
DEFAULT_CACHE_ROOT = "~/.cache/gan_tune"
GPU_FID_SAMPLES = 10_000  # the customary FID sample count (Heusel et al. 2017 recommend >= 10k)
CPU_FID_SAMPLES = 2_000  # keeps a CPU evaluation to seconds; FID at 2k reads higher than at 10k
DEFAULT_BATCH_SIZE = 0  # 0: the device's, below
CPU_BATCH_SIZE = 100  # activations stay in cache: on the 2-core CPU the balanced G runs 1.5x faster than at 500
GPU_BATCH_SIZE = 1000
COVERAGE_MIN_SHARE = 0.02  # a class is covered from 2 % of the samples (a balanced generator gives 10 %)
SCORE_SEED = 0  # the scorer's latent draws: the same generator weights always get the same score
# Finite on purpose: ASHA takes percentiles of the recorded scores, and an inf among them turns the
# cutoff into NaN (inf - inf); 1e6 is far above any FID in the classifier's 128-d feature space.
DIVERGED_FID = 1.0e6


@dataclass(frozen=True)
class Outputs:
    """The classifier's view of N images, float64 on the CPU."""

    features: Tensor  # (N, FEATURE_DIM)
    logits: Tensor  # (N, 10)


@dataclass(frozen=True)
class GaussianFit:
    mean: Tensor  # (F,) float64
    cov: Tensor  # (F, F) float64, unbiased (divides by N - 1, as torchmetrics does)


Metric = Callable[[Outputs, GaussianFit], float]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the key in reports, space files, MLflow and the report
    compute: Metric
    mode: str  # "min" or "max": which direction is better
    worst: float  # reported by a diverged epoch: the worst finite value, so no NaN reaches a scheduler
    objective: bool = True  # a study may optimise it (the space's `metric:`)


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, mode: str, worst: float, objective: bool = True) -> Callable[[Metric], Metric]:
    def add(compute: Metric) -> Metric:
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        METRICS[name] = MetricSpec(name, compute, mode, worst, objective)
        return compute

    return add


def gaussian_fit(features: Tensor) -> GaussianFit:
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    return GaussianFit(mean, centred.T @ centred / (x.shape[0] - 1))


def frechet_distance(a: GaussianFit, b: GaussianFit) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), the FID formula of Heusel et al. 2017.

    S_a S_b has the eigenvalues of the symmetric PSD matrix S_a^1/2 S_b S_a^1/2, so tr (S_a S_b)^1/2 comes
    from two symmetric eigendecompositions in float64 instead of a complex matrix square root.
    """
    eigvals, eigvecs = torch.linalg.eigh(a.cov)
    sqrt_a = (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T
    inner = sqrt_a @ b.cov @ sqrt_a
    # clamp: round-off turns the zero eigenvalues of rank-deficient covariances slightly negative
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((a.mean - b.mean).square().sum() + a.cov.trace() + b.cov.trace() - 2 * tr_sqrt)


@register_metric("fid", mode="min", worst=DIVERGED_FID)
def fid(out: Outputs, real: GaussianFit) -> float:
    if not torch.isfinite(out.features).all():
        return math.inf  # a diverged generator (NaN images) ranks last instead of crashing the trial
    return frechet_distance(gaussian_fit(out.features), real)


@register_metric("is", mode="max", worst=0.0)
def inception_score(out: Outputs, real: GaussianFit) -> float:
    """exp E_x KL(p(y|x) || p(y)) over all N samples as one split (Salimans et al. 2016 average 10 splits)."""
    log_p = out.logits.log_softmax(1)
    log_marginal = torch.logsumexp(log_p, 0) - math.log(log_p.shape[0])  # log p(y), no log(0)
    kl = (log_p.exp() * (log_p - log_marginal)).sum(1)
    return float(kl.mean().exp())


def class_shares(out: Outputs) -> Tensor:
    """(10,) fraction of the samples the classifier assigns to each digit."""
    counts = torch.bincount(out.logits.argmax(1), minlength=NUM_CLASSES)
    return counts.double() / counts.sum()


@register_metric("coverage", mode="max", worst=0)
def coverage(out: Outputs, real: GaussianFit) -> int:
    return int((class_shares(out) >= COVERAGE_MIN_SHARE).sum())


@register_metric("coverage_entropy", mode="max", worst=0.0)
def coverage_entropy(out: Outputs, real: GaussianFit) -> float:
    shares = class_shares(out)
    return float(torch.special.entr(shares).sum())  # entr(p) = -p log p, 0 for empty classes


@register_metric("mean_confidence", mode="max", worst=0.0)
def mean_confidence(out: Outputs, real: GaussianFit) -> float:
    return float(out.logits.softmax(1).amax(1).mean())


# Tables derived from the specs: what a study may optimise (and which way), every key of a score, and
# what a diverged epoch reports instead (fid_samples 0: nothing was generated).
OBJECTIVES = {spec.name: spec.mode for spec in METRICS.values() if spec.objective}
SCORE_KEYS = (*METRICS, "fid_samples")
DIVERGED_SCORES = {**{spec.name: spec.worst for spec in METRICS.values()}, "fid_samples": 0}


def calc_metrics(out: Outputs, real: GaussianFit, names: Iterable[str] | None = None) -> dict[str, float]:
    names = list(METRICS) if names is None else list(names)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {', '.join(unknown)} (known: {', '.join(METRICS)})")
    return {name: METRICS[name].compute(out, real) for name in names}


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
    # latents drawn on the CPU, as train.fixed_noise does: every device scores the same latent points
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


BASELINE_SEED = 0
BASELINE_REFERENCE = 5000  # the bundled 10k is halved at random: statistics from one half, sets from the other
BLUR_SIGMA_PX = 1.0
NOISE_STD = 0.5  # in [-1, 1] pixel units: a quarter of the range, digits still readable by eye
COLLAPSE_DIGITS = (3, 7)  # a generator stuck on two images


def baseline_split() -> tuple[Mnist, Mnist]:
    """(reference half, held-out pool) of the bundled split, by a fixed random permutation."""
    data = load_mnist(BUNDLED)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(BASELINE_SEED))
    ref, pool = perm[:BASELINE_REFERENCE], perm[BASELINE_REFERENCE:]
    source = f"{BUNDLED}[perm{BASELINE_SEED}]"  # names the images: it keys the cached statistics
    return (Mnist(data.images[ref], data.labels[ref], f"{source}[:{BASELINE_REFERENCE}]"),
            Mnist(data.images[pool], data.labels[pool], f"{source}[{BASELINE_REFERENCE}:]"))


def real_held_out(pool: Mnist, n: int, gen: torch.Generator) -> Tensor:
    return to_float(pool.images[:n])


def real_blurred(pool: Mnist, n: int, gen: torch.Generator) -> Tensor:
    return gaussian_blur(to_float(pool.images[:n]), kernel_size=[5, 5], sigma=[BLUR_SIGMA_PX, BLUR_SIGMA_PX])


def real_noisy(pool: Mnist, n: int, gen: torch.Generator) -> Tensor:
    x = to_float(pool.images[:n])
    return (x + NOISE_STD * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def uniform_noise(pool: Mnist, n: int, gen: torch.Generator) -> Tensor:
    return torch.rand(n, 1, 28, 28, generator=gen) * 2 - 1


def mode_collapsed(pool: Mnist, n: int, gen: torch.Generator) -> Tensor:
    """Copies of the first pool image of each of COLLAPSE_DIGITS, in turn."""
    firsts = torch.stack([(pool.labels == digit).nonzero()[0, 0] for digit in COLLAPSE_DIGITS])
    return to_float(pool.images[firsts.repeat(-(-n // len(firsts)))[:n]])


def digits_0_to_4(pool: Mnist, n: int, gen: torch.Generator) -> Tensor:
    """Real images of half the classes (cycled when n exceeds them)."""
    idx = (pool.labels < 5).nonzero().squeeze(1)
    return to_float(pool.images[idx[torch.arange(n) % len(idx)]])


BASELINES: dict[str, Callable[[Mnist, int, torch.Generator], Tensor]] = {
    "real held-out": real_held_out,
    f"real + blur (sigma {BLUR_SIGMA_PX:g} px)": real_blurred,
    f"real + noise (std {NOISE_STD:g})": real_noisy,
    "uniform noise": uniform_noise,
    f"mode collapse (2 images: {COLLAPSE_DIGITS[0]}, {COLLAPSE_DIGITS[1]})": mode_collapsed,
    "real, digits 0-4 only": digits_0_to_4,
}


def baseline_table(n: int, device: torch.device, cache_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Metrics of each BASELINES set of n images (2 <= n <= 5000) against the statistics of the reference half."""
    reference, pool = baseline_split()
    real = real_stats(reference, device, cache_dir)
    return {name: score_images(make(pool, n, torch.Generator().manual_seed(BASELINE_SEED)), real, device)
            for name, make in BASELINES.items()}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain text table: one row per set, one column per metric key."""
    columns = list(next(iter(rows.values())))
    first = max(len("set"), *(len(name) for name in rows))
    widths = [max(len(col), 8) for col in columns]
    lines = ["  ".join([f"{'set':<{first}}", *(f"{col:>{w}}" for col, w in zip(columns, widths))])]
    for name, values in rows.items():
        cells = (f"{values[col]:>{w}}" if isinstance(values[col], int) else f"{values[col]:>{w}.3f}"
                 for col, w in zip(columns, widths))
        lines.append("  ".join([f"{name:<{first}}", *cells]))
    return "\n".join(lines)


def score_command(args: argparse.Namespace) -> int:
    g, cfg, saved = checkpoint.load_generator(args.path)  # DataError naming a missing or unreadable file
    path = checkpoint.path_of(args.path)
    device = torch.device(args.device)
    try:
        data = load_mnist(cfg.data_source, cfg.data_dir, cfg.subset)
    except RuntimeError as err:  # torchvision's download failure for mnist-train-60k
        raise DataError(f"{cfg.data_dir}: cannot load {cfg.data_source} for {path} ({err})") from None
    scores = make_scorer(data, device, args.n)(g.to(device), cfg.latent_dim)
    print(f"{path}: epoch {saved['epoch']}, real statistics from {data.source}")
    print(format_table({cfg.name: scores}))
    return 0


def baselines_command(args: argparse.Namespace) -> int:
    rows = baseline_table(args.n, torch.device(args.device))
    print(f"reference statistics: {BUNDLED}, a random half ({BASELINE_REFERENCE} images); "
          f"each set: {args.n} images built from the other half")
    print(format_table(rows))
    return 0


def sample_count(text: str) -> int:
    """--n of `score`: 0 (the device default) or at least 2 (one sample has no covariance)."""
    value = int(text)
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (the device default) or >= 2, got {value}")
    return value


def baseline_count(text: str) -> int:
    value = int(text)
    if not 2 <= value <= BASELINE_REFERENCE:
        raise argparse.ArgumentTypeError(f"must be in [2, {BASELINE_REFERENCE}] (the held-out half), got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="metrics of a trained generator")
    score.add_argument("path", help="a run directory (holding checkpoint.pt) or a checkpoint file")
    score.add_argument("--n", type=sample_count, default=0, help="generated images; 0: 10k on cuda, 2k on cpu")
    score.set_defaults(run=score_command)
    baselines = sub.add_parser("baselines", help="reference table: what good and bad scores look like")
    baselines.add_argument("--n", type=baseline_count, default=CPU_FID_SAMPLES,
                           help=f"images per set, at most the {BASELINE_REFERENCE} held-out images")
    baselines.set_defaults(run=baselines_command)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, DataError, ClassifierError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
