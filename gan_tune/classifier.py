"""`python -m gan_tune.classifier train`: retrain the bundled MNIST classifier."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gan_tune.cli import CliParser, count_arg, device_arg, data_folder, out_file, seed_arg
from gan_tune.quality.mnist_classifier import (
    FEATURE_DIM,
    WEIGHTS_FILE,
    ClassifierError,
    accuracy,
    asset_path,
    save_classifier,
    sidecar_path,
    split,
    train_classifier,
)
from gan_tune.training.data import BUNDLED, FULL, DataError


def train_command(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    train, held_out, train_name = split(args.data_source, args.data_dir)
    print(f"training on {train_name} ({len(train)} images); held out: {held_out.source} ({len(held_out)} images)")
    start = time.perf_counter()
    model = train_classifier(train, args.epochs, args.seed, device)
    acc = accuracy(model, held_out, device)
    info = save_classifier(model, Path(args.out), {
        "train_data": train_name,
        "train_images": len(train),
        "held_out": held_out.source,
        "held_out_images": len(held_out),
        "held_out_accuracy": acc,
        "epochs": args.epochs,
        "seed": args.seed,
        "feature_dim": FEATURE_DIM,
        "device": str(device),
        "train_time_s": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "command": f"python -m gan_tune.classifier train --data-source {args.data_source} "
                   f"--epochs {args.epochs} --seed {args.seed}",
    })
    print(f"held-out accuracy {acc:.4f}; wrote {args.out} (sha256 {info['sha256'][:12]}...) and "
          f"{sidecar_path(Path(args.out)).name}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.classifier", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the classifier and write weights + sidecar")
    train.add_argument("--data-source", default="auto", choices=("auto", FULL, BUNDLED))
    train.add_argument("--data-dir", default="~/.cache/gan_tune", type=data_folder)  # MNIST is downloaded into it
    train.add_argument("--epochs", type=count_arg(1), default=10)
    train.add_argument("--seed", type=seed_arg, default=0)
    train.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--out", default=str(asset_path(WEIGHTS_FILE)), type=out_file(".pt"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train_command(args)
    except (DataError, ClassifierError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
