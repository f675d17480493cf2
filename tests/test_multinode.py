"""A real three-node Ray cluster on loopback (ray.cluster_utils.Cluster: a head and two workers, each its
own raylet) runs the smoke search through the CLI, as `--address` users do on a real cluster.

The workers advertise fake GPUs (num_gpus without CUDA): Ray schedules fractional GPU shares on them,
and the trainable falls back to the CPU because torch sees no CUDA device.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from test_reliability import held_at_once

from gan_tune.tuning import trainable

SMOKE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"

TRIALS = 6  # 4 fill the 4-CPU fake-GPU node, 2 the other worker


@pytest.fixture(scope="module")
def gates(tmp_path_factory) -> Path:
    """Every trial on the cluster waits after epoch 1 at a gate of its own (trainable.fault_gate, "*") until the
    test opens them all: how many trials run at once is then read from the gates, not from timings."""
    return tmp_path_factory.mktemp("gates") / "gate"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, gates):
    # raylets pass their environment to the trial workers (the search's own does not reach them)
    env = {"GAN_TUNE_CACHE": str(tmp_path_factory.mktemp("cache")), trainable.FAULT_GATE_ENV: f"1:{gates}",
           trainable.FAULT_GATE_TRIAL_ENV: "*"}
    env_before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no trials
    gpu_node = cluster.add_node(num_cpus=4, num_gpus=2)
    cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    for key, value in env_before.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
    yield cluster, gpu_node.node_id
    cluster.shutdown()  # stops only the processes this cluster started


def search_command(cluster, tmp_path, *extra) -> list[str]:
    """The smoke search on the cluster, FIFO: no scheduler stops a trial while it waits at its gate. The claims are
    about placement and storage: 200-sample scores, no finalists."""
    space = yaml.safe_load(SMOKE.read_text())
    (tmp_path / "smoke_fifo.yaml").write_text(yaml.safe_dump({**space, "base": {**space["base"], "fid_samples": 200},
                                                              "scheduler": {"type": "fifo"}, "finalists": {"trials": 0}}))
    return [sys.executable, "-m", "gan_tune.search", "--space", str(tmp_path / "smoke_fifo.yaml"), "--address",
            cluster.address, "--storage-path", str(tmp_path / "shared"), "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", "--name", "multinode", *extra]


def run_search(cluster, tmp_path, *extra):
    return subprocess.run(search_command(cluster, tmp_path, *extra), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def test_local_storage_on_a_multinode_cluster_is_refused(cluster, tmp_path):
    done = run_search(cluster[0], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--storage-path" in done.stderr and "--storage-is-shared" in done.stderr


def test_smoke_search_spreads_over_nodes_and_ray_schedules_quarter_gpu_shares_on_fake_gpus(cluster, gates, tmp_path):
    """Ray's fractional GPU scheduling, not GPU sharing: the workers' GPUs are fake (torch sees no CUDA device and
    every trial trains on the CPU), so this proves that Ray places four 0.25-GPU trials at once on a 2-GPU node."""
    cluster, gpu_node_id = cluster
    with open(tmp_path / "search.out", "w") as out, open(tmp_path / "search.err", "w") as err:
        search = subprocess.Popen(search_command(cluster, tmp_path, "--storage-is-shared", "--num-samples",
                                                 str(TRIALS)), stdout=out, stderr=err, text=True, cwd=tmp_path,
                                  env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            held = held_at_once(gates, search, TRIALS)  # all six at once: 4 on the fake-GPU node, 2 on the other
            assert search.wait(timeout=300) == 0, (tmp_path / "search.err").read_text()[-3000:]
        finally:
            search.kill()
    stdout = (tmp_path / "search.out").read_text()
    assert "0.25 GPU per trial" in stdout
    # no MPS daemon here: the plan says in one line that the shares take turns on a real GPU
    assert "note: 0.25 GPU per trial shares each GPU between 4 trials, but NVIDIA MPS is not running" in stdout

    study = tmp_path / "shared" / "multinode"
    progress = {path.parent.name: pd.read_csv(path) for path in study.glob("*/progress.csv")}
    assert len(progress) == TRIALS
    assert {path.name.split("-", 1)[1] for path in held} == {frame["trial_id"].iloc[0] for frame in progress.values()}
    nodes = {frame["node_id"].iloc[-1] for frame in progress.values()}
    assert len(nodes) >= 2, nodes  # trials ran on both workers
    # the six held at once: four 0.25-GPU trials on the 2-GPU node (its 4 CPUs), the other two on the 1-GPU node
    assert sum(frame["node_id"].iloc[-1] == gpu_node_id for frame in progress.values()) == 4

    checkpoints = list(study.glob("*/checkpoint_*/checkpoint.pt"))
    assert len({path.parents[1] for path in checkpoints}) == TRIALS  # every trial checkpointed to shared storage

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "gan_tune"]
    runs = client.search_runs([experiment.experiment_id])
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(children) == TRIALS
    assert {run.data.tags.get("node_id") for run in children} == nodes
