"""GAN loss families behind a registry: each entry holds D's and G's loss on D's raw outputs and how to read them.

D's outputs are one number per image, shape (B,): a logit for `ns`, a regression output for `ls`, a
score for `hinge` and `wgan-gp`. The entry also says when D calls an image "real" (for d_acc_*), how its
output reads as a probability of "real" (d_fake_prob), and which loss size means the run diverged.
Penalties that need D's inputs (the gradient penalty, R1) are functions of D and images, below the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# A BCE loss this large means logits of about +-1000: the weights have exploded even if still finite
# (huge learning rates reach 1e24 before any NaN), so the run is called diverged.
DIVERGED_BCE_LOSS = 1.0e3
# A WGAN critic has no anchor for its level (only its slope is held near 1), so its outputs and both losses
# drift legitimately into the hundreds or thousands; only far beyond that is the run exploding.
DIVERGED_CRITIC_LOSS = 1.0e6
LS_REAL_THRESHOLD = 0.5  # least squares regresses D's output to 1 (real) and 0 (fake): the midpoint decides


@dataclass(frozen=True)
class Loss:
    d_loss: Callable[[Tensor, Tensor, float], Tensor]  # (D(real), D(fake), real target) -> D's loss to minimise
    g_loss: Callable[[Tensor], Tensor]  # D(G(z)) -> G's loss to minimise
    real_threshold: float  # D's decision is "real" when its output exceeds this
    real_prob: Callable[[Tensor], Tensor]  # D's output read as a probability of "real", for d_fake_prob
    diverged_loss: float  # |loss_d| or |loss_g| at or above this: the run diverged
    uses_labels: bool = True  # whether a real target (label_smoothing) means anything
    gradient_penalty: bool = False  # add gp_weight * gradient_penalty (WGAN-GP)


def ns_d(real: Tensor, fake: Tensor, real_target: float) -> Tensor:
    # D maximises log D(x) + log(1 - D(G(z)))
    return F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_target)) \
        + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def ns_g(fake: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))  # G maximises log D(G(z))


def ls_d(real: Tensor, fake: Tensor, real_target: float) -> Tensor:
    # Mao et al. 2017, targets a=0 (fake), b=1 (real); the 1/2 of the paper kept so the scale is theirs
    return 0.5 * ((real - real_target).square().mean() + fake.square().mean())


def ls_g(fake: Tensor) -> Tensor:
    return 0.5 * (fake - 1.0).square().mean()  # c=1: G wants D to call its images real


def hinge_d(real: Tensor, fake: Tensor, real_target: float) -> Tensor:
    # Lim & Ye 2017 / Miyato et al. 2018: D pushes real scores above +1 and fake ones below -1
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def score_g(fake: Tensor) -> Tensor:
    return -fake.mean()  # hinge and WGAN: G raises D's score of its images


def wgan_d(real: Tensor, fake: Tensor, real_target: float) -> Tensor:
    return fake.mean() - real.mean()  # the critic maximises E[D(x)] - E[D(G(z))]


LOSSES: dict[str, Loss] = {
    "ns": Loss(ns_d, ns_g, 0.0, torch.sigmoid, DIVERGED_BCE_LOSS),
    "ls": Loss(ls_d, ls_g, LS_REAL_THRESHOLD, lambda out: out.clamp(0.0, 1.0), DIVERGED_BCE_LOSS),
    "hinge": Loss(hinge_d, score_g, 0.0, torch.sigmoid, DIVERGED_BCE_LOSS, uses_labels=False),
    "wgan-gp": Loss(wgan_d, score_g, 0.0, torch.sigmoid, DIVERGED_CRITIC_LOSS, uses_labels=False,
                    gradient_penalty=True),
}


def gradient_penalty(d: nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator) -> Tensor:
    """Gulrajani et al. 2017: E[(||grad D(x_hat)||_2 - 1)^2] at random points x_hat between real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator)
    between = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(between).float().sum(), between, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1.0).square().mean()


def r1_penalty(real_out: Tensor, real: Tensor) -> Tensor:
    """Mescheder et al. 2018: E||grad_x D(x)||^2 on real images (`real` must require grad before D saw it)."""
    (grad,) = torch.autograd.grad(real_out.sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(dim=1).mean()
