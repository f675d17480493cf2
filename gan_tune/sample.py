"""CLI: `python -m gan_tune.sample --run-id ID [-n 64] [--out grid.png] [--tracking-uri URI]` (or `--model-uri URI`).

Loads the generator a search logged on its parent run (`tracking.parent_run.finish_search_run`) with
`mlflow.pytorch.load_model` (`tracking.logged_model`) and writes `n` samples: a grid (`.png`,
`artifacts.save_grid`), or the raw images for scoring with other tools, as MNIST's own format (uint8,
N x 28 x 28): `.npy` holds the array, `.npz` the array as `images` beside the `seed` and `model_uri` that
made it. No gan_tune model code is needed to load the generator: the model is a torch.export program (pt2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from gan_tune.cli import CliParser, count_arg, out_file, seed_arg
from gan_tune.tracking.logged_model import (
    latent_size,
    load_generator,
    model_uri_of_run,
    sample,
)
from gan_tune.tracking.store import (
    open_client,
    resolve_tracking_uri,
    store_errors,
    using_tracking_uri,
)
from gan_tune.training import artifacts
from gan_tune.training.config import ConfigError, first_line
from gan_tune.training.data import to_uint8

OUT_FORMATS = (".png", ".npy", ".npz")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.sample", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="a search's parent run id (the run the generator was logged on)")
    which.add_argument("--model-uri", help="any MLflow model URI, e.g. models:/m-... or runs:/ID/generator")
    parser.add_argument("-n", type=count_arg(1), default=64, help="number of samples (default 64: one 8x8 grid)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="seed of the latent noise")
    parser.add_argument("--out", default="grid.png", type=out_file(*OUT_FORMATS),
                        help="a .png grid (default grid.png), or the raw uint8 images as .npy, or .npz with the seed")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    return parser.parse_args(argv)


def check_out(out: str) -> None:
    """Before any model loads: the folder must exist (its format and place were checked by the parser)."""
    path = Path(out)
    if not path.parent.is_dir():
        raise ConfigError("--out", f"{out}: {path.parent} is not a folder")


def save(images: torch.Tensor, out: str, seed: int, model_uri: str) -> str:
    """A grid for .png; uint8 (N, 28, 28) arrays for .npy / .npz (with the seed and model URI)."""
    suffix = Path(out).suffix.lower()
    try:
        if suffix == ".npy":
            np.save(out, to_uint8(images).numpy())
        elif suffix == ".npz":
            np.savez_compressed(out, images=to_uint8(images).numpy(), seed=np.int64(seed), model_uri=np.str_(model_uri))
        else:
            artifacts.save_grid(images, out)
    except (OSError, ValueError) as err:  # PIL's ValueError: an extension it cannot write
        raise ConfigError("--out", f"{out}: cannot write it ({first_line(err)})") from None
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_out(args.out)
        uri = resolve_tracking_uri(args.tracking_uri)
        with store_errors(uri):
            client = open_client(uri)
            model_uri = args.model_uri or model_uri_of_run(client, args.run_id)
            with using_tracking_uri(uri):  # load_model resolves models:/ through the global URI
                images = sample(load_generator(model_uri), latent_size(model_uri), args.n, args.seed)
        path = save(images, args.out, args.seed, model_uri)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(images)} samples from {model_uri}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
