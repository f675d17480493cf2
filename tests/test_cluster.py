"""cluster.yaml validates against Ray's own autoscaler schema, offline, and matches the installed Ray."""

from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema():
    config = prepare_config(load())
    validate_config(config)  # raises on a schema violation
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] == "head"


def test_image_ray_version_matches_installed_ray():
    image = load()["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-"), f"{image} vs installed ray {ray.__version__}"
    assert image.endswith("-gpu")


def test_gpu_workers_autoscale_and_head_runs_mlflow():
    config = load()
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 < worker["max_workers"]
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}  # trials go to the GPU workers
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_cmds and "--port 5000" in head_cmds
    assert "pip install" in " ".join(config["setup_commands"]) and "gan_tune" in " ".join(config["setup_commands"])


def test_a_schema_violation_is_caught():
    broken = load()
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    # the schema's own error naming the field, not any exception (a KeyError in prepare_config would pass that)
    with pytest.raises(jsonschema.ValidationError, match="'many' is not of type 'integer'") as err:
        validate_config(prepare_config(broken))
    assert list(err.value.path) == ["available_node_types", "gpu_worker", "min_workers"]


def test_gpu_workers_start_the_mps_daemon_before_ray():
    """Trials sharing a GPU run their kernels at once only under NVIDIA MPS (README, Performance)."""
    commands = load()["worker_start_ray_commands"]
    mps = [i for i, command in enumerate(commands) if command.startswith("nvidia-cuda-mps-control -d")]
    start = [i for i, command in enumerate(commands) if "ray start" in command]
    assert mps and start and mps[0] < start[0]
