"""A real three-node Ray cluster on loopback (ray.cluster_utils.Cluster: a head and two workers, each its
own raylet) runs the smoke search through the CLI, as `--address` users do on a real cluster.

The workers advertise fake GPUs (num_gpus without CUDA): Ray schedules fractional GPU shares on them,
and the trainable falls back to the CPU because torch sees no CUDA device.
"""

import os
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

TRIALS = 6  # 4 fill the 4-CPU fake-GPU node, 2 the other worker


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env_before = os.environ.get("GAN_TUNE_CACHE")
    os.environ["GAN_TUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # raylets pass it to the trial workers
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no trials
    gpu_node = cluster.add_node(num_cpus=4, num_gpus=2)
    cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    if env_before is None:
        os.environ.pop("GAN_TUNE_CACHE")
    else:
        os.environ["GAN_TUNE_CACHE"] = env_before
    yield cluster, gpu_node.node_id
    cluster.shutdown()  # stops only the processes this cluster started


def run_search(cluster, tmp_path, *extra):
    args = [sys.executable, "-m", "gan_tune.search", "--space", "smoke", "--address", cluster.address,
            "--storage-path", str(tmp_path / "shared"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--name", "multinode", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def max_concurrent(intervals):
    """The most intervals that share one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], -e[1]))  # a start at the same second as an end counts as overlapping
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_local_storage_on_a_multinode_cluster_is_refused(cluster, tmp_path):
    done = run_search(cluster[0], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--storage-path" in done.stderr and "--storage-is-shared" in done.stderr


def test_smoke_search_spreads_over_nodes_and_ray_schedules_quarter_gpu_shares_on_fake_gpus(cluster, tmp_path):
    """Ray's fractional GPU scheduling, not GPU sharing: the workers' GPUs are fake (torch sees no CUDA device and
    every trial trains on the CPU), so this proves that Ray places four 0.25-GPU trials at once on a 2-GPU node."""
    cluster, gpu_node_id = cluster
    done = run_search(cluster, tmp_path, "--storage-is-shared", "--num-samples", str(TRIALS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0.25 GPU per trial" in done.stdout
    # no MPS daemon here: the plan says in one line that the shares take turns on a real GPU
    assert "note: 0.25 GPU per trial shares each GPU between 4 trials, but NVIDIA MPS is not running" in done.stdout

    study = tmp_path / "shared" / "multinode"
    progress = {path.parent.name: pd.read_csv(path) for path in study.glob("*/progress.csv")}
    assert len(progress) == TRIALS
    nodes = {frame["node_id"].iloc[-1] for frame in progress.values()}
    assert len(nodes) >= 2, nodes  # trials ran on both workers

    on_gpu_node = [frame for frame in progress.values() if frame["node_id"].iloc[-1] == gpu_node_id]
    intervals = [((frame["timestamp"] - frame["time_total_s"]).min(), frame["timestamp"].max()) for frame in on_gpu_node]
    assert max_concurrent(intervals) >= 4  # four 0.25-GPU trials at once on the fake-GPU node (its 4 CPUs)

    checkpoints = list(study.glob("*/checkpoint_*/checkpoint.pt"))
    assert len({path.parents[1] for path in checkpoints}) == TRIALS  # every trial checkpointed to shared storage

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "gan_tune"]
    runs = client.search_runs([experiment.experiment_id])
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(children) == TRIALS
    assert {run.data.tags.get("node_id") for run in children} == nodes
