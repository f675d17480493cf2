"""The epoch loop: one epoch with one host sync, the end-of-epoch schedule, sample generation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from gan_tune.training import losses
from gan_tune.training.config import BALANCED_BAND, WARN_ABOVE, WARN_BELOW, TrainConfig
from gan_tune.training.data import epoch_batches
from gan_tune.training.step import D_STATS, G_STATS, Gan, build_step

# Every key of an epoch record (fit adds the quality scores when they are due).
RECORD_KEYS = ("epoch", *D_STATS, *G_STATS, "d_acc", "img_per_s", "epoch_time_s", "balance", "step_mode", "augment_p",
               "score_s")


FIXED_NOISE_COUNT = 64  # one 8x8 grid


def iterations_per_epoch(cfg: TrainConfig, n_images: int) -> int:
    d_steps = cfg.steps_per_epoch or n_images // cfg.batch_size
    return max(1, d_steps // cfg.n_disc)


def train_epoch(gan: Gan, images: Tensor, generator: torch.Generator,
                wrap: Callable[[Iterable[int]], Iterable[int]] = iter) -> dict[str, float | str]:
    """One epoch over `images` (uint8 on gan.device). `wrap` may add a progress bar over iterations."""
    cfg = gan.cfg
    iters = iterations_per_epoch(cfg, images.shape[0])
    gan.g.train()
    gan.d.train()
    gan.g_ema_bn_fresh = False  # this epoch's steps move the averaged weights
    start = time.perf_counter()
    idx = epoch_batches(images.shape[0], cfg.batch_size, iters * cfg.n_disc, generator, gan.device)
    idx = idx.view(iters, cfg.n_disc, cfg.batch_size)
    if gan.step is None:
        build_step(gan, images, generator)
    gan.sums.zero_()
    for it in wrap(range(iters)):
        gan.iteration = it
        gan.step(idx[it])
    readback = gan.sums if gan.augment_p is None else torch.cat([gan.sums, gan.augment_p.reshape(1)])
    values = readback.tolist()  # the epoch's one host sync
    elapsed = time.perf_counter() - start
    stats = {k: v / (iters * cfg.n_disc) for k, v in zip(D_STATS, values)}
    stats.update({k: v / iters for k, v in zip(G_STATS, values[len(D_STATS):])})
    stats["d_acc"] = (stats["d_acc_real"] + stats["d_acc_fake"]) / 2
    stats["img_per_s"] = iters * cfg.n_disc * cfg.batch_size / elapsed
    stats["epoch_time_s"] = elapsed
    stats["balance"] = diagnose_balance(stats, cfg.loss)
    stats["step_mode"] = gan.step_mode
    stats["augment_p"] = values[-1] if gan.augment_p is not None else float(cfg.augment != "none")
    return stats


def diagnose_balance(stats: dict, loss: str = "ns") -> str:
    """'diverged', 'D too weak', 'D too strong', 'balanced' or 'borderline' (between the bands).

    Diverged: a loss not finite, or as large as the loss family's `diverged_loss`."""
    limit = losses.LOSSES[loss].diverged_loss
    if not all(math.isfinite(stats[k]) and abs(stats[k]) < limit for k in ("loss_d", "loss_g")):
        return "diverged"
    acc = stats["d_acc"]
    if acc < WARN_BELOW:
        return "D too weak"
    if acc > WARN_ABOVE:
        return "D too strong"
    if BALANCED_BAND[0] <= acc <= BALANCED_BAND[1]:
        return "balanced"
    return "borderline"


def make_generator(cfg: TrainConfig, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(cfg.seed)


def fixed_noise(cfg: TrainConfig, device: torch.device) -> Tensor:
    """Noise for sample grids, drawn on the CPU so every device shows the same latent points."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randn(FIXED_NOISE_COUNT, cfg.latent_dim, generator=gen).to(device)


@torch.no_grad()
def generate(g: nn.Module, z: Tensor) -> Tensor:
    """Images in [-1, 1] from G in eval mode (BatchNorm running statistics), then back to train mode."""
    was_training = g.training
    g.eval()
    try:
        return g(z).float()
    finally:
        g.train(was_training)


Scorer = Callable[[nn.Module, int], dict[str, float]]


@dataclass(frozen=True)
class Due:
    """What the end of an epoch does; one schedule for the single-run CLI and the Tune trainable."""

    score: bool  # quality scores (fid, is, coverage, ...)
    sample: bool  # the fixed-noise grid; the last epoch, or a diverged one, always gets one
    checkpoint: bool  # never of a diverged state: a restore would only diverge again


def due(cfg: TrainConfig, epoch: int, diverged: bool = False, since_checkpoint_s: float | None = None) -> Due:
    """`since_checkpoint_s`: seconds since the last checkpoint, which cfg.checkpoint_every_s > 0 goes by
    (without it, or with checkpoint_every_s 0, checkpoints come every checkpoint_every epochs)."""
    last = epoch == cfg.max_epochs
    if cfg.checkpoint_every_s > 0 and since_checkpoint_s is not None:
        periodic = since_checkpoint_s >= cfg.checkpoint_every_s
    else:
        periodic = epoch % cfg.checkpoint_every == 0
    return Due(score=bool(cfg.eval_every) and (epoch % cfg.eval_every == 0 or last) and not diverged,
               sample=epoch % cfg.sample_every == 0 or last or diverged,
               checkpoint=(periodic or last) and not diverged)


def fit(gan: Gan, images: Tensor, generator: torch.Generator, start_epoch: int = 0, scorer: Scorer | None = None,
        wrap: Callable[[Iterable[int]], Iterable[int]] = iter) -> Iterator[dict]:
    """Train epochs start_epoch+1 .. max_epochs, yielding each epoch's record; stops after a divergence.

    Quality scores are added every `eval_every` epochs and always on the last one.
    """
    cfg = gan.cfg
    for epoch in range(start_epoch + 1, cfg.max_epochs + 1):
        record = {"epoch": epoch, **train_epoch(gan, images, generator, wrap), "score_s": 0.0}
        if scorer is not None and due(cfg, epoch, record["balance"] == "diverged").score:
            started = time.perf_counter()
            record.update(scorer(gan.eval_generator(), cfg.latent_dim))
            record["score_s"] = time.perf_counter() - started  # the scores' share of a trial (README, Performance)
        yield record
        if record["balance"] == "diverged":
            return
