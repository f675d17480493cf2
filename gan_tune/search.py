"""`python -m gan_tune.search --space NAME`: run a Ray Tune study of a search space."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import ray
from ray import tune

from gan_tune.cli import CliParser, count_arg, duration_arg, finite_float, name_arg, positive_float, seed_arg
from gan_tune.tracking import store
from gan_tune.training.config import ConfigError, first_line
from gan_tune.training.data import DataError
from gan_tune.tuning import spaces
from gan_tune.tuning.cluster import check_local_cpus, check_local_gpus, start_ray
from gan_tune.tuning.space_files import known_spaces, load_plans
from gan_tune.tuning.study_storage import (
    DEFAULT_STORAGE,
    check_storage_uri,
    join_uri,
    read_saved_args,
    storage_failure,
    study_dir,
    study_fs,
    study_location,
    tune_storage,
)
from gan_tune.tuning.tuner import run


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m gan_tune.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", help="search-space name (see --list-spaces) or path to a YAML file")
    parser.add_argument("--list-spaces", action="store_true", help="list the known spaces and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="Tune's full console (a box per trial start and result) and Ray's info lines; "
                             "default: Tune's status table and one line per trial start, stop and error")
    parser.add_argument("--num-samples", type=count_arg(1), help="trials (default: the space's)")
    parser.add_argument("--max-epochs", type=count_arg(1), help="epochs per trial (default: the space's)")
    parser.add_argument("--time-budget", type=duration_arg,
                        help="wall-clock budget, e.g. 90s, 15m, 1h (default: the space's)")
    # 0 GPUs is valid (CPU-only trials); negative, nan or a share above 1 that is not whole are refused
    parser.add_argument("--gpus-per-trial", type=finite_float,
                        help="GPU share per trial (default: the space's, or 1 where the cluster has GPUs)")
    parser.add_argument("--cpus-per-trial", type=positive_float, help="CPUs per trial (default: the space's)")
    parser.add_argument("--address", help="join a running Ray cluster (e.g. auto, HOST:PORT); default: start one here")
    parser.add_argument("--storage-path", default=DEFAULT_STORAGE, help="results folder (default: ./ray_results)")
    parser.add_argument("--storage-is-shared", action="store_true",
                        help="the --storage-path folder is on a filesystem every node mounts (NFS); "
                             "needed for a local path on a multi-node cluster")
    parser.add_argument("--name", type=name_arg, help="study name (default: SPACE-YYYYmmdd-HHMMSS)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="seeds the search algorithm and the per-trial seeds")
    parser.add_argument("--resume", nargs="?", const="", metavar="PATH_OR_NAME",
                        help="continue an interrupted study: its folder, or its name under --storage-path "
                             "(default: --name); flags not given now are those the study started with")
    parser.add_argument("--restart-errored", action="store_true",
                        help="with --resume: run errored trials again from scratch (default: from their last "
                        "checkpoint)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///mlflow.db in the working directory)")
    parser.add_argument("--experiment", type=name_arg,
                        help=f"MLflow experiment name (default: {store.DEFAULT_EXPERIMENT})")
    return parser


def resume_args(args: argparse.Namespace) -> argparse.Namespace:
    """--resume PATH_OR_NAME: the study's location, found before Ray starts; flags not given now are the saved ones."""
    target = args.resume or args.name
    if not target:
        raise ConfigError("--resume", "needs the study's folder or name (or --name)")
    if Path(target).expanduser().is_file():
        raise ConfigError("--resume", f"{target}: a file, not a study folder")
    if "://" in target:
        location = join_uri(target)
        check_storage_uri(tune_storage(location)[0], "--resume")  # bad credentials fail here, not inside Tune
    else:
        folder = Path(target).expanduser()
        location = str(folder.resolve()) if folder.is_dir() else study_location(args.storage_path, target)
    study_fs(location, "--resume")  # a bad URI fails here with the flag named, not inside Tune
    try:
        restorable = tune.Tuner.can_restore(location)
    except OSError as err:  # the storage went away since the check
        raise ConfigError("--resume", f"{location}: {first_line(err)}") from None
    if not restorable:
        raise ConfigError("--resume", f"{location} holds no study to continue")
    defaults = vars(build_parser().parse_args([]))
    given = {key: value for key, value in vars(args).items() if value != defaults[key]}
    storage_path, name = tune_storage(location)
    return argparse.Namespace(**{**defaults, **read_saved_args(location, defaults), **given,
                                 "name": name, "storage_path": storage_path})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_spaces:
            return list_spaces()
        if args.resume is not None:
            args = resume_args(args)
        plans = load_plans(args)
        location = study_dir(args, plans[False].name)
        check_local_gpus(args)
        check_local_cpus(plans, args)
        args.tracking_uri = store.resolve_tracking_uri(args.tracking_uri)
        store.check_tracking(args.tracking_uri)  # an unusable store fails here, before Ray starts
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = start_ray(args.address, args.verbose)
    try:
        return run(plans, args, location)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # storage that failed mid-study (an S3 server gone): what reached it is kept
        print(f"error: {storage_failure(location, err)}", file=sys.stderr)
        return 1
    finally:
        if started:
            ray.shutdown()


def list_spaces() -> int:
    for name, path in known_spaces().items():
        space = spaces.load_space(path)
        shape = f"{space.num_samples or 'budget'} x {'budget' if space.epochs_until_budget else space.max_epochs} " \
                f"epochs, {space.scheduler['type']}"
        print(f"{name:9} {shape:24} {textwrap.shorten(space.description, 64)}  [{path}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
