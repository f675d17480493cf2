"""Model families behind a registry: each builder turns a TrainConfig into (generator, discriminator).

Generators map (B, latent_dim) noise to (B, 1, 28, 28) images in [-1, 1]; discriminators return one
raw output per image, shape (B,), which the loss family reads (training.losses; a logit for the default
BCE-with-logits loss, never Sigmoid + BCELoss). `d_norm` then sets D's normalisation (D_NORMS).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn


class ModelSettings(Protocol):
    """The TrainConfig fields a builder reads (config imports this module to validate names, not the reverse)."""

    model: str
    latent_dim: int
    width: float
    d_norm: str


Builder = Callable[[ModelSettings], tuple[nn.Module, nn.Module]]
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


def build_models(cfg: ModelSettings) -> tuple[nn.Module, nn.Module]:
    if cfg.model not in MODELS:
        raise KeyError(f"unknown model family {cfg.model!r} (known: {', '.join(sorted(MODELS))})")
    g, d = MODELS[cfg.model](cfg)
    return g, D_NORMS[cfg.d_norm](d)


def drop_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced by Identity, in place (a family without any is unchanged)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            drop_batch_norm(child)
    return module


def spectral(d: nn.Module) -> nn.Module:
    """Miyato et al. 2018: every conv/linear weight divided by its largest singular value (of the weight
    reshaped to (out, -1), estimated by one power iteration per training forward); BatchNorm dropped."""
    d = drop_batch_norm(d)
    for layer in list(d.modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(layer)
    return d


# What D's normalisation layers are: the family's own (BatchNorm where it has it), spectral norm, or none.
D_NORMS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "batch": lambda d: d,
    "spectral": spectral,
    "none": drop_batch_norm,
}


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
def mlp(cfg: ModelSettings) -> tuple[nn.Module, nn.Module]:
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
def dcgan(cfg: ModelSettings) -> tuple[nn.Module, nn.Module]:
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
def balanced(cfg: ModelSettings) -> tuple[nn.Module, nn.Module]:
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


class NearestUpConv(nn.Module):
    """Inference stand-in for Upsample(x2, nearest) -> Conv2d(3x3, stride 1, padding 1), same outputs.

    Each output pixel of the pair sees only a 2x2 patch of distinct input pixels, so the pair is four
    2x2 convolutions at the input's resolution (one per output phase), interleaved: 4/9 of the
    multiply-adds, and no upsampled tensor. Scoring the balanced G on 10k samples on a 2-core CPU goes
    from ~34 s to ~13 s with it (quality.scorer.scoring_copy). Phase 0 of a row reads input rows (i-1, i)
    with kernel rows (w0, w1 + w2); phase 1 reads rows (i, i+1) with (w0 + w1, w2); columns alike.
    """

    PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.out_channels = conv.out_channels
        weight = torch.cat([fold_phase(fold_phase(conv.weight.detach(), 2, a), 3, b) for a, b in self.PHASES])
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().repeat(len(self.PHASES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        c = self.out_channels
        y = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias)  # (n, 4c, h+1, w+1)
        out = torch.empty((n, c, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
        for p, (a, b) in enumerate(self.PHASES):
            out[:, :, a::2, b::2] = y[:, p * c:(p + 1) * c, a:a + h, b:b + w]
        return out


def fold_phase(weight: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    """3 kernel taps along `dim` -> the 2 that one phase of a nearest-upsampled input sees."""
    k0, k1, k2 = weight.unbind(dim)
    return torch.stack((k0, k1 + k2) if phase == 0 else (k0 + k1, k2), dim)


def upsample_conv_pair(up: nn.Module, conv: nn.Module) -> bool:
    return (isinstance(up, nn.Upsample) and up.mode == "nearest" and up.size is None
            and up.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0))
            and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def fuse_upsample_conv(model: nn.Module) -> nn.Module:
    """An nn.Sequential with every Upsample(x2) -> Conv2d(3x3) pair replaced by NearestUpConv (inference only)."""
    if not isinstance(model, nn.Sequential):
        return model
    layers: list[nn.Module] = []
    for layer in model:
        if layers and upsample_conv_pair(layers[-1], layer):
            layers[-1] = NearestUpConv(layer)
        else:
            layers.append(layer)
    return nn.Sequential(*layers).train(model.training)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
