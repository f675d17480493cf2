"""Model families behind a registry: each builder turns a TrainConfig into (generator, discriminator).

Generators map (B, latent_dim) noise to (B, 1, 28, 28) images in [-1, 1]; discriminators return one
logit per image, shape (B,): the losses use BCE-with-logits, never Sigmoid + BCELoss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from gan_tune.config import TrainConfig

Builder = Callable[["TrainConfig"], tuple[nn.Module, nn.Module]]
MODELS: dict[str, Builder] = {}

DCGAN_INIT_STD = 0.02  # Radford et al. 2015: all weights from N(0, 0.02), BN scales from N(1, 0.02)
LEAKY_SLOPE = 0.2  # Radford et al. 2015
IMAGE_SHAPE = (1, 28, 28)


def register_model(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model family {name!r} registered twice")
        MODELS[name] = builder
        return builder

    return add


def build_models(cfg: "TrainConfig") -> tuple[nn.Module, nn.Module]:
    if cfg.model not in MODELS:
        raise KeyError(f"unknown model family {cfg.model!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[cfg.model](cfg)


def channels(base: int, width: float) -> int:
    return max(1, round(base * width))


def dcgan_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, DCGAN_INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, DCGAN_INIT_STD)
        nn.init.zeros_(module.bias)


class Logit(nn.Module):
    """Flatten D's (B, 1[, 1, 1]) output to (B,) logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0])


@register_model("mlp")
def mlp(cfg: "TrainConfig") -> tuple[nn.Module, nn.Module]:
    """Goodfellow-style MLP GAN: G latent->256->512->1024->784, D 784->512->256->1."""
    h = [channels(c, cfg.width) for c in (256, 512, 1024)]
    g = nn.Sequential(
        nn.Linear(cfg.latent_dim, h[0]), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(h[0], h[1]), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(h[1], h[2]), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(h[2], 784), nn.Tanh(),
        nn.Unflatten(1, IMAGE_SHAPE),
    )
    d = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, channels(512, cfg.width)), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(channels(512, cfg.width), channels(256, cfg.width)), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(channels(256, cfg.width), 1), Logit(),
    )
    return g, d


@register_model("dcgan")
def dcgan(cfg: "TrainConfig") -> tuple[nn.Module, nn.Module]:
    """pytorch/examples DCGAN resized for 28x28: ConvTranspose 7 -> 14 -> 28, conv D 28 -> 14 -> 7 -> 1."""
    c1, c2 = channels(256, cfg.width), channels(128, cfg.width)
    g = nn.Sequential(
        nn.Unflatten(1, (cfg.latent_dim, 1, 1)),
        nn.ConvTranspose2d(cfg.latent_dim, c1, 7, 1, 0, bias=False), nn.BatchNorm2d(c1), nn.ReLU(True),  # 7x7
        nn.ConvTranspose2d(c1, c2, 4, 2, 1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(True),  # 14x14
        nn.ConvTranspose2d(c2, 1, 4, 2, 1, bias=False), nn.Tanh(),  # 28x28
    )
    d1, d2 = channels(64, cfg.width), channels(128, cfg.width)
    d = nn.Sequential(
        nn.Conv2d(1, d1, 4, 2, 1, bias=False), nn.LeakyReLU(LEAKY_SLOPE, True),  # 14x14; no BN on D's input layer
        nn.Conv2d(d1, d2, 4, 2, 1, bias=False), nn.BatchNorm2d(d2), nn.LeakyReLU(LEAKY_SLOPE, True),  # 7x7
        nn.Conv2d(d2, 1, 7, 1, 0, bias=False), Logit(),
    )
    g.apply(dcgan_init)
    d.apply(dcgan_init)
    return g, d


@register_model("balanced")
def balanced(cfg: "TrainConfig") -> tuple[nn.Module, nn.Module]:
    """The TF-tutorial-style DCGAN with upsampling + conv G (no checkerboard from ConvTranspose).

    At latent 100, width 1: G has 1,649,089 parameters and D 373,761.
    """
    c1, c2, c3 = (channels(c, cfg.width) for c in (256, 128, 64))
    g = nn.Sequential(
        nn.Linear(cfg.latent_dim, 7 * 7 * c1, bias=False), nn.BatchNorm1d(7 * 7 * c1), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Unflatten(1, (c1, 7, 7)),
        nn.Upsample(scale_factor=2),  # 14x14
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Upsample(scale_factor=2),  # 28x28
        nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Conv2d(c3, 1, 3, padding=1), nn.Tanh(),
    )
    d1, d2, d3 = c3, c2, c1
    d = nn.Sequential(
        nn.Conv2d(1, d1, 3, 2, 1), nn.LeakyReLU(LEAKY_SLOPE),  # 14x14
        nn.Conv2d(d1, d2, 3, 2, 1), nn.LeakyReLU(LEAKY_SLOPE),  # 7x7
        nn.Conv2d(d2, d3, 3, 2, 1), nn.LeakyReLU(LEAKY_SLOPE),  # 4x4
        nn.Flatten(), nn.Linear(d3 * 4 * 4, 1), Logit(),
    )
    return g, d


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
