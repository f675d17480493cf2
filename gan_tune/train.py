"""`python -m gan_tune.train`: train one GAN and write a run folder (grids, history, plots, GIF, checkpoints)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from gan_tune.cli import CliParser
from gan_tune.quality.scorer import build_scorer
from gan_tune.training import checkpoint, config
from gan_tune.training.config import ConfigError, TrainConfig, device_available
from gan_tune.training.data import DataError
from gan_tune.training.run_folder import train_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.train", description="Train one GAN and write a run folder.")
    parser.add_argument("--config", help="YAML file of TrainConfig fields (defaults: the balanced recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set lr_d=1.0e-4 (repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder from its checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / checkpoint.FILE).is_file():
            raise ConfigError("--resume", f"{run_dir / checkpoint.FILE} not found: not a run folder with a checkpoint")
        if args.config:
            raise ConfigError("--config", "cannot be combined with --resume (the run folder holds its config)")
        cfg = config.load(run_dir / "config.yaml", args.overrides)
    else:
        cfg, run_dir = config.load(args.config, args.overrides), None
    if not device_available(cfg.device):  # a single run trains here; a search's trials may run elsewhere
        raise ConfigError("device", f"{cfg.device}: this machine has no such device (use auto or cpu)")
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, run_dir = resolve_config(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        run_dir = train_run(cfg, run_dir, build_scorer=build_scorer)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
