"""The adversarial loop (pure D and G steps, one epoch with one host sync, the end-of-epoch schedule)
and the single-run CLI `python -m gan_tune.train`.

The step and epoch functions open no files and print nothing; only `main` and the run-folder
functions below it do I/O. The Ray Tune trainable drives the same `fit` loop.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import logging
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import yaml
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gan_tune import artifacts, checkpoint, config, losses
from gan_tune.config import BALANCED_BAND, WARN_ABOVE, WARN_BELOW, CliParser, ConfigError, TrainConfig, device_available, \
    first_line
from gan_tune.data import DataError, Mnist, epoch_batches, load_mnist, to_float
from gan_tune.metrics import make_scorer  # the classifier itself loads only in runs that score
from gan_tune.models import build_models

# Order of the per-epoch sums kept on the device; each entry is summed over the steps that produce it.
D_STATS = ("loss_d", "d_acc_real", "d_acc_fake", "d_fake_prob")
G_STATS = ("loss_g",)
# Every key of an epoch record (fit adds the quality scores when they are due).
RECORD_KEYS = ("epoch", *D_STATS, *G_STATS, "d_acc", "img_per_s", "epoch_time_s", "balance", "step_mode")
FIXED_NOISE_COUNT = 64  # one 8x8 grid
log = logging.getLogger(__name__)
# Noise batches (of batch_size) that the averaged G's BatchNorm statistics are recomputed on, as cumulative
# averages (swa_utils.update_bn). Measured by the team at decay 0.999: averaged weights with the raw G's
# statistics scored barely better than no averaging; with statistics recomputed on 40 batches, 26 % better.
BN_RECOMPUTE_BATCHES = 40


GRAPH_WARMUP_ITERS = 3  # PyTorch's CUDA-graph recipe: a few eager iterations on a side stream before capture
N_STATS = len(D_STATS) + len(G_STATS)


@dataclass
class Gan:
    g: nn.Module
    d: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    step: Callable[[Tensor], None] | None = None  # one iteration on (n_disc, batch) indices; built by the first epoch
    sums: Tensor | None = None  # the step's statistics, summed on the device over an epoch
    step_mode: str = "eager"
    g_ema: nn.Module | None = None  # the moving average of G's weights when cfg.g_ema > 0 (eval mode, no grad)
    g_ema_bn_fresh: bool = False  # whether g_ema's BatchNorm statistics were recomputed since the last step
    g_ema_updates: Tensor | None = None  # how many updates the average has had, on the device (its warm-up)

    def eval_generator(self) -> nn.Module:
        """The generator to score, sample, checkpoint for export and log: G itself, or with g_ema on the
        averaged G with its BatchNorm statistics recomputed for its own weights (once per epoch, when first asked)."""
        if self.g_ema is None:
            return self.g
        if not self.g_ema_bn_fresh:
            noise = torch.Generator().manual_seed(self.cfg.seed + 2)  # the same batches every time, on every device
            batches = (torch.randn(self.cfg.batch_size, self.cfg.latent_dim, generator=noise).to(self.device)
                       for _ in range(BN_RECOMPUTE_BATCHES))  # drawn only if G has BatchNorm
            update_bn(batches, self.g_ema)  # momentum None: cumulative averages, then back to eval mode
            self.g_ema_bn_fresh = True
        return self.g_ema


def graph_unavailable(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why the step cannot be captured in a CUDA graph, or None when it can."""
    if not cfg.cuda_graph:
        return "cuda_graph is off"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (running on {device.type})"
    return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_gan(cfg: TrainConfig, device: torch.device) -> Gan:
    """Models and Adam optimisers with separate lr_d / lr_g, seeded from cfg.seed."""
    torch.manual_seed(cfg.seed)  # weight init is part of the run's identity
    g, d = build_models(cfg)
    g, d = g.to(device), d.to(device)
    if device.type == "cpu":  # oneDNN's NHWC convolutions; on the 2-core dev CPU +40 % at width 0.25, +10 % at 1
        g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~2x on Ampere+ at GAN-irrelevant precision
        torch.backends.cudnn.allow_tf32 = True  # convolutions too (PyTorch's default, set in case a user changed it)
        torch.backends.cudnn.benchmark = True  # shapes never change, so the autotuned algorithm is always reused
    adam = dict(betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"),  # one kernel, no .item() per step
                capturable=graph_unavailable(cfg, device) is None)  # capturable: step count stays on the device
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_g, **adam)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr_d, **adam)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False) if cfg.g_ema else None  # the average starts at G's init
    updates = torch.zeros((), device=device) if cfg.g_ema else None
    return Gan(g, d, opt_g, opt_d, cfg, device, g_ema=g_ema, g_ema_updates=updates)


def autocast(gan: Gan) -> contextlib.AbstractContextManager:
    if gan.cfg.precision == "bf16":
        # no cast cache: cached casts would outlive a CUDA graph capture
        return torch.autocast(device_type=gan.device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def d_step(gan: Gan, real: Tensor, z: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One D update on a real batch and G(z) with cfg.loss's D loss plus the penalties that are on;
    returns (stats over D_STATS as a (4,) tensor, fake). `generator` draws the gradient penalty's points."""
    cfg, family = gan.cfg, losses.LOSSES[gan.cfg.loss]
    if cfg.r1_gamma:
        real.requires_grad_(True)  # R1 differentiates D(real) with respect to the pixels
    with autocast(gan):
        fake = gan.g(z)
        out_real = gan.d(real).float()
        out_fake = gan.d(fake.detach()).float()  # detach: the D update must not reach G's weights
        loss_d = family.d_loss(out_real, out_fake, 1.0 - cfg.label_smoothing)  # one-sided: only real labels move
        if cfg.r1_gamma:
            loss_d = loss_d + cfg.r1_gamma / 2 * losses.r1_penalty(out_real, real)
        if family.gradient_penalty:
            loss_d = loss_d + cfg.gp_weight * losses.gradient_penalty(gan.d, real, fake.detach(), generator)
    gan.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    gan.opt_d.step()
    stats = torch.stack([
        loss_d.detach(),
        (out_real > family.real_threshold).float().mean(),  # D's decision: "real"
        (out_fake < family.real_threshold).float().mean(),
        family.real_prob(out_fake).mean(),  # D(G(z)) before this update
    ])
    return stats, fake


def g_step(gan: Gan, fake: Tensor) -> Tensor:
    """One G update on the same fake batch with cfg.loss's G loss (ns: G maximises log D(G(z))),
    then the weight average's update when g_ema is on."""
    with autocast(gan):
        loss_g = losses.LOSSES[gan.cfg.loss].g_loss(gan.d(fake).float())
    gan.opt_g.zero_grad(set_to_none=True)
    loss_g.backward(inputs=list(gan.g.parameters()))  # D's weight gradients are not needed here
    gan.opt_g.step()
    if gan.g_ema is not None:
        update_g_ema(gan)
    return loss_g.detach().reshape(1)


def update_g_ema(gan: Gan) -> None:
    """g_ema <- decay * g_ema + (1 - decay) * G, on the device in fused calls with no host read (capture-safe).

    decay = min(cfg.g_ema, (1 + n) / (10 + n)) after n updates (TensorFlow's ExponentialMovingAverage with
    num_updates): a fixed 0.999 would keep 73 % of G's random initial weights after the 312 steps of two CPU
    epochs, when ASHA's first rung compares trials by their scores. The count and the decay stay on the device.
    Not swa_utils.AveragedModel: its update branches in Python on its n_averaged tensor, a host sync
    per step. BatchNorm buffers are not averaged; Gan.eval_generator recomputes them for the averaged weights.
    """
    n = gan.g_ema_updates
    weight = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=gan.cfg.g_ema)
    averaged = list(gan.g_ema.parameters())
    # Not _foreach_lerp_: its weight is a Python scalar, so a 0-dim tensor weight is read on the host
    # (.item()), which breaks CUDA graph capture. The Tensor overload of _foreach_mul_ keeps it on the device.
    delta = torch._foreach_sub(list(gan.g.parameters()), averaged)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(averaged, delta)
    n.add_(1.0)


def train_iteration(gan: Gan, images: Tensor, idx: Tensor, generator: torch.Generator, sums: Tensor) -> None:
    """n_disc D steps then one G step; adds the step statistics into `sums` in place (no host sync)."""
    batch = idx.shape[-1]
    fake = None
    for k in range(gan.cfg.n_disc):
        real = to_float(images[idx[k]])
        z = torch.randn(batch, gan.cfg.latent_dim, device=gan.device, generator=generator)
        stats, fake = d_step(gan, real, z, generator)
        sums[: len(D_STATS)] += stats
    sums[len(D_STATS):] += g_step(gan, fake)


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
        gan.step(idx[it])
    values = gan.sums.tolist()  # the epoch's one host sync
    elapsed = time.perf_counter() - start
    stats = {k: v / (iters * cfg.n_disc) for k, v in zip(D_STATS, values)}
    stats.update({k: v / iters for k, v in zip(G_STATS, values[len(D_STATS):])})
    stats["d_acc"] = (stats["d_acc_real"] + stats["d_acc_fake"]) / 2
    stats["img_per_s"] = iters * cfg.n_disc * cfg.batch_size / elapsed
    stats["epoch_time_s"] = elapsed
    stats["balance"] = diagnose_balance(stats, cfg.loss)
    stats["step_mode"] = gan.step_mode
    return stats


def build_step(gan: Gan, images: Tensor, generator: torch.Generator) -> None:
    """Give `gan` its iteration function: eager, or replaying a CUDA graph of the whole D + G update."""
    gan.sums = torch.zeros(N_STATS, device=gan.device)
    eager = functools.partial(train_iteration, gan, images, generator=generator, sums=gan.sums)
    reason = graph_unavailable(gan.cfg, gan.device)
    if reason is None:
        gan.step, gan.step_mode = GraphStep(gan, eager, generator), "cuda_graph"
    else:
        gan.step, gan.step_mode = eager, "eager"
        log.info("training step runs eagerly: %s", reason)


class GraphStep:
    """Runs GRAPH_WARMUP_ITERS eager iterations on a side stream, then captures one iteration and replays it.

    The warm-up iterations are real training steps, so the graph path trains exactly the same
    iterations as the eager path. Batch indices are copied into a static buffer before each replay.
    If the capture fails (an op or a driver that cannot be captured), the run logs why and goes on eagerly:
    a capture records work without running it, so no training step is lost or repeated.
    """

    def __init__(self, gan: Gan, eager: Callable[..., None], generator: torch.Generator):
        self.gan, self.eager, self.generator = gan, eager, generator
        self.static_idx = torch.zeros(gan.cfg.n_disc, gan.cfg.batch_size, dtype=torch.long, device=gan.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm_iters = 0

    def __call__(self, idx: Tensor) -> None:
        if self.graph is not None:
            self.static_idx.copy_(idx)
            self.graph.replay()
            return
        self.warm_up(idx)
        self.warm_iters += 1
        if self.warm_iters == GRAPH_WARMUP_ITERS:
            self.capture_or_fall_back()

    def warm_up(self, idx: Tensor) -> None:
        side = torch.cuda.Stream(self.gan.device)
        side.wait_stream(torch.cuda.current_stream(self.gan.device))
        with torch.cuda.stream(side):
            self.eager(idx)
        torch.cuda.current_stream(self.gan.device).wait_stream(side)

    def capture_or_fall_back(self) -> None:
        rng = self.generator.get_state()
        try:
            self.graph = self.capture()
        except RuntimeError as err:  # torch.AcceleratorError is one; the optimisation must not end the run
            self.generator.set_state(rng)  # a failed capture may have reserved random offsets
            discard_capture_error(self.gan.device)
            self.gan.step, self.gan.step_mode = self.eager, "eager"
            log.warning("CUDA graph capture failed, training on eagerly: %s", first_line(err))

    def capture(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)  # replays advance the batch/noise generator
        self.gan.opt_d.zero_grad(set_to_none=True)
        self.gan.opt_g.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self.eager(self.static_idx)
        return graph


def discard_capture_error(device: torch.device) -> None:
    """Let the device finish what was queued before the failed capture; its error was already raised."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
    except RuntimeError as err:
        log.warning("after the failed capture: %s", first_line(err))


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


def due(cfg: TrainConfig, epoch: int, diverged: bool = False) -> Due:
    last = epoch == cfg.max_epochs
    return Due(score=bool(cfg.eval_every) and (epoch % cfg.eval_every == 0 or last) and not diverged,
               sample=epoch % cfg.sample_every == 0 or last or diverged,
               checkpoint=(epoch % cfg.checkpoint_every == 0 or last) and not diverged)



def fit(gan: Gan, images: Tensor, generator: torch.Generator, start_epoch: int = 0, scorer: Scorer | None = None,
        wrap: Callable[[Iterable[int]], Iterable[int]] = iter) -> Iterator[dict]:
    """Train epochs start_epoch+1 .. max_epochs, yielding each epoch's record; stops after a divergence.

    Quality scores are added every `eval_every` epochs and always on the last one.
    """
    cfg = gan.cfg
    for epoch in range(start_epoch + 1, cfg.max_epochs + 1):
        record = {"epoch": epoch, **train_epoch(gan, images, generator, wrap)}
        if scorer is not None and due(cfg, epoch, record["balance"] == "diverged").score:
            record.update(scorer(gan.eval_generator(), cfg.latent_dim))
        yield record
        if record["balance"] == "diverged":
            return


# ---- single-run CLI: python -m gan_tune.train --config FILE.yaml [--set key=value ...] [--resume RUN_DIR]

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.train", description="Train one GAN and write a run folder.")
    parser.add_argument("--config", help="YAML file of TrainConfig fields (defaults: the balanced recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set lr_d=1.0e-4 (repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder from its checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / checkpoint.FILE).is_file():
            raise ConfigError("--resume", f"{run_dir / checkpoint.FILE} not found: not a run folder with a checkpoint")
        if args.config:
            raise ConfigError("--config", "cannot be combined with --resume (the run folder holds its config)")
        cfg = config.load(run_dir / "config.yaml", args.overrides)
    else:
        cfg, run_dir = config.load(args.config, args.overrides), None
    if not device_available(cfg.device):  # a single run trains here; a search's trials may run elsewhere
        raise ConfigError("device", f"{cfg.device}: this machine has no such device (use auto or cpu)")
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, run_dir = resolve_config(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        run_dir = train_run(cfg, run_dir)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}")
    return 0


def new_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.out_dir) / f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    try:
        (run_dir / artifacts.SAMPLES).mkdir(parents=True)
    except OSError as err:
        raise ConfigError("out_dir", f"{cfg.out_dir}: cannot make a run folder there ({err.strerror})") from None
    config.save(cfg, run_dir / "config.yaml")
    return run_dir


def run_logger(run_dir: Path) -> logging.Logger:
    log = logging.getLogger(f"gan_tune.run.{run_dir.name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


def train_run(cfg: TrainConfig, run_dir: Path | None = None) -> Path:
    """Train with cfg, writing grids, history, plot, GIF and checkpoints into a (new or resumed) run folder."""
    device = resolve_device(cfg.device)
    # read before anything is logged: a corrupt checkpoint fails with one line on stderr
    saved = resume_state(run_dir, device) if run_dir and (run_dir / checkpoint.FILE).is_file() else None
    run_dir = run_dir or new_run_dir(cfg)
    log = run_logger(run_dir)
    data = load_mnist(cfg.data_source, cfg.data_dir, cfg.subset).to(device)
    log.info("data: %s (%d images) on %s; model %s", data.source, len(data), device, cfg.model)
    gan, generator = make_gan(cfg, device), make_generator(cfg, device)
    start_epoch, noise, history = 0, fixed_noise(cfg, device), []
    if saved is not None:
        start_epoch, noise, history = checkpoint.restore(gan, saved, generator)
        log.info("resumed %s at epoch %d", run_dir, start_epoch)
    scorer = build_scorer(cfg, data, device)
    bar = functools.partial(tqdm, leave=False, unit="it", dynamic_ncols=True)
    with logging_redirect_tqdm([log]):
        for record in fit(gan, data.images, generator, start_epoch, scorer, wrap=bar):
            history.append({**record, "data_source": data.source})
            write_epoch(run_dir, gan, record, noise, generator, history, log)
    write_final(run_dir, gan, noise, history)
    return run_dir


def resume_state(run_dir: Path, device: torch.device) -> dict:
    """The run folder's checkpoint for --resume; unreadable, the one line says how to go on."""
    try:
        return checkpoint.read(run_dir, device)
    except DataError as err:
        raise DataError(f"{err}; delete it to start over") from None


def build_scorer(cfg: TrainConfig, data: Mnist, device: torch.device) -> Scorer | None:
    if not cfg.eval_every:
        return None
    return make_scorer(data, device, cfg.fid_samples)


def write_epoch(run_dir: Path, gan: Gan, record: dict, noise: Tensor, generator: torch.Generator,
                history: list[dict], log: logging.Logger) -> None:
    epoch, cfg = record["epoch"], gan.cfg
    log.info("epoch %d/%d %s", epoch, cfg.max_epochs, format_record(record))
    if record["balance"] in ("D too weak", "D too strong", "diverged"):
        log.warning("epoch %d: %s (d_acc %.2f)", epoch, record["balance"], record["d_acc"])
    todo = due(cfg, epoch, record["balance"] == "diverged")
    if todo.sample:
        artifacts.save_grid(generate(gan.eval_generator(), noise), run_dir / artifacts.SAMPLES / artifacts.grid_name(epoch))
    if todo.checkpoint:
        checkpoint.write(checkpoint.state(gan, epoch, noise, generator, history), run_dir)


def write_final(run_dir: Path, gan: Gan, noise: Tensor, history: list[dict]) -> None:
    artifacts.write_summary(run_dir, generate(gan.eval_generator(), noise), history)


def format_record(record: dict) -> str:
    keys = ("loss_d", "loss_g", "d_acc", "d_fake_prob", "fid", "coverage", "img_per_s")
    return " ".join(f"{k}={record[k]:.4g}" for k in keys if k in record) + f" [{record['balance']}]"


if __name__ == "__main__":
    raise SystemExit(main())
