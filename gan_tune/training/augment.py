"""Differentiable augmentation of every image D sees, real and generated (DiffAugment, Zhao et al. 2020), with
an optional adaptive probability in the spirit of ADA (Karras et al. 2020).

On a small set (the bundled 10k) D learns the training images by heart and its feedback to G turns to noise;
augmenting both sides, in the D and the G step alike, keeps D from memorising while G still learns the real
distribution, because the augmentations are differentiable and applied to G's images too.

Every op runs on the device with the run's generator and reads nothing on the host, so the step stays
capturable in a CUDA graph (tests/test_capture.py runs it).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

BACKGROUND = -1.0  # MNIST's background in [-1, 1]: translated digits move over it, not over grey
TRANSLATION_RATIO = 0.125  # DiffAugment's defaults: shifts up to 1/8 of the side ...
CUTOUT_RATIO = 0.5  # ... and one square of half the side cut out
# ADA: p may move from 0 to 1 within this many real images; its sign follows r_t - augment_target
ADA_SPEED_IMAGES = 500_000


def brightness(x: Tensor, gen: torch.Generator) -> Tensor:
    return x + (torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=gen) - 0.5)


def contrast(x: Tensor, gen: torch.Generator) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=gen) + 0.5) + mean


def color(x: Tensor, gen: torch.Generator) -> Tensor:
    """DiffAugment's color for one channel: brightness then contrast (saturation needs colour channels)."""
    return contrast(brightness(x, gen), gen)


def translation(x: Tensor, gen: torch.Generator) -> Tensor:
    """Each image shifted by up to TRANSLATION_RATIO of its side, the gap filled with background."""
    b, _, h, w = x.shape
    dy, dx = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    shift_y = torch.randint(-dy, dy + 1, (b, 1, 1), device=x.device, generator=gen)
    shift_x = torch.randint(-dx, dx + 1, (b, 1, 1), device=x.device, generator=gen)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    rows = (rows + shift_y + 1).clamp(0, h + 1)  # +1: index into the 1-pixel border of the padded image
    cols = (cols + shift_x + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1), value=BACKGROUND).permute(0, 2, 3, 1)  # (b, h+2, w+2, c)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2)  # integer gather: no host read


def cutout(x: Tensor, gen: torch.Generator) -> Tensor:
    """A square of CUTOUT_RATIO of the side set to 0 at a random place in each image (DiffAugment's cutout)."""
    b, _, h, w = x.shape
    size_y, size_x = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    top = torch.randint(0, h + (1 - size_y % 2), (b, 1, 1), device=x.device, generator=gen) - size_y // 2
    left = torch.randint(0, w + (1 - size_x % 2), (b, 1, 1), device=x.device, generator=gen) - size_x // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)
    return x * (~inside).unsqueeze(1).to(x.dtype)


OPS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "color": color, "translation": translation, "cutout": cutout,  # DiffAugment's order
}


def parse(text: str) -> tuple[str, ...]:
    """'none' or a comma-separated list of OPS names, in OPS's order; a ValueError names an unknown one."""
    if text.strip() == "none":
        return ()
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in OPS]
    if unknown or not names:
        raise ValueError(f"unknown augmentation {', '.join(unknown) or repr(text)} (known: none, {', '.join(OPS)})")
    return tuple(name for name in OPS if name in names)


def augment(x: Tensor, ops: tuple[str, ...], p: Tensor | None, gen: torch.Generator) -> Tensor:
    """`ops` applied to each image with probability `p` (a 0-dim device tensor; None: always)."""
    if not ops:
        return x
    out = x
    for name in ops:
        out = OPS[name](out, gen)
    if p is None:
        return out
    chosen = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=gen) < p
    return torch.where(chosen, out, x)


def adapt(p: Tensor, real_out: Tensor, threshold: float, target: float) -> None:
    """ADA's step, in place on the device: r_t = E[sign(D(real) - threshold)], D's confidence on the real
    images it trains on; above `target` D is overfitting and p rises, below it p falls, by at most
    batch / ADA_SPEED_IMAGES a step."""
    r_t = torch.sign(real_out.detach() - threshold).mean()
    p.add_(torch.sign(r_t - target) * (real_out.shape[0] / ADA_SPEED_IMAGES)).clamp_(0.0, 1.0)
