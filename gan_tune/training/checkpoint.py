"""The checkpoint format: one file, FILE, holding everything a run needs to continue exactly.

A single run keeps it in its run folder; a Ray Tune trial in each `checkpoint_NNNNNN/` folder Tune makes.
This module owns the file's name and keys, writing it atomically, reading it (a bad file is a DataError
naming it), restoring a `step.Gan` from it and rebuilding its generator alone (for scoring and MLflow).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from gan_tune.training import config
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import DataError
from gan_tune.training.models import build_models

if TYPE_CHECKING:  # train imports this module; the Gan type is only needed for annotations
    from gan_tune.training.step import Gan

FILE = "checkpoint.pt"
REQUIRED_KEYS = ("config", "epoch", "g")  # what rebuilding a generator needs; resuming needs all of state()'s


def state(gan: Gan, epoch: int, noise: Tensor, generator: torch.Generator, history: list[dict],
          trial_id: str = "") -> dict:
    """Everything a resumed run needs to continue exactly: weights, optimisers, epoch, RNG, noise.

    With g_ema on it also holds "g_ema", the averaged G with its recomputed BatchNorm statistics: the
    generator that rebuild_generator exports. `trial_id` names the Tune trial that saved it, so a restore
    can tell its own from a PBT donor's."""
    averaged = {} if gan.g_ema is None else {"g_ema": gan.eval_generator().state_dict(),
                                             "g_ema_updates": int(gan.g_ema_updates.item())}
    return {
        "config": gan.cfg.to_dict(),
        "epoch": epoch,
        "g": gan.g.state_dict(),
        "d": gan.d.state_dict(),
        "opt_g": gan.opt_g.state_dict(),
        "opt_d": gan.opt_d.state_dict(),
        "fixed_noise": noise.cpu(),
        "generator_state": generator.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "history": history,
        "trial_id": trial_id,
        **averaged,
        **({} if gan.augment_p is None else {"augment_p": gan.augment_p.item()}),
    }


def write(saved: dict, folder: str | Path, name: str = FILE) -> Path:
    """FILE (or `name`) in `folder`, through a temporary file and os.replace: a crash never leaves half a checkpoint."""
    path = Path(folder) / name
    tmp = path.with_name(f"{name}.tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)
    return path


def path_of(file_or_folder: str | Path) -> Path:
    """The checkpoint file itself, or FILE inside a run or checkpoint folder."""
    path = Path(file_or_folder)
    return path / FILE if path.is_dir() else path


def read(file_or_folder: str | Path, device: torch.device | str = "cpu") -> dict:
    """A saved state; a missing, truncated or foreign file is a DataError naming it."""
    path = path_of(file_or_folder)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:  # torch.load's own on bad bytes
        raise DataError(f"{path}: unreadable checkpoint ({config.first_line(err)})") from None
    except Exception as err:  # foreign bytes reach the unpickler, which raises anything (KeyError for a text file)
        raise DataError(f"{path}: unreadable checkpoint (not a torch file: {type(err).__name__} while unpickling)") \
            from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; not a gan_tune checkpoint")
    return saved


def restore(gan: Gan, saved: dict, generator: torch.Generator) -> tuple[int, Tensor, list[dict]]:
    """Load `saved` into `gan` and `generator`; returns (epochs done, fixed noise, history).

    The rates come from gan.cfg, not the saved optimisers: after a PBT exploit those carry the donor's
    rates, and without this write PBT's explore step would change nothing (Ray's pbt_dcgan_mnist does the same).
    """
    gan.g.load_state_dict(saved["g"])
    gan.d.load_state_dict(saved["d"])
    if gan.g_ema is not None:  # a checkpoint saved with g_ema off: the average starts from its G, as a fresh run's does
        gan.g_ema.load_state_dict(saved["g_ema"] if "g_ema" in saved else saved["g"])
        gan.g_ema_updates.fill_(saved.get("g_ema_updates", 0))  # the warm-up goes on where it was
        gan.g_ema_bn_fresh = False
    if gan.augment_p is not None and "augment_p" in saved:  # an adaptive p goes on where it was
        gan.augment_p.fill_(saved["augment_p"])
    gan.opt_g.load_state_dict(saved["opt_g"])
    gan.opt_d.load_state_dict(saved["opt_d"])
    generator.set_state(saved["generator_state"])
    torch.set_rng_state(saved["torch_rng_state"])
    for optimiser, lr in ((gan.opt_d, gan.cfg.lr_d), (gan.opt_g, gan.cfg.lr_g)):
        for group in optimiser.param_groups:
            group["lr"] = lr
    return saved["epoch"], saved["fixed_noise"].to(gan.device), list(saved["history"])


def rebuild_generator(saved: dict, where: str) -> tuple[nn.Module, TrainConfig]:
    """The generator (CPU, eval mode) and config of a saved state: the averaged G when the state has one
    (Gan.eval_generator's, what the run scored), else G. Weights that do not fit name `where`."""
    cfg = config.from_dict(saved["config"], where=where)
    g, _ = build_models(cfg)
    try:
        g.load_state_dict(saved["g_ema"] if "g_ema" in saved else saved["g"])
    except RuntimeError as err:
        raise DataError(f"{where}: generator weights do not fit the config ({str(err).splitlines()[0]})") from None
    return g.eval(), cfg


def load_generator(file_or_folder: str | Path) -> tuple[nn.Module, TrainConfig, dict]:
    """(generator in eval mode on the CPU, its config, the saved state) from a checkpoint file or folder."""
    saved = read(file_or_folder)
    g, cfg = rebuild_generator(saved, where=str(path_of(file_or_folder)))
    return g, cfg, saved
