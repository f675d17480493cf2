"""One training run written to its folder: config, train.log, sample grids, checkpoints, history, plots, GIF.

`python -m gan_tune.train` resolves the config and calls `train_run`. The scorer is built by the caller's
`build_scorer` (quality.scorer's, for the command): training is the bottom layer and imports no quality.
"""

from __future__ import annotations

import functools
import logging
import sys
import uuid
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gan_tune.training import artifacts, checkpoint, config
from gan_tune.training.config import ConfigError, TrainConfig
from gan_tune.training.data import DataError, Mnist, load_mnist
from gan_tune.training.loop import (
    Scorer,
    due,
    fit,
    fixed_noise,
    generate,
    make_generator,
)
from gan_tune.training.step import Gan, make_gan, resolve_device

ScorerFactory = Callable[[TrainConfig, Mnist, torch.device], Scorer | None]  # quality.scorer.build_scorer


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


def train_run(cfg: TrainConfig, run_dir: Path | None = None, *, build_scorer: ScorerFactory) -> Path:
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
