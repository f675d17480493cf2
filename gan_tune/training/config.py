"""TrainConfig: every setting of one GAN run, loaded from YAML, overridden with --set, validated.

One dataclass is the single source of truth: the single-run CLI, the Ray Tune trainable (which turns a
trial's config dict into a TrainConfig once) and the search spaces all name these fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from gan_tune.training import augment
from gan_tune.training.losses import LOSSES
from gan_tune.training.models import (  # models types its settings with a Protocol: no import back
    D_NORMS,
    MODELS,
)

# Balanced-DCGAN recipe (TF DCGAN tutorial lineage): D learns twice as fast as G, Adam beta1 0.5.
DEFAULT_LR_D = 2.0e-4
DEFAULT_LR_G = 1.0e-4
PRECISIONS = ("fp32", "bf16")
DATA_SOURCES = ("auto", "mnist-train-60k", "mnist-test-10k-bundled")
# D accuracy bands of the balanced recipe: 40-70 % healthy, < 30 % or > 80 % worth a warning.
BALANCED_BAND = (0.40, 0.70)
WARN_BELOW, WARN_ABOVE = 0.30, 0.80
SEED_MAX = 2**32 - 1  # numpy's seed range is [0, 2**32 - 1]; the search seeds its generators with it
# The largest count (trials, epochs, samples, seeds...) any flag or field takes: beyond it a run never ends in any
# budget, and a 20-digit count hung a search before its first trial
MAX_COUNT = 100_000
# Upper bounds where a huge value is a typo that would hang, exhaust memory or crash torch with a traceback
UPPER_BOUNDS: dict[str, float] = {
    "max_epochs": MAX_COUNT,
    "latent_dim": 4096,  # MNIST GANs use 32-128; G's first layer grows with it
    "batch_size": 60_000,  # full MNIST's size: a larger batch never fills
    "width": 16.0,  # channel multiplier: parameters grow with its square (16: 256x the default model)
    "n_disc": 100,  # WGAN's 5 is the most any recipe uses
    "r1_every": 1_000,  # StyleGAN2 uses 16; a huge interval is one enormous penalty on the first iteration
    "steps_per_epoch": 1_000_000,
    "fid_samples": MAX_COUNT,  # FID-50k is the largest customary count
}


class ConfigError(ValueError):
    """A bad setting. `where` is the file or flag it came from, `key` the offending field."""

    def __init__(self, key: str, msg: str, where: str | None = None):
        self.key, self.msg, self.where = key, msg, where
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.key}: {self.msg}"


def first_line(err: BaseException) -> str:
    """An exception as one line of an error message (its message's first line, or its type)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_writable(folder: Path) -> None:
    """OSError unless a file can be made in `folder`. Only trying tells: os.access says yes to root under /proc and
    on a read-only mount. So the missing folders are made, a probe file is made in the deepest, and all of them are
    removed again: nothing stays behind."""
    folder = folder.expanduser().absolute()
    missing = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".gan_tune-probe-")
        os.close(handle)
        os.unlink(probe)
    finally:
        for made in missing:
            with contextlib.suppress(OSError):  # never made, or someone else put a file in it meanwhile
                made.rmdir()


def device_available(name: str) -> bool:
    """Whether a device name (TrainConfig.device's form) exists on this machine; auto always does."""
    import torch  # late: reading a config needs no torch

    kind, _, index = name.partition(":")
    if kind == "cuda":
        return torch.cuda.device_count() > int(index or 0)
    if kind == "mps":
        return torch.backends.mps.is_available()
    return True


@dataclass
class TrainConfig:
    name: str = "run"
    model: str = "balanced"  # a key of training.models.MODELS
    latent_dim: int = 100
    width: float = 1.0  # channel multiplier; 0.25 makes the balanced model ~16x cheaper on a CPU
    batch_size: int = 128
    lr_d: float = DEFAULT_LR_D
    lr_g: float = DEFAULT_LR_G
    beta1: float = 0.5  # Radford et al. 2015: 0.9 oscillates in GANs
    beta2: float = 0.999
    n_disc: int = 1  # D steps per G step
    label_smoothing: float = 0.0  # one-sided (Salimans et al. 2016): real target = 1 - label_smoothing
    # losses and regularisation (README: Losses and regularisation)
    loss: str = "ns"  # a key of training.losses.LOSSES; ns: the non-saturating BCE loss of Goodfellow et al. 2014
    gp_weight: float = 10.0  # wgan-gp only: lambda of Gulrajani et al. 2017
    d_norm: str = "batch"  # a key of training.models.D_NORMS; batch: the family's own D (BatchNorm where it has it)
    r1_gamma: float = 0.0  # R1 penalty gamma/2 * E||grad D(real)||^2 on every D step (Mescheder et al. 2018); 0 = off
    # lazy R1 (Karras et al. 2020, StyleGAN2): the penalty only in every r1_every-th iteration of an epoch, times
    # r1_every, so its average weight stays; its double backward is then paid once per r1_every iterations
    r1_every: int = 1
    g_ema: float = 0.0  # decay of the moving average of G's weights that is scored and exported; 0 = off
    # DiffAugment on every image D sees, real and generated (README: Losses and regularisation): none, or a
    # comma-separated list of color, translation, cutout
    augment: str = "none"
    augment_p: float = 1.0  # the chance an image is augmented; with augment_target > 0, where the adaptive p starts
    augment_target: float = 0.0  # ADA: > 0 moves p so E[sign(D(real))] stays near it (the paper: 0.6); 0 = fixed p
    max_epochs: int = 20
    steps_per_epoch: int = 0  # 0: one pass over the data (len(data) // batch_size D steps)
    seed: int = 0
    # data
    data_source: str = "auto"  # auto: full MNIST when cached or downloadable, else the bundled 10k split
    data_dir: str = "~/.cache/gan_tune"
    subset: int = 0  # first N images; 0 = all
    # device and speed
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: str = "fp32"
    cuda_graph: bool = True  # only used on CUDA; eager elsewhere
    # evaluation and outputs
    eval_every: int = 1  # epochs between quality scores (fid, is, coverage)
    fid_samples: int = 0  # 0: scale with the device (10k on GPU, 2k on CPU)
    sample_every: int = 1  # epochs between fixed-noise sample grids
    checkpoint_every: int = 1
    # > 0: a checkpoint when this many seconds passed since the last one (and at the end) instead of every
    # checkpoint_every epochs: a GPU epoch of the bundled 10k takes a fraction of a second, a checkpoint not
    checkpoint_every_s: float = 0.0
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("model", self.model in MODELS, f"unknown model family {self.model!r} (known: {', '.join(sorted(MODELS))})"),
            ("seed", 0 <= self.seed <= SEED_MAX, f"must be in [0, {SEED_MAX}]"),
            ("latent_dim", self.latent_dim > 0, "must be > 0"),
            ("width", math.isfinite(self.width) and self.width > 0, "must be > 0"),
            ("batch_size", self.batch_size > 0, "must be > 0"),
            ("lr_d", math.isfinite(self.lr_d) and self.lr_d > 0, "must be > 0"),
            ("lr_g", math.isfinite(self.lr_g) and self.lr_g > 0, "must be > 0"),
            ("beta1", 0.0 <= self.beta1 < 1.0, "must be in [0, 1)"),
            ("beta2", 0.0 <= self.beta2 < 1.0, "must be in [0, 1)"),
            ("n_disc", self.n_disc >= 1, "must be >= 1"),
            ("label_smoothing", 0.0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"),
            ("loss", self.loss in LOSSES, f"unknown loss {self.loss!r} (known: {', '.join(sorted(LOSSES))})"),
            ("label_smoothing", self.label_smoothing == 0 or self.loss not in LOSSES or LOSSES[self.loss].uses_labels,
             f"must be 0 with loss {self.loss} (it has no real/fake labels to smooth)"),
            ("gp_weight", math.isfinite(self.gp_weight) and self.gp_weight >= 0, "must be >= 0"),
            ("d_norm", self.d_norm in D_NORMS, f"unknown d_norm {self.d_norm!r} (known: {', '.join(sorted(D_NORMS))})"),
            ("d_norm", not (self.loss == "wgan-gp" and self.d_norm == "batch"),
             "batch cannot go with loss wgan-gp: its gradient penalty is per image, and BatchNorm mixes the images "
             "of a batch (use spectral or none)"),
            ("r1_gamma", math.isfinite(self.r1_gamma) and self.r1_gamma >= 0, "must be >= 0 (0 = off)"),
            ("r1_every", self.r1_every >= 1, "must be >= 1 (1 = every D step)"),
            ("g_ema", 0.0 <= self.g_ema < 1.0, "must be in [0, 1) (0 = off)"),
            ("augment", augment_error(self.augment) is None, augment_error(self.augment) or ""),
            ("augment_p", 0.0 <= self.augment_p <= 1.0, "must be in [0, 1]"),
            ("augment_target", 0.0 <= self.augment_target < 1.0, "must be in [0, 1) (0 = a fixed augment_p)"),
            ("augment_target", self.augment_target == 0 or self.augment != "none",
             "needs augment (an adaptive probability of no augmentation does nothing)"),
            ("max_epochs", self.max_epochs >= 1, "must be >= 1"),
            ("steps_per_epoch", self.steps_per_epoch >= 0, "must be >= 0"),
            ("subset", self.subset >= 0, "must be >= 0"),
            ("subset", self.subset == 0 or self.subset >= self.batch_size,
             f"{self.subset} images are fewer than one batch of {self.batch_size} (0 = all)"),
            ("data_source", self.data_source in DATA_SOURCES, f"must be one of {', '.join(DATA_SOURCES)}"),
            # auto would otherwise fail to cache full MNIST there and quietly train on the bundled 10k instead
            ("data_dir", not self.data_path.is_file(), f"{self.data_dir} is a file, not the folder MNIST is cached in"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
            ("device", re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
             "must be auto, cpu, mps or cuda[:N]"),
            ("eval_every", self.eval_every >= 0, "must be >= 0 (0 = never)"),
            ("fid_samples", self.fid_samples == 0 or self.fid_samples >= 2,
             "must be 0 (the device default) or >= 2 (one sample has no covariance)"),
            ("sample_every", self.sample_every >= 1, "must be >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, "must be >= 1"),
            ("checkpoint_every_s", math.isfinite(self.checkpoint_every_s) and self.checkpoint_every_s >= 0,
             "must be >= 0 (0 = every checkpoint_every epochs)"),
        ]
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(key, msg)
        for key, top in UPPER_BOUNDS.items():
            if getattr(self, key) > top:
                raise ConfigError(key, f"{getattr(self, key)} is more than {top:,} (absurdly large)")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def augment_error(text: str) -> str | None:
    try:
        augment.parse(text)
    except ValueError as err:
        return str(err)
    return None


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_PY_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def coerce(key: str, value: Any) -> Any:
    """Check `value` has the declared type of field `key` (ints are accepted for floats)."""
    if key not in FIELD_TYPES:
        raise ConfigError(key, f"unknown key (known: {', '.join(FIELD_TYPES)})")
    want = _PY_TYPES[FIELD_TYPES[key]]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)  # Tune's quantised samplers hand back 64.0
    if type(value) is not want:
        raise ConfigError(key, f"expected {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(values: dict[str, Any], where: str | None = None) -> TrainConfig:
    """Build a TrainConfig; any error names `where` (a file or flag) and the key."""
    try:
        return TrainConfig(**{key: coerce(key, value) for key, value in values.items()})
    except ConfigError as err:
        err.where = where
        raise


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from --set; the value is parsed as YAML so 1.0e-4, 64 and true get their types."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(text, "expected key=value", where="--set")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(key.strip(), f"malformed YAML value {raw!r} ({yaml_problem(err)})", where="--set") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    return getattr(err, "problem", None) or str(err).splitlines()[0]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; a missing file or a syntax error names the file (and the line)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError("path", "a folder, not a file", where=str(path))
    if not path.is_file():
        raise ConfigError("path", "file not found", where=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"byte {err.start}", "not UTF-8 text (save the file as UTF-8)", where=str(path)) from None
    except OSError as err:
        raise ConfigError("path", f"unreadable ({err.strerror or type(err).__name__})", where=str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark else "yaml"
        raise ConfigError(line, f"malformed YAML: {yaml_problem(err)}", where=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("top level", "expected a mapping of key: value", where=str(path))
    return data


def load(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Config from an optional YAML file, then `--set key=value` overrides on top.

    The overrides are checked together, once all are applied: `--set loss=wgan-gp --set d_norm=none`
    must not fail on the combination in between."""
    values = read_yaml(path) if path else {}
    cfg = from_dict(values, where=str(path) if path else None)
    if not overrides:
        return cfg
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return from_dict(values, where="--set")


def save(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


@dataclass(frozen=True)
class Derived:
    """A search key that is not a TrainConfig field: a trial's config turns it into `target`."""

    target: str  # the field it sets
    inputs: tuple[str, ...]  # the fields it reads, besides itself
    compute: Callable[[dict[str, Any]], Any]


DERIVED_PARAMS: dict[str, Derived] = {
    # TTUR (Heusel et al. 2017) searches G's rate and how much faster D learns: lr_d = lr_g * lr_ratio
    "lr_ratio": Derived("lr_d", ("lr_g",), lambda c: c["lr_g"] * c["lr_ratio"]),
}


def resolve_derived(values: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields only: each derived param is replaced by the field it sets."""
    fields_only = {key: value for key, value in values.items() if key not in DERIVED_PARAMS}
    for name, derived in DERIVED_PARAMS.items():
        if name in values:
            fields_only[derived.target] = derived.compute(values)
    return fields_only
