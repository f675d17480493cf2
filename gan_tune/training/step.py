"""One adversarial iteration: the Gan (models, Adam optimisers, the G weight average), n_disc D steps
then one G step, capture-safe (no host read), and GraphStep, which replays it as a CUDA graph.

Nothing here opens files or prints; `loop` runs epochs of these steps.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from gan_tune.training import augment, losses
from gan_tune.training.config import TrainConfig, first_line
from gan_tune.training.data import to_float
from gan_tune.training.models import build_models

# Order of the per-epoch sums kept on the device; each entry is summed over the steps that produce it.
D_STATS = ("loss_d", "d_acc_real", "d_acc_fake", "d_fake_prob")
G_STATS = ("loss_g",)
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
    augment_p: Tensor | None = None  # the augmentation probability on the device (None: every image, or no augment)
    iteration: int = 0  # the running iteration's index in its epoch (a host int: lazy R1 picks its iterations by it)

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
    if cfg.r1_gamma and cfg.r1_every > 1:  # one graph replays one iteration; lazy R1 alternates two different ones
        return f"r1_every {cfg.r1_every} alternates iterations with and without R1 (a graph replays one)"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (running on {device.type})"
    return None


def r1_scale(cfg: TrainConfig, iteration: int) -> int:
    """What multiplies r1_gamma in this iteration: 1 on every one, or with lazy R1 r1_every on every r1_every-th
    iteration of the epoch and 0 between (counted in the epoch: a resumed run regularises the same iterations)."""
    return 0 if iteration % cfg.r1_every else cfg.r1_every


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
    return Gan(g, d, opt_g, opt_d, cfg, device, g_ema=g_ema, g_ema_updates=updates, augment_p=initial_augment_p(cfg, device))


def initial_augment_p(cfg: TrainConfig, device: torch.device) -> Tensor | None:
    """The augmentation probability as a device tensor when it can be below 1 (fixed p < 1, or adaptive)."""
    if cfg.augment == "none" or (cfg.augment_p == 1.0 and not cfg.augment_target):
        return None
    return torch.tensor(cfg.augment_p, device=device)


def autocast(gan: Gan) -> contextlib.AbstractContextManager:
    if gan.cfg.precision == "bf16":
        # no cast cache: cached casts would outlive a CUDA graph capture
        return torch.autocast(device_type=gan.device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def d_step(gan: Gan, real: Tensor, z: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One D update on a real batch and G(z) with cfg.loss's D loss plus the penalties that are on;
    returns (stats over D_STATS as a (4,) tensor, fake). `generator` draws the gradient penalty's points."""
    cfg, family = gan.cfg, losses.LOSSES[gan.cfg.loss]
    ops = augment.parse(cfg.augment)
    r1_gamma = cfg.r1_gamma * r1_scale(cfg, gan.iteration)
    if r1_gamma:
        real.requires_grad_(True)  # R1 differentiates D(real) with respect to the pixels
    with autocast(gan):
        fake = gan.g(z)
        seen_real = augment.augment(real, ops, gan.augment_p, generator)  # D sees both sides augmented
        seen_fake = augment.augment(fake.detach(), ops, gan.augment_p, generator)  # detach: D's update spares G
        out_real = gan.d(seen_real).float()
        out_fake = gan.d(seen_fake).float()
        loss_d = family.d_loss(out_real, out_fake, 1.0 - cfg.label_smoothing)  # one-sided: only real labels move
        if r1_gamma:
            loss_d = loss_d + r1_gamma / 2 * losses.r1_penalty(out_real, real)
        if family.gradient_penalty:
            loss_d = loss_d + cfg.gp_weight * losses.gradient_penalty(gan.d, seen_real, seen_fake, generator)
    if cfg.augment_target:
        augment.adapt(gan.augment_p, out_real, family.real_threshold, cfg.augment_target)
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


def g_step(gan: Gan, fake: Tensor, generator: torch.Generator) -> Tensor:
    """One G update on the same fake batch with cfg.loss's G loss (ns: G maximises log D(G(z))), through the
    same augmentation D trained on, then the weight average's update when g_ema is on."""
    seen = augment.augment(fake, augment.parse(gan.cfg.augment), gan.augment_p, generator)
    with autocast(gan):
        loss_g = losses.LOSSES[gan.cfg.loss].g_loss(gan.d(seen).float())
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
    sums[len(D_STATS):] += g_step(gan, fake, generator)


def build_step(gan: Gan, images: Tensor, generator: torch.Generator) -> None:
    """Give `gan` its iteration function: eager, or replaying a CUDA graph of the whole D + G update."""
    gan.sums = torch.zeros(N_STATS, device=gan.device)
    eager = functools.partial(train_iteration, gan, images, generator=generator, sums=gan.sums)
    static_idx = torch.zeros(gan.cfg.n_disc, gan.cfg.batch_size, dtype=torch.long, device=gan.device)
    set_step(gan, eager, [generator], static_idx, (gan.opt_d, gan.opt_g))


def set_step(owner: Any, eager: Callable[[Tensor], None], generators: list[torch.Generator], static_idx: Tensor,
             optimisers: tuple) -> None:
    """owner.step (and step_mode): `eager`, or a GraphStep of it when the owner's config and device allow one.
    `owner` is a Gan or a training.cohort.Cohort: anything with cfg, device, step and step_mode."""
    reason = graph_unavailable(owner.cfg, owner.device)
    if reason is None:
        owner.step, owner.step_mode = GraphStep(owner, eager, generators, static_idx, optimisers), "cuda_graph"
    else:
        owner.step, owner.step_mode = eager, "eager"
        log.info("training step runs eagerly: %s", reason)


class GraphStep:
    """Runs GRAPH_WARMUP_ITERS eager iterations on a side stream, then captures one iteration and replays it.

    The warm-up iterations are real training steps, so the graph path trains exactly the same
    iterations as the eager path. Batch indices are copied into a static buffer before each replay.
    If the capture fails (an op or a driver that cannot be captured), the run logs why and goes on eagerly:
    a capture records work without running it, so no training step is lost or repeated.
    `generators` (the batch/noise generators the iteration draws from; one per cohort member) are registered
    with the graph, so each replay advances them; `optimisers` drop their gradients before the capture.
    """

    def __init__(self, owner: Any, eager: Callable[[Tensor], None], generators: list[torch.Generator],
                 static_idx: Tensor, optimisers: tuple):
        self.owner, self.eager, self.generators, self.optimisers = owner, eager, generators, optimisers
        self.static_idx = static_idx
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
        device = self.owner.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.eager(idx)
        torch.cuda.current_stream(device).wait_stream(side)

    def capture_or_fall_back(self) -> None:
        states = [gen.get_state() for gen in self.generators]
        try:
            self.graph = self.capture()
        except RuntimeError as err:  # torch.AcceleratorError is one; the optimisation must not end the run
            for gen, state in zip(self.generators, states):
                gen.set_state(state)  # a failed capture may have reserved random offsets
            discard_capture_error(self.owner.device)
            self.owner.step, self.owner.step_mode = self.eager, "eager"
            log.warning("CUDA graph capture failed, training on eagerly: %s", first_line(err))

    def capture(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        for gen in self.generators:
            graph.register_generator_state(gen)  # replays advance the batch/noise generators
        for optimiser in self.optimisers:
            optimiser.zero_grad(set_to_none=True)
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
