"""One adversarial iteration of a cohort (training.cohort): what training.step does for one trial, for K
members at once, capture-safe (no host read anywhere, so a CUDA graph can replay it later).

Member k is trained exactly as an ordinary trial of its config: its own batch indices, its noise and
penalty points drawn from its own generator in the order step.train_iteration draws them, the same loss
code (cfg.loss's functions, called on its column of D's (B, K) outputs), its own Adam settings. Images,
noise and D's inputs are (B, K, ...): the member is dimension 1.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor
from torch.nn import functional as F

from gan_tune.training import augment, losses
from gan_tune.training.cohort import Cohort
from gan_tune.training.data import epoch_batches, to_float
from gan_tune.training.loop import iterations_per_epoch
from gan_tune.training.step import D_STATS, G_STATS, N_STATS, autocast, r1_scale, set_step


def member_noise(cohort: Cohort, generators: list[torch.Generator], batch: int) -> Tensor:
    """(B, K, latent) noise: member k's own draw of its own latent size from its generator, zero-padded to the
    cohort's largest (the padding meets zero weights that get no gradient: the member is its smaller model)."""
    width = cohort.noise_dim
    return torch.stack([F.pad(torch.randn(batch, cfg.latent_dim, device=cohort.device, generator=gen),
                              (0, width - cfg.latent_dim)) for cfg, gen in zip(cohort.cfgs, generators)], dim=1)


def augment_members(cohort: Cohort, images: Tensor, generators: list[torch.Generator]) -> Tensor:
    """Each member's (B, 1, 28, 28) images augmented with its own generator and probability, as its trial does."""
    ops = augment.parse(cohort.cfg.augment)
    if not ops:
        return images
    p = cohort.augment_p
    return torch.cat([augment.augment(images[:, k:k + 1], ops, None if p is None else p[k], gen)
                      for k, gen in enumerate(generators)], dim=1)


def per_member(loss, *outputs: Tensor, **kwargs) -> Tensor:
    """(K,) losses: `loss` on each member's column of D's (B, K) outputs."""
    return torch.stack([loss(*(out[:, k] for out in outputs), **kwargs) for k in range(outputs[0].shape[1])])


def r1_penalties(out_real: Tensor, real: Tensor) -> Tensor:
    """losses.r1_penalty per member: E||grad_x D_k(x)||^2 over member k's real images, (K,)."""
    (grad,) = torch.autograd.grad(out_real.sum(), real, create_graph=True)
    return grad.square().flatten(2).sum(dim=2).mean(dim=0)


def gradient_penalties(cohort: Cohort, real: Tensor, fake: Tensor, generators: list[torch.Generator]) -> Tensor:
    """losses.gradient_penalty per member, (K,); member k's points between real and fake from its generator."""
    alpha = torch.cat([torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=gen)
                       for gen in generators], dim=1)  # (B, K, 1, 1)
    between = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(cohort.d(between).float().sum(), between, create_graph=True)
    return (grad.flatten(2).norm(dim=2) - 1.0).square().mean(dim=0)


def stop_diverged(cohort: Cohort, loss: Tensor) -> None:
    """Members whose loss is not finite or reached the family's divergence size stop (alive 0), on the device."""
    healthy = torch.isfinite(loss) & (loss.abs() < losses.LOSSES[cohort.cfg.loss].diverged_loss)
    cohort.alive.mul_(healthy.to(cohort.alive.dtype))


def d_losses(cohort: Cohort, real: Tensor, fake: Tensor, generators: list[torch.Generator],
             r1: int) -> tuple[Tensor, ...]:
    """(K,) D losses with the penalties that are on (R1 times `r1`: step.r1_scale), and D's (B, K) outputs on
    real and fake."""
    cfg, family = cohort.cfg, losses.LOSSES[cohort.cfg.loss]
    seen_real = augment_members(cohort, real, generators)  # D sees both sides augmented
    seen_fake = augment_members(cohort, fake.detach(), generators)  # detach: D's update spares G
    out_real, out_fake = cohort.d(seen_real).float(), cohort.d(seen_fake).float()
    loss_d = torch.stack([family.d_loss(out_real[:, k], out_fake[:, k], 1.0 - member.label_smoothing)
                          for k, member in enumerate(cohort.cfgs)])  # one-sided: only real labels move
    if r1:
        loss_d = loss_d + cohort.r1_gamma * r1 / 2 * r1_penalties(out_real, real)
    if family.gradient_penalty:
        loss_d = loss_d + cfg.gp_weight * gradient_penalties(cohort, seen_real, seen_fake, generators)
    return loss_d, out_real, out_fake


def d_step(cohort: Cohort, real: Tensor, z: Tensor, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
    """One D update of every live member; returns (stats over D_STATS as a (4, K) tensor, fake)."""
    cfg, family = cohort.cfg, losses.LOSSES[cohort.cfg.loss]
    r1 = r1_scale(cfg, cohort.iteration) if cohort.r1_gamma is not None else 0
    if r1:
        real.requires_grad_(True)  # R1 differentiates D(real) with respect to the pixels
    with autocast(cohort):
        fake = cohort.g(z)
        loss_d, out_real, out_fake = d_losses(cohort, real, fake, generators, r1)
    if cfg.augment_target:
        for k in range(cohort.members):
            augment.adapt(cohort.augment_p[k], out_real[:, k], family.real_threshold, cfg.augment_target)
    stop_diverged(cohort, loss_d.detach())  # before the update: a NaN loss must not move the weights
    cohort.opt_d.zero_grad()
    loss_d.sum().backward()  # the members share no weight: the sum's gradient is each member's own
    cohort.opt_d.update(cohort.alive)
    stats = torch.stack([
        loss_d.detach(),
        (out_real > family.real_threshold).float().mean(dim=0),
        (out_fake < family.real_threshold).float().mean(dim=0),
        family.real_prob(out_fake).mean(dim=0),
    ])
    return stats, fake


def g_step(cohort: Cohort, fake: Tensor, generators: list[torch.Generator]) -> Tensor:
    """One G update of every live member on the same fake batch, then the weight averages; (K,) G losses."""
    seen = augment_members(cohort, fake, generators)
    with autocast(cohort):
        loss_g = per_member(losses.LOSSES[cohort.cfg.loss].g_loss, cohort.d(seen).float())
    stop_diverged(cohort, loss_g.detach())
    cohort.opt_g.zero_grad()
    loss_g.sum().backward(inputs=list(cohort.g.parameters()))  # D's weight gradients are not needed here
    cohort.opt_g.update(cohort.alive)
    if cohort.g_ema is not None:
        update_g_ema(cohort)
    return loss_g.detach()


@torch.no_grad()
def update_g_ema(cohort: Cohort) -> None:
    """step.update_g_ema per member: decay_k = min(g_ema_k, (1 + n_k) / (10 + n_k)); a member with g_ema 0
    averages nothing (its average is G), a stopped member's average stays."""
    n = cohort.g_ema_updates
    weight = 1.0 - torch.minimum((1.0 + n) / (10.0 + n), cohort.g_ema_decay)
    live = cohort.alive > 0
    for averaged, current in zip(cohort.g_ema.parameters(), cohort.g.parameters()):
        shape = (-1,) + (1,) * (current.dim() - 1)
        delta = (current - averaged) * weight.view(shape)
        averaged.copy_(torch.where(live.view(shape), averaged + delta, averaged))
    n.add_(live.to(n.dtype))


def real_batch(images: Tensor, idx: Tensor) -> Tensor:
    """uint8 (N, 28, 28) images at (K, B) indices -> float (B, K, 28, 28) in [-1, 1], as data.to_float makes them."""
    return to_float(images[idx.t()]).squeeze(1)


def cohort_iteration(cohort: Cohort, images: Tensor, idx: Tensor, generators: list[torch.Generator],
                     sums: Tensor) -> None:
    """n_disc D steps then one G step of every member; idx (K, n_disc, B) holds each member's own batch indices.
    Adds the (N_STATS, K) step statistics into `sums` in place (no host sync)."""
    fake = None
    for s in range(cohort.cfg.n_disc):
        z = member_noise(cohort, generators, idx.shape[-1])
        stats, fake = d_step(cohort, real_batch(images, idx[:, s]), z, generators)
        sums[: len(D_STATS)] += stats
    sums[len(D_STATS):] += g_step(cohort, fake, generators)


def make_generators(cohort: Cohort) -> list[torch.Generator]:
    """One generator per member, seeded as loop.make_generator seeds an ordinary trial's."""
    return [torch.Generator(device=cohort.device).manual_seed(cfg.seed) for cfg in cohort.cfgs]


def build_cohort_step(cohort: Cohort, images: Tensor, generators: list[torch.Generator]) -> None:
    """cohort.step: cohort_iteration, eagerly or replayed from a CUDA graph (step.GraphStep, with its fall-back
    to eager), each member's generator registered with the graph. Rebuilt after members are removed."""
    cfg = cohort.cfg
    cohort.sums = torch.zeros(N_STATS, cohort.members, device=cohort.device)
    eager = functools.partial(cohort_iteration, cohort, images, generators=generators, sums=cohort.sums)
    static_idx = torch.zeros(cohort.members, cfg.n_disc, cfg.batch_size, dtype=torch.long, device=cohort.device)
    set_step(cohort, eager, generators, static_idx, (cohort.opt_d, cohort.opt_g))
    cohort.step_inputs = (images, *generators)


def train_cohort_epoch(cohort: Cohort, images: Tensor, generators: list[torch.Generator]) -> list[dict[str, float]]:
    """One epoch of every member (loop.train_epoch's draws: each member's batch order from its own generator),
    through cohort.step (eager, or its CUDA graph), with one host sync; one record per member (its mean
    statistics, alive) and the cohort's img_per_s."""
    cfg, members = cohort.cfg, cohort.members
    iters = iterations_per_epoch(cfg, images.shape[0])
    for module in (cohort.g, cohort.d):
        module.train()
    start = time.perf_counter()
    idx = torch.stack([epoch_batches(images.shape[0], cfg.batch_size, iters * cfg.n_disc, gen, cohort.device)
                       .view(iters, cfg.n_disc, cfg.batch_size) for gen in generators], dim=1)  # (iters, K, n_disc, B)
    inputs = (images, *generators)  # compared by identity: a tensor's == is elementwise
    if cohort.step is None or len(inputs) != len(cohort.step_inputs) or any(
            mine is not theirs for mine, theirs in zip(inputs, cohort.step_inputs)):
        build_cohort_step(cohort, images, generators)
    cohort.sums.zero_()
    for it in range(iters):
        cohort.iteration = it
        cohort.step(idx[it])
    values = torch.cat([cohort.sums, cohort.alive.view(1, -1)]).tolist()  # the epoch's one host sync
    elapsed = time.perf_counter() - start
    records = []
    for k in range(members):
        record = {key: values[i][k] / (iters * cfg.n_disc) for i, key in enumerate(D_STATS)}
        record.update({key: values[len(D_STATS) + i][k] / iters for i, key in enumerate(G_STATS)})
        record["d_acc"] = (record["d_acc_real"] + record["d_acc_fake"]) / 2
        record["alive"] = values[-1][k]
        record["cohort_img_per_s"] = members * iters * cfg.n_disc * cfg.batch_size / elapsed
        records.append(record)
    return records
