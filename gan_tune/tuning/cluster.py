"""Ray start-up and trial resources: join or start Ray, GPUs and CPUs per trial, how many trials run at once."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

import ray
import torch

from gan_tune.training.config import ConfigError, device_available, from_dict
from gan_tune.tuning.spaces import Space

# A whole GPU per trial unless a space asks for a share: without NVIDIA MPS, processes sharing a GPU take turns
# on it (measured on an H200: 4 trials at 0.25 GPU, 44.9k images/s in all; 1 trial alone, 44.1k).
DEFAULT_GPU_SHARE = 1.0
MPS_PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
MPS_DEFAULT_PIPE = "/tmp/nvidia-mps"  # nvidia-cuda-mps-control's default pipe folder


ADDRESS_CHECK_TIMEOUT_S = 3.0  # a live Ray head accepts at once; ray.init itself retries a dead one for minutes


PENDING_ENV = "TUNE_MAX_PENDING_TRIALS_PG"


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


def mps_running() -> bool:
    """Whether an NVIDIA MPS control daemon serves this machine (its control pipe exists): with MPS, processes
    sharing a GPU run their kernels at once instead of taking turns."""
    return (Path(os.environ.get(MPS_PIPE_ENV, MPS_DEFAULT_PIPE)) / "control").exists()


def sharing_note(gpu: float) -> str | None:
    """One line when trials share GPUs on a machine without MPS, where sharing buys no throughput."""
    if not 0 < gpu < 1 or mps_running():
        return None
    return (f"note: {gpu:g} GPU per trial shares each GPU between {int(1 // gpu)} trials, but NVIDIA MPS is not "
            f"running on this machine, so they take turns on it (no faster than one trial); start MPS "
            f"(README, Performance) or use --gpus-per-trial 1")
