"""MNIST as one uint8 tensor that can live on the training device; batches are drawn by index.

Sources, best first:
- `mnist-train-60k`: the full training split through torchvision, when cached under `data_dir`
  or downloadable;
- `mnist-test-10k-bundled`: the canonical 10k test split (idx .gz files) shipped inside the package,
  so gan_tune works offline. MNIST is CC BY-SA 3.0, Y. LeCun and C. Cortes.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

FULL = "mnist-train-60k"
BUNDLED = "mnist-test-10k-bundled"
BUNDLED_FILES = {"images": "t10k-images-idx3-ubyte.gz", "labels": "t10k-labels-idx1-ubyte.gz"}
IDX_DTYPES = {0x08: torch.uint8}  # MNIST only uses unsigned bytes


class DataError(RuntimeError):
    """Missing, corrupt or truncated data; the message names the file."""


@dataclass(frozen=True)
class Mnist:
    images: Tensor  # (N, 28, 28) uint8, 0..255
    labels: Tensor  # (N,) int64
    source: str  # FULL or BUNDLED, recorded with every run

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> "Mnist":
        return Mnist(self.images.to(device), self.labels.to(device), self.source)


def read_idx(path: str | Path) -> Tensor:
    """Read an idx file (optionally gzipped): magic 0x0000<dtype><ndim>, big-endian dims, raw data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:  # gzip raises these for truncated or non-gzip input
        raise DataError(f"{path}: cannot read idx file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for d in dims:
        count *= d
    if len(raw) - header != count:
        raise DataError(f"{path}: expected {count} values for shape {dims}, found {len(raw) - header} (truncated or corrupt)")
    return torch.frombuffer(bytearray(raw[header:]), dtype=IDX_DTYPES[raw[2]]).reshape(dims)


def bundled_file(kind: str) -> Path:
    return Path(str(resources.files("gan_tune") / "assets" / BUNDLED_FILES[kind]))


def load_bundled() -> Mnist:
    images = read_idx(bundled_file("images"))
    labels = read_idx(bundled_file("labels")).long()
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{bundled_file('labels')}: {labels.shape[0]} labels for {images.shape[0]} images")
    return Mnist(images, labels, BUNDLED)


def load_full(data_dir: Path, download: bool) -> Mnist:
    """The 60k training split via torchvision (raises when neither cached nor downloadable)."""
    from torchvision.datasets import MNIST

    ds = MNIST(str(data_dir), train=True, download=download)
    return Mnist(ds.data.clone(), ds.targets.long().clone(), FULL)


def load_mnist(source: str = "auto", data_dir: str | Path = "~/.cache/gan_tune", subset: int = 0) -> Mnist:
    """The best available MNIST: full train split when cached or downloadable, else the bundled 10k."""
    data_dir = Path(data_dir).expanduser()
    if source == BUNDLED:
        data = load_bundled()
    elif source == FULL:
        try:
            data = load_full(data_dir, download=True)
        except Exception as err:  # offline: torchvision raises RuntimeError/URLError after trying its mirrors
            raise DataError(f"{data_dir}/MNIST: full MNIST is neither cached nor downloadable ({err}); "
                            f"use data_source: {BUNDLED}") from None
    else:
        data = _load_auto(data_dir)
    if subset:
        data = Mnist(data.images[:subset].clone(), data.labels[:subset].clone(), f"{data.source}[:{subset}]")
    return data


def _load_auto(data_dir: Path) -> Mnist:
    try:
        return load_full(data_dir, download=False)  # cached: no network needed
    except RuntimeError:
        pass
    try:
        return load_full(data_dir, download=True)
    except Exception:  # offline (URLError, timeouts, HTTP errors): the bundled split always works
        return load_bundled()


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [-1, 1], the range of G's tanh."""
    return images.unsqueeze(1).float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """float (B, 1, 28, 28) in [-1, 1] -> uint8 (B, 28, 28), the inverse of to_float (MNIST's own format)."""
    return images.detach().squeeze(1).add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def epoch_batches(n: int, batch_size: int, steps: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(steps, batch_size) image indices drawn on `device`: a fresh permutation per pass, no host sync."""
    per_pass = n // batch_size
    if per_pass == 0:
        raise DataError(f"data set of {n} images is smaller than one batch of {batch_size}")
    passes = -(-steps // per_pass)
    perms = [torch.randperm(n, device=device, generator=generator)[: per_pass * batch_size] for _ in range(passes)]
    return torch.cat(perms).view(-1, batch_size)[:steps]
