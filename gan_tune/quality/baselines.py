"""Reference sets (held-out real, blurred, noisy, noise, collapsed, half the classes) that put the metrics on a scale."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from gan_tune.quality.scorer import real_stats, score_images
from gan_tune.training.data import BUNDLED, Mnist, load_mnist, to_float

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
