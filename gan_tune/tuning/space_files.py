"""Finding space files by name and loading a space with the command line's flags for a cluster with GPUs and without."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from gan_tune.training.config import ConfigError
from gan_tune.tuning import spaces
from gan_tune.tuning.cluster import check_address
from gan_tune.tuning.spaces import Space
from gan_tune.tuning.study_storage import check_storage_path


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
        return Path(__file__).resolve().parents[2] / "search_spaces"


def resolve_space(name: str | None) -> Path:
    """An existing path; else ./search_spaces/NAME.yaml; else the packaged copy."""
    if not name:
        raise ConfigError("--space", f"required (known: {', '.join(known_spaces())})")
    if Path(name).is_dir():
        raise ConfigError("--space", f"{name}: a folder, not a space file")
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
    try:
        return {gpu: spaces.with_values(plan, flags, where="command line") if flags else plan
                for gpu, plan in ((True, space), (False, spaces.for_cpu(space)))}
    except ConfigError as err:  # name the flag the user typed, not the space's key
        if err.where == "command line" and err.key in flags:
            raise ConfigError(f"--{err.key.replace('_', '-')}", err.msg) from None
        raise
