"""`python -m gan_tune.metrics score|baselines`: score images, or print the baseline table."""

from __future__ import annotations

import argparse
import sys

import torch

from gan_tune.cli import CliParser, count_arg, device_arg
from gan_tune.quality.baselines import BASELINE_REFERENCE, baseline_table, format_table
from gan_tune.quality.mnist_classifier import ClassifierError
from gan_tune.quality.scorer import CPU_FID_SAMPLES, make_scorer
from gan_tune.training import checkpoint
from gan_tune.training.config import ConfigError
from gan_tune.training.data import BUNDLED, DataError, load_mnist


def score_command(args: argparse.Namespace) -> int:
    g, cfg, saved = checkpoint.load_generator(args.path)  # DataError naming a missing or unreadable file
    path = checkpoint.path_of(args.path)
    device = torch.device(args.device)
    try:
        data = load_mnist(cfg.data_source, cfg.data_dir, cfg.subset)
    except RuntimeError as err:  # torchvision's download failure for mnist-train-60k
        raise DataError(f"{cfg.data_dir}: cannot load {cfg.data_source} for {path} ({err})") from None
    scores = make_scorer(data, device, args.n)(g.to(device), cfg.latent_dim)
    print(f"{path}: epoch {saved['epoch']}, real statistics from {data.source}")
    print(format_table({cfg.name: scores}))
    return 0


def baselines_command(args: argparse.Namespace) -> int:
    rows = baseline_table(args.n, torch.device(args.device))
    print(f"reference statistics: {BUNDLED}, a random half ({BASELINE_REFERENCE} images); "
          f"each set: {args.n} images built from the other half")
    print(format_table(rows))
    return 0


def baseline_count(text: str) -> int:
    value = int(text)
    if not 2 <= value <= BASELINE_REFERENCE:
        raise argparse.ArgumentTypeError(f"must be in [2, {BASELINE_REFERENCE}] (the held-out half), got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="metrics of a trained generator")
    score.add_argument("path", help="a run directory (holding checkpoint.pt) or a checkpoint file")
    score.add_argument("--n", type=count_arg(2, off=True), default=0,  # 1 sample has no covariance
                       help="generated images; 0: 10k on cuda, 2k on cpu")
    score.set_defaults(run=score_command)
    baselines = sub.add_parser("baselines", help="reference table: what good and bad scores look like")
    baselines.add_argument("--n", type=baseline_count, default=CPU_FID_SAMPLES,
                           help=f"images per set, at most the {BASELINE_REFERENCE} held-out images")
    baselines.set_defaults(run=baselines_command)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, DataError, ClassifierError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
