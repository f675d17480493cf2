"""Quality scores of a generator, read off the bundled MNIST classifier (quality.mnist_classifier).

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

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from gan_tune.quality.mnist_classifier import NUM_CLASSES

COVERAGE_MIN_SHARE = 0.02  # a class is covered from 2 % of the samples (a balanced generator gives 10 %)
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
