"""CLI: `python -m gan_tune.search --space NAME` runs a Ray Tune study of a search space and writes the
best trial's config as best_config.yaml, which `python -m gan_tune.train --config` accepts.

Flow: parse -> load and validate the space (exit 2 before Ray starts) -> start or join Ray -> detect GPUs
and pick resources (no GPU: the space's `cpu:` block) -> print the plan -> load MNIST once -> Tuner.fit
-> print the best trial, its folder and why trials were stopped -> write best_config.yaml.
Results go to --storage-path (default ./ray_results, next to the runs/ folder of gan_tune.train), a local
folder or a URI such as s3://BUCKET/PATH; the study's location is kept as a string so that a URI stays one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shlex
import socket
import sys
import tempfile
import textwrap
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import ray
import torch
import yaml
from ray import tune
from ray.tune.result import TRAINING_ITERATION

from gan_tune import console, finalists, search_run, spaces, tracking_store, trial_runs
from gan_tune.config import CliParser, ConfigError, device_available, from_dict, resolve_derived, seed_arg
from gan_tune.data import DataError, Mnist, load_mnist
from gan_tune.finalists import Finalist
from gan_tune.spaces import Space
from gan_tune.stopping import FailingTrials, GanStopper
from gan_tune.tracking_store import first_line
from gan_tune.trainable import train_gan

DEFAULT_STORAGE = "ray_results"
DEFAULT_GPU_SHARE = 0.25  # four trials share a GPU: one small GAN leaves most of it idle
MAX_FAILURES = 2  # a crashed trial restarts from its last checkpoint twice before it counts as errored
# Checkpoints kept per trial, best by the metric (the latest ones under PBT, see checkpoint_config).
CHECKPOINTS_KEPT = 4
BEST_CONFIG = "best_config.yaml"
SAVED_ARGS = "gan_tune_search.json"  # the resolved flags of a study, for --resume
STORAGE_PROBE = ".gan_tune_write_check"  # written and removed under a storage URI before Ray starts
ADDRESS_CHECK_TIMEOUT_S = 3.0  # a live Ray head accepts at once; ray.init itself retries a dead one for minutes
PENDING_ENV = "TUNE_MAX_PENDING_TRIALS_PG"
SUMMARY_METRICS = ("fid", "is", "coverage", "d_acc", "loss_d", "loss_g", "balance", "epoch")


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m gan_tune.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", help="search-space name (see --list-spaces) or path to a YAML file")
    parser.add_argument("--list-spaces", action="store_true", help="list the known spaces and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="Tune's full console (a box per trial start and result) and Ray's info lines; "
                             "default: Tune's status table and one line per trial start, stop and error")
    parser.add_argument("--num-samples", type=int, help="trials (default: the space's)")
    parser.add_argument("--max-epochs", type=int, help="epochs per trial (default: the space's)")
    parser.add_argument("--time-budget", help="wall-clock budget, e.g. 90s, 15m, 1h (default: the space's)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPU share per trial (default: the space's, or 0.25)")
    parser.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: the space's)")
    parser.add_argument("--address", help="join a running Ray cluster (e.g. auto, HOST:PORT); default: start one here")
    parser.add_argument("--storage-path", default=DEFAULT_STORAGE, help="results folder (default: ./ray_results)")
    parser.add_argument("--storage-is-shared", action="store_true",
                        help="the --storage-path folder is on a filesystem every node mounts (NFS); "
                             "needed for a local path on a multi-node cluster")
    parser.add_argument("--name", help="study name (default: SPACE-YYYYmmdd-HHMMSS)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="seeds the search algorithm and the per-trial seeds")
    parser.add_argument("--resume", nargs="?", const="", metavar="PATH_OR_NAME",
                        help="continue an interrupted study: its folder, or its name under --storage-path "
                             "(default: --name); flags not given now are those the study started with")
    parser.add_argument("--restart-errored", action="store_true",
                        help="with --resume: run errored trials again from scratch (default: from their last checkpoint)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///mlflow.db in the working directory)")
    parser.add_argument("--experiment", help=f"MLflow experiment name (default: {tracking_store.DEFAULT_EXPERIMENT})")
    return parser


def resume_args(args: argparse.Namespace) -> argparse.Namespace:
    """--resume PATH_OR_NAME: the study's location, found before Ray starts; flags not given now are the saved ones."""
    target = args.resume or args.name
    if not target:
        raise ConfigError("--resume", "needs the study's folder or name (or --name)")
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


def read_saved_args(location: str, defaults: dict) -> dict:
    """The flags the study started with (save_args); {} for a study saved without them (then --space is needed)."""
    try:
        text = read_study_file(location, SAVED_ARGS)
        saved = json.loads(text) if text is not None else {}
    except (OSError, ValueError) as err:
        raise ConfigError(f"{location}/{SAVED_ARGS}", f"unreadable saved search command ({first_line(err)})") from None
    return {key: value for key, value in saved.items() if key in defaults}


def save_args(args: argparse.Namespace, location: str) -> None:
    """Keep the resolved flags beside Tune's state, so `--resume LOCATION` alone restarts the same search."""
    saved = {key: value for key, value in vars(args).items() if key not in ("resume", "restart_errored")}
    if args.space and Path(args.space).is_file():  # a space file given relative to today's working directory
        saved["space"] = str(Path(args.space).resolve())
    write_study_file(location, SAVED_ARGS, json.dumps(saved, indent=1))


def study_location(storage_path: str, name: str) -> str:
    """The study's folder: an absolute local path, or the URI kept whole (Path would fold s3://b into the local
    folder s3:/b, and checkpoints would never reach the bucket)."""
    if "://" in storage_path:
        return join_uri(storage_path, name)
    return str(Path(storage_path).expanduser().resolve() / name)


def join_uri(uri: str, *names: str) -> str:
    """`names` appended to the URI's path, its query kept last: pyarrow reads an S3 endpoint from the query
    (s3://BUCKET/PATH?endpoint_override=HOST:PORT&scheme=http), and a name after it would land in the query."""
    path, mark, query = uri.partition("?")
    return "/".join([path.rstrip("/"), *names]) + mark + query


def tune_storage(location: str) -> tuple[str, str]:
    """RunConfig's (storage_path, name) for a study location, a URI's scheme and query intact."""
    path, mark, query = location.partition("?")
    parent, _, name = path.rstrip("/").rpartition("/")
    return (parent or "/") + mark + query, name


def study_fs(location: str, flag: str = "--storage-path") -> tuple[pafs.FileSystem, str]:
    """The filesystem holding the study (local, NFS, s3://...) and the study's path on it, as Tune resolves them."""
    try:
        return pafs.FileSystem.from_uri(location)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise ConfigError(flag, f"{location}: {first_line(err)}") from None


def read_study_file(location: str, filename: str) -> str | None:
    """A file of the study's folder as text; None if it is not there."""
    fs, path = study_fs(location)
    if fs.get_file_info(f"{path}/{filename}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{path}/{filename}") as src:
        return src.read().decode()


def write_study_file(location: str, filename: str, text: str) -> str:
    """Write a file into the study's folder, made if missing (a local filesystem makes no parents); its location."""
    fs, path = study_fs(location)
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/{filename}") as out:
        out.write(text.encode())
    return join_uri(location, filename)


def study_mib(location: str) -> float:
    """MiB the study holds, on whichever filesystem it is."""
    fs, path = study_fs(location)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(info.size for info in found if info.type == pafs.FileType.File) / 2**20


def study_dir(args: argparse.Namespace, space_name: str) -> str:
    """The study's location under --storage-path: existing for --resume, new otherwise."""
    name = args.name or f"{space_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    location = study_location(args.storage_path, name)
    if args.resume is None and study_exists(location):
        raise ConfigError("--name", f"{location} exists: pick another name, or continue it with --resume {location}")
    return location


def study_exists(location: str) -> bool:
    fs, path = study_fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_local_gpus(args: argparse.Namespace) -> None:
    """Without --address Ray starts on this machine: a GPU request it cannot meet fails before Ray starts."""
    if not args.address and args.gpus_per_trial and not torch.cuda.device_count():
        raise ConfigError("--gpus-per-trial", f"{args.gpus_per_trial:g} GPU per trial, but this machine has no GPU")


def check_local_cpus(plans: dict[bool, Space], args: argparse.Namespace) -> None:
    """Without --address Ray gets this machine's CPUs (start_ray): a trial wanting more fails before Ray starts;
    so does a base.device this machine lacks."""
    if args.address:
        return
    space = plans[torch.cuda.device_count() > 0]
    device = from_dict(space.train_fields).device
    if not device_available(device):
        raise ConfigError(f"{space.where}: base.device", f"{device}: this machine has no such device")
    cpu, cpus = args.cpus_per_trial or space.resources["cpu"], os.cpu_count()
    if cpu > cpus:
        flag = "--cpus-per-trial" if args.cpus_per_trial else f"{space.where}: resources.cpu"
        raise ConfigError(flag, f"{cpu:g} CPUs per trial, but this machine has {cpus}")


def known_spaces() -> dict[str, Path]:
    """Space name -> file: ./search_spaces/ shadows the packaged copies."""
    found = {path.stem: path for path in packaged_spaces().glob("*.yaml")}
    found.update({path.stem: path for path in Path("search_spaces").glob("*.yaml")})
    return dict(sorted(found.items()))


def packaged_spaces() -> Path:
    """The spaces in the wheel; when `python -m` in the repository root imports the checkout instead of the
    installed package, the checkout has no gan_tune.search_spaces, and its search_spaces/ sits beside gan_tune/."""
    try:
        return Path(str(resources.files("gan_tune.search_spaces")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "search_spaces"


def resolve_space(name: str | None) -> Path:
    """An existing path; else ./search_spaces/NAME.yaml; else the packaged copy."""
    if not name:
        raise ConfigError("--space", f"required (known: {', '.join(known_spaces())})")
    for path in (Path(name), Path("search_spaces") / f"{name}.yaml", packaged_spaces() / f"{name}.yaml"):
        if path.is_file():
            return path
    raise ConfigError("--space", f"unknown space {name!r} (known: {', '.join(known_spaces())})")


def load_plans(args: argparse.Namespace) -> dict[bool, Space]:
    """The space for a cluster with GPUs (True) and without (False), flags applied; all checks before Ray."""
    space = spaces.load_space(resolve_space(args.space))
    flags = {"num_samples": args.num_samples, "max_epochs": args.max_epochs, "time_budget": args.time_budget}
    flags = {key: value for key, value in flags.items() if value is not None}
    gpu, cpu = args.gpus_per_trial, args.cpus_per_trial
    if gpu is not None and (gpu < 0 or gpu > 1 and gpu != int(gpu)):
        raise ConfigError("--gpus-per-trial", f"{gpu:g}: use a fraction <= 1 or a whole number of GPUs")
    if cpu is not None and cpu <= 0:
        raise ConfigError("--cpus-per-trial", f"{cpu:g}: must be > 0")
    check_storage_path(args.storage_path)
    check_address(args.address)
    return {gpu: spaces.with_values(plan, flags, where="command line") if flags else plan
            for gpu, plan in ((True, space), (False, spaces.for_cpu(space)))}


def check_storage_path(storage_path: str) -> None:
    """A local results folder must be one this process can make and write (else Tune fails mid-study): the missing
    folders and a file in them are made, then removed. os.access answers yes to root under /proc or on a
    read-only mount, where only trying tells."""
    if "://" in storage_path:
        check_storage_uri(storage_path)
        return
    path = Path(storage_path).expanduser().absolute()
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise ConfigError("--storage-path", f"{path}: cannot make or write a folder there "
                                            f"({err.strerror or type(err).__name__})") from None
    finally:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()


def check_storage_uri(storage_path: str, flag: str = "--storage-path") -> None:
    """A storage URI (s3://...) must take a file: wrong credentials, a missing bucket or an endpoint that does not
    answer fail here, before Ray starts, instead of in every trial's first checkpoint. The file is removed."""
    fs, path = study_fs(storage_path, flag)
    probe = f"{path.rstrip('/')}/{STORAGE_PROBE}"
    try:
        if isinstance(fs, pafs.LocalFileSystem):  # file:///PATH: object stores need no folders, a disk does
            fs.create_dir(path)
        with fs.open_output_stream(probe) as out:
            out.write(b"gan_tune: a search checks that it can write here")
        fs.delete_file(probe)
    except OSError as err:  # pyarrow's S3 errors: AWS Error ACCESS_DENIED, NO_SUCH_BUCKET, NETWORK_CONNECTION ...
        raise ConfigError(flag, f"{storage_path}: cannot write there ({first_line(err)})") from None


def storage_failure(location: str, err: OSError) -> str:
    """The line a search ends with when its storage fails after Ray started: what failed, and how to go on."""
    return (f"{location}: the study's storage failed ({first_line(err)}); the checkpoints and state it holds are "
            f"kept: once it is back, continue with python -m gan_tune.search --resume {shlex.quote(location)}")


def check_address(address: str | None) -> None:
    """A HOST:PORT must accept a TCP connection: ray.init would retry a dead address for minutes."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("--address", f"{address}: expected auto or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_CHECK_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError("--address", f"{address}: no Ray head answered within "
                                       f"{ADDRESS_CHECK_TIMEOUT_S:g} s ({type(err).__name__})") from None


def start_ray(address: str | None, verbose: bool = False) -> bool:
    """Start a local Ray (or join `address`); False when Ray was already running in this process."""
    if ray.is_initialized():
        return False
    level = logging.INFO if verbose else logging.WARNING  # Ray's start-up info lines only with --verbose
    if address:
        ray.init(address=address, logging_level=level)
    else:  # address="local": never join a cluster another user started on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=level)
    return True


def trial_resources(plans: dict[bool, Space], args: argparse.Namespace) -> tuple[Space, dict[str, float]]:
    """The plan for this cluster and one trial's resources; requests the cluster can't meet fail, never hang."""
    cluster = ray.cluster_resources()
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    if not gpus and args.gpus_per_trial:
        raise ConfigError("--gpus-per-trial", f"{args.gpus_per_trial} GPU per trial, but the Ray cluster has no GPU")
    space = plans[gpus > 0]
    device = from_dict(space.train_fields).device
    if not gpus and device.startswith("cuda"):
        raise ConfigError(f"{space.where}: base.device", f"{device}, but the Ray cluster has no GPU")
    cpu = args.cpus_per_trial or space.resources["cpu"]
    gpu = args.gpus_per_trial if args.gpus_per_trial is not None else space.resources["gpu"] or DEFAULT_GPU_SHARE
    gpu = gpu if gpus else 0
    if cpu > cpus:
        raise ConfigError("--cpus-per-trial", f"{cpu} CPUs per trial, but the Ray cluster has {cpus:g}")
    if gpu > gpus:
        raise ConfigError("--gpus-per-trial", f"{gpu} GPUs per trial, but the Ray cluster has {gpus:g}")
    return space, {"cpu": cpu, "gpu": gpu}


def check_storage(storage_path: str, shared: bool) -> None:
    """Since Ray 2.7 every node writes its checkpoints to the storage path itself: with several nodes,
    a folder only the driver's machine sees loses them, so it must be a URI (s3://) or a declared share."""
    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes > 1 and "://" not in storage_path and not shared:
        raise ConfigError("--storage-path", f"{storage_path} is local, but the Ray cluster has {nodes} nodes: "
                          "pass s3://BUCKET/PATH, or an NFS path with --storage-is-shared")


def trials_at_once(trial: dict[str, float]) -> int:
    """How many trials of this size the cluster runs side by side now."""
    cluster = ray.cluster_resources()
    at_once = int(cluster.get("CPU", 0) // trial["cpu"])
    return min(at_once, int(cluster.get("GPU", 0) // trial["gpu"])) if trial["gpu"] else at_once


@contextlib.contextmanager
def queue_lazily(space: Space, trial: dict[str, float]) -> Iterator[None]:
    """For a search that starts trials until its budget ends: Tune queues up to 200 random-search trials
    ahead (so that an autoscaler sees demand), which would end the budget with hundreds never started.
    One queued trial per slot keeps the draws coming as slots free up; TUNE_MAX_PENDING_TRIALS_PG is
    Tune's own setting for this (read when the fit starts), and a value the user exported wins."""
    if space.num_samples is None and PENDING_ENV not in os.environ:
        os.environ[PENDING_ENV] = str(max(1, trials_at_once(trial)))
        try:
            yield
        finally:
            del os.environ[PENDING_ENV]  # the next search in this process decides for itself
    else:
        yield


def print_plan(space: Space, location: str, trial: dict[str, float], args: argparse.Namespace) -> None:
    fixed = from_dict(space.train_fields)
    at_once = trials_at_once(trial)
    device = f"{trial['gpu']:g} GPU" if trial["gpu"] else "no GPU (the cluster has none)"
    budget = spaces.format_duration(space.time_budget_s) if space.time_budget_s else "none"
    subset = f", first {fixed.subset} images" if fixed.subset else ""
    print(f"study {tune_storage(location)[1]}: space {space.name} ({space.where})")
    print(f"  trials:    {spaces.describe_trials(space)}, {space.search_alg} search, seed {args.seed}")
    print(f"  scheduler: {spaces.describe_scheduler(space)} on {space.metric} ({space.mode})")
    print(f"  resources: {trial['cpu']:g} CPU + {device} per trial; {at_once} at a time")
    print(f"  budget:    {budget} (--time-budget overrides)")
    print(f"  model:     {fixed.model}, width {fixed.width:g}, batch {fixed.batch_size}; "
          f"data {fixed.data_source}{subset}")
    print(f"  results:   {location}", flush=True)


def start_tracking(space: Space, args: argparse.Namespace, data: Mnist, trial: dict[str, float],
                   stopper: GanStopper, location: str) -> tuple[str, list[tune.Callback]]:
    """The study's MLflow parent run (found again on --resume) and the driver-side callback logging each trial."""
    experiment = args.experiment or tracking_store.DEFAULT_EXPERIMENT
    parent = search_run.find_search_run(args.tracking_uri, experiment, location) if args.resume is not None else None
    if parent is None:
        storage_path, name = tune_storage(location)
        resolved = {**vars(args), "name": name, "storage_path": storage_path, "resources": trial,
                    "num_samples": space.num_samples, "max_epochs": space.max_epochs, "metric": space.metric,
                    "mode": space.mode, "time_budget_s": space.time_budget_s, "experiment": experiment}
        parent = search_run.start_search_run(args.tracking_uri, experiment, space.name, resolve_space(args.space),
                                             resolved, data.source, space.scheduler["type"], space.search_alg, location)
    print(f"mlflow parent run: {parent} (experiment {experiment} at {args.tracking_uri})", flush=True)
    callback = trial_runs.TrackingCallback(args.tracking_uri, parent, space.max_epochs, stopper.reasons,
                                           scheduler=space.scheduler["type"])
    return parent, [callback]


def finish_tracking(best: Finalist | None, space: Space, args: argparse.Namespace, parent: str) -> None:
    """Log the chosen generator (its trial, checkpoint, scores) on the parent run, and end it."""
    rescored = best is not None and bool(best.scores)  # else search_run picks the trial's best kept checkpoint
    search_run.finish_search_run(args.tracking_uri, parent, best.result if best else None, space.metric, space.mode,
                                 edge_warnings=spaces.edge_warnings(space, best.searched) if best else [],
                                 chosen=(best.checkpoint, best.reported) if rescored else None,
                                 rescored=best.scores if rescored else None)
    print(f"mlflow: compare the trials with `mlflow ui --backend-store-uri {args.tracking_uri}`; "
          f"samples: python -m gan_tune.sample --run-id {parent} --tracking-uri {args.tracking_uri}")


def restore_tuner(location: str, trainable: tune.Trainable, restart_errored: bool, **run_config: Any) -> tune.Tuner:
    """Tuner.restore, unfinished trials from their checkpoints; errored ones too, or from scratch.

    Restore unpickles the first session's stopper, callbacks and console settings; this session's own
    (whose stop reasons and outcomes summarise() prints) take their place.
    """
    tuner = tune.Tuner.restore(location, trainable=trainable, resume_unfinished=True,
                               resume_errored=not restart_errored, restart_errored=restart_errored)
    return replace_restored_run_config(tuner, **run_config)


def replace_restored_run_config(tuner: tune.Tuner, **changes: Any) -> tune.Tuner:
    """Set RunConfig fields of a restored Tuner. Ray (2.60) has no public route: Tuner.restore takes no
    run_config, and the restored one, unpickled from tuner.pkl, is reachable only through the private
    `_local_tuner`. tests/test_search.py checks this against Ray, so a Ray that moves it fails there first."""
    run_config = tuner._local_tuner.get_run_config()
    for key, value in changes.items():
        if not hasattr(run_config, key):
            raise AttributeError(f"RunConfig has no field {key!r}")
        setattr(run_config, key, value)
    return tuner


def checkpoint_config(space: Space) -> tune.CheckpointConfig:
    """Each trial keeps its CHECKPOINTS_KEPT best by the metric (the finalists), and Tune keeps its latest too.

    Not under PBT: an exploit clones the checkpoint the donor saved at its last perturbation, and the clone
    restores it later, while the donor trains on. Kept by score, that checkpoint is deleted as soon as a
    newer one is reported unless it ranks among the best, and the clone then fails with "does not exist on
    storage anymore". Kept by recency, it stays for two more perturbation intervals.
    """
    if space.scheduler["type"] != "pbt":
        return tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT, checkpoint_score_attribute=space.metric,
                                     checkpoint_score_order=space.mode)
    saves_per_interval = space.scheduler["perturbation_interval"] // from_dict(space.train_fields).checkpoint_every
    return tune.CheckpointConfig(num_to_keep=max(CHECKPOINTS_KEPT, 2 * saves_per_interval + 1))


def build_tuner(space: Space, args: argparse.Namespace, data: Mnist, trial: dict[str, float],
                stopper: tune.Stopper, location: str, callbacks: list[tune.Callback]) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(train_gan, data=data, quiet=not args.verbose), trial)
    output = {"verbose": None, "progress_reporter": None,  # Tune's defaults, unless the table engine's
              **console.run_config_output(list(space.search), space.metric, args.verbose)}
    if args.resume is not None:
        return restore_tuner(location, trainable, args.restart_errored, stop=stopper, callbacks=callbacks, **output)
    storage_path, name = tune_storage(location)
    run_config = tune.RunConfig(
        name=name, storage_path=storage_path, stop=stopper, callbacks=callbacks, **output,
        sync_config=tune.SyncConfig(sync_artifacts=True),  # trial files from every node reach the storage path
        checkpoint_config=checkpoint_config(space),
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES))
    tune_config = tune.TuneConfig(
        metric=space.metric, mode=space.mode, scheduler=spaces.make_scheduler(space),
        search_alg=spaces.make_search_alg(space, args.seed), num_samples=space.tune_num_samples,
        time_budget_s=space.time_budget_s,
        reuse_actors=True)  # a new trial (or a PBT/HyperBand resume) skips starting a process and importing torch
    return tune.Tuner(trainable, param_space=spaces.param_space(space, args.seed), tune_config=tune_config,
                      run_config=run_config)


def best_epoch(result: tune.Result, space: Space) -> pd.Series:
    """The report with the best score of a trial (the playbook: pick the best checkpoint in hindsight)."""
    frame = result.metrics_dataframe
    scores = frame[space.metric]
    return frame.loc[scores.idxmin() if space.mode == "min" else scores.idxmax()]


def choose_best(results: tune.ResultGrid, space: Space, data: Mnist) -> tuple[Finalist | None, list[Finalist]]:
    """(the generator the search keeps, the finalists it was chosen from, best first).

    With finalists (finalists.rescore) the best by the many-sample score; without (finalists.trials 0, a metric
    that is no sample score, no kept scored checkpoint) the trial's best report and its best kept checkpoint."""
    rescored = finalists.rescore(results, space.metric, space.mode, data, space.finalists["trials"],
                                 space.finalists["samples"], device="cuda" if torch.cuda.is_available() else "cpu")
    if rescored:
        return rescored[0], rescored
    try:
        result = results.get_best_result(space.metric, space.mode, scope="all")
    except RuntimeError:  # no trial reported the metric
        return None, []
    row = best_epoch(result, space).to_dict()  # finish_tracking lets search_run pick the kept checkpoint
    return Finalist(result, result.checkpoint, row, {}, resolve_derived(result.config)), []


def write_best_config(best: Finalist, space: Space, location: str) -> str:
    """TrainConfig fields only (derived params resolved), trained for as many epochs as the chosen checkpoint."""
    name = tune_storage(location)[1]
    values = {**best.config, "max_epochs": best.epoch, "name": f"{name}-best"}
    cfg = from_dict(values, where=f"trial {best.trial_id} config")
    path = join_uri(location, BEST_CONFIG)
    header = (f"# Best trial {best.trial_id} of study {name} (space {space.where}):\n"
              f"# {score_text(best, space.metric)} at epoch {best.epoch}.\n"
              f"# Reproduce: python -m gan_tune.train --config {path}\n")
    return write_study_file(location, BEST_CONFIG, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def score_text(best: Finalist, metric: str) -> str:
    """"fid 9.8 on 10000 samples (12.3 on 1000 when reported)", or the reported score alone."""
    reported = f"{best.reported[metric]:.4g}"
    if not best.scores:
        return f"{metric} {reported}"
    return (f"{metric} {best.scores[metric]:.4g} on {best.scores['fid_samples']} samples "
            f"({reported} on {best.reported.get('fid_samples', '?')} when reported)")


def time_to(timestamp: float, started: float) -> str:
    """How long after `started` (this session's fit) a report with Tune's `timestamp` arrived: time to quality."""
    if timestamp < int(started):  # Tune's timestamp has whole seconds
        return "reported before this session resumed the study"
    minutes, seconds = divmod(round(timestamp - started), 60)
    return f"reported {minutes} min {seconds:02d} s into the search"


def summarise(results: tune.ResultGrid, space: Space, stopper: GanStopper, location: str,
              started: float, ended: float) -> None:
    """Print the trials' outcomes, the budget used and the stopped trials."""
    ran = sum(1 for result in results if TRAINING_ITERATION in result.metrics or result.error)
    queued = f" ({len(results) - ran} more never reported: queued, or cut by the budget)" if ran < len(results) else ""
    print(f"\n{ran} trials{queued}, {results.num_errors} errored; results in {location} "
          f"({study_mib(location):.1f} MiB written)")
    print(f"budget: {budget_line(space, ran, ended - started)}")
    for trial_id, reason in sorted(stopper.reasons.items()):
        print(f"  stopped {trial_id}: {reason}")
    diverged = sum(reason == "diverged" for reason in stopper.reasons.values())
    if diverged:
        print(f"  {diverged} of {len(results)} trials diverged (many: shrink the space's learning-rate range)")


def budget_line(space: Space, trials: int, used_s: float) -> str:
    """How much of the time budget the search used, and why it ended."""
    used = spaces.format_duration(used_s)
    if not space.time_budget_s:
        return f"{used} (no time budget)"
    share = f"{used} of {spaces.format_duration(space.time_budget_s)} ({used_s / space.time_budget_s:.0%})"
    if space.num_samples is not None and trials >= space.num_samples and used_s < space.time_budget_s:
        return f"{share}: all {space.num_samples} trial{'s' * (space.num_samples != 1)} (num_samples) ended first"
    return f"{share}, {trials} trial{'s' * (trials != 1)} ran"


def print_finalists(rescored: list[Finalist], space: Space, seconds: float) -> None:
    """The re-scored checkpoints, best first: the few-sample score they were reported with and the new one."""
    if not rescored:
        return
    metric, samples = space.metric, space.finalists["samples"]
    trials = len({f.trial_id for f in rescored})
    print(f"finalists: {len(rescored)} kept checkpoints of the top {trials} trials scored again on {samples} "
          f"samples ({seconds:.0f} s)")
    before = rescored[0].reported.get("fid_samples", "?")
    print(f"  {'trial':<14} {'epoch':>5} {f'{metric} ({before})':>14} {f'{metric} ({samples})':>14} {'coverage':>8}")
    for f in rescored:
        print(f"  {f.trial_id:<14} {f.epoch:>5} {f.reported[metric]:>14.4g} {f.scores[metric]:>14.4g} "
              f"{f.scores['coverage']:>8.0f}")


def print_best(best: Finalist, space: Space, started: float) -> None:
    print(f"best trial {best.trial_id}: {score_text(best, space.metric)} at epoch {best.epoch}, "
          f"{time_to(best.reported.get('timestamp', 0), started)}")
    shown = {key: best.searched[key] for key in (*space.search, "seed") if key in best.searched}
    print(f"  config:  {console.format_values({**shown, **resolve_derived(shown)})}")
    for line in spaces.edge_warnings(space, best.searched):
        print(f"  warning: {line}")
    print(f"  metrics: {console.format_values({k: best.reported[k] for k in SUMMARY_METRICS if k in best.reported})}")
    print(f"  folder:  {best.result.path}")


def run(plans: dict[bool, Space], args: argparse.Namespace, location: str) -> int:
    """Everything after Ray is up: resources, plan, data, fit, summary."""
    space, trial = trial_resources(plans, args)
    check_storage(args.storage_path, args.storage_is_shared)
    print_plan(space, location, trial, args)
    fixed = from_dict(space.train_fields)
    data = load_mnist(fixed.data_source, fixed.data_dir, fixed.subset)  # once, shared through the object store
    print(f"data: {data.source} ({len(data)} images)", flush=True)
    random.seed(args.seed)  # the driver-side draws of Tune's schedulers (PBT explore, ASHA brackets)
    np.random.seed(args.seed)
    stopper, failing = GanStopper(space.max_epochs), FailingTrials(space.num_samples)
    parent, callbacks = start_tracking(space, args, data, trial, stopper, location)  # after every check
    started = time.time()
    try:
        if args.resume is None:
            save_args(args, location)
        stop = tune.stopper.CombinedStopper(stopper, failing)
        lines = console.TrialLines(list(space.search), space.metric, callbacks[0].outcomes)  # after tracking's
        tuner = build_tuner(space, args, data, trial, stop, location, [*callbacks, lines, failing])
        with console.table_engine(args.verbose), queue_lazily(space, trial):
            results = tuner.fit()
    except BaseException as err:
        search_run.fail_search_run(args.tracking_uri, parent, f"{type(err).__name__}: {first_line(err)}")
        raise
    if failing.space_fails:
        return report_failing_space(failing, args, parent)
    try:  # the summary reads and writes the study's storage, which may have failed (an S3 server gone)
        best = summarise_and_choose(results, space, stopper, location, started, data)
    except BaseException as err:
        search_run.fail_search_run(args.tracking_uri, parent, f"{type(err).__name__}: {first_line(err)}")
        raise
    finish_tracking(best, space, args, parent)
    print_resume_hint(results, callbacks[0].outcomes, space, location)
    return 0 if best else 1


def summarise_and_choose(results: tune.ResultGrid, space: Space, stopper: GanStopper, location: str,
                         started: float, data: Mnist) -> Finalist | None:
    """The summary, the finalists and the kept generator with its best_config.yaml (None: no trial scored)."""
    summarise(results, space, stopper, location, started, time.time())
    scoring = time.time()
    best, rescored = choose_best(results, space, data)
    print_finalists(rescored, space, time.time() - scoring)
    if best is None:
        print(f"error: no trial reported {space.metric}", file=sys.stderr)
        return None
    print_best(best, space, started)
    print(f"best config: {write_best_config(best, space, location)}")
    return best


def report_failing_space(failing: FailingTrials, args: argparse.Namespace, parent: str) -> int:
    """Trials that all raised before any report: one line per distinct error, the parent run FAILED, exit 1."""
    lines = failing.summary()
    for line in lines:
        print(f"error: search stopped, {line}", file=sys.stderr)
    search_run.fail_search_run(args.tracking_uri, parent, "; ".join(lines))
    return 1


def print_resume_hint(results: tune.ResultGrid, outcomes: dict[str, str], space: Space, location: str) -> None:
    """After Ctrl-C (Tune stops gracefully and saves its state) or a spent time budget: how to go on.

    `outcomes` is the tracking callback's trial id -> stop reason; 'search ended' marks a trial the
    search stopped, and trials that never started have no entry. A space that trains until its budget
    (no num_samples, or a PBT population without max_epochs) always ends with trials cut off: that is the
    plan, not a failure, and the line says so."""
    unfinished = len(results) - sum(reason != "search ended" for reason in outcomes.values())
    if unfinished <= 0:
        return
    command = f"python -m gan_tune.search --resume {shlex.quote(location)}"  # a URI query has ? and &
    if space.num_samples is None or space.epochs_until_budget:
        print(f"{unfinished} of {len(results)} trials were still training when the search ended (this space "
              f"trains until its time budget); to train them on:\n  {command}", flush=True)
    else:
        print(f"{unfinished} of {len(results)} trials did not finish (Ctrl-C or the time budget); "
              f"continue them with:\n  {command}", flush=True)


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
        args.tracking_uri = tracking_store.resolve_tracking_uri(args.tracking_uri)
        tracking_store.check_tracking(args.tracking_uri)  # an unusable store fails here, before Ray starts
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
