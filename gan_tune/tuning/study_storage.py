"""Where a study lives: its location (a folder or a URI), its files, and the checks before Ray starts."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray

from gan_tune.training.config import ConfigError, check_writable, first_line

DEFAULT_STORAGE = "ray_results"


BEST_CONFIG = "best_config.yaml"


SAVED_ARGS = "gan_tune_search.json"  # the resolved flags of a study, for --resume


STORAGE_PROBE = ".gan_tune_write_check"  # written and removed under a storage URI before Ray starts


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


def check_storage_path(storage_path: str) -> None:
    """A local results folder must be one this process can make and write (else Tune fails mid-study): tried
    (config.check_writable), nothing left behind."""
    if "://" in storage_path:
        check_storage_uri(storage_path)
        return
    path = Path(storage_path).expanduser().absolute()
    try:
        check_writable(path)
    except OSError as err:
        raise ConfigError("--storage-path", f"{path}: cannot make or write a folder there "
                                            f"({err.strerror or type(err).__name__})") from None


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


def check_storage(storage_path: str, shared: bool) -> None:
    """Since Ray 2.7 every node writes its checkpoints to the storage path itself: with several nodes,
    a folder only the driver's machine sees loses them, so it must be a URI (s3://) or a declared share."""
    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes > 1 and "://" not in storage_path and not shared:
        raise ConfigError("--storage-path", f"{storage_path} is local, but the Ray cluster has {nodes} nodes: "
                          "pass s3://BUCKET/PATH, or an NFS path with --storage-is-shared")


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
