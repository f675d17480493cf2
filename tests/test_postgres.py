"""Issue 18: the team tracking topology, cluster.yaml's head with PostgreSQL instead of sqlite: `mlflow server
--backend-store-uri postgresql://... --artifacts-destination s3://BUCKET/mlflow`, every server real and on loopback
(PostgreSQL from initdb, moto's S3 API, tests/servers.py). Searches and readers run through the CLIs."""

import os
import subprocess
import sys

from gan_tune import report, sample

SEARCH_TIMEOUT_S = 600


def runs_in_postgres(postgres) -> dict[str, list[tuple[str, str]]]:
    """{run_kind: [(run id, parent run id)]}, read from MLflow's tables in PostgreSQL itself."""
    rows = postgres.query("SELECT r.run_uuid, k.value, p.value FROM runs r "
                          "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'run_kind' "
                          "LEFT JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'mlflow.parentRunId'", "mlflow")
    found: dict[str, list[tuple[str, str]]] = {}
    for run_id, kind, parent in rows:
        found.setdefault(kind, []).append((run_id, parent))
    return found


def test_a_search_tracked_on_postgresql_keeps_its_artifacts_in_the_bucket(tracking_server, postgres, s3_server,
                                                                          s3_env, tmp_path):
    """Item 4: parent and child runs in PostgreSQL; sample grids, GIFs and the generator in the bucket; report and
    sample read them back through the server."""
    server, bucket = tracking_server
    studies = s3_server.make_bucket("pg-studies")
    command = [sys.executable, "-m", "gan_tune.search", "--space", "smoke", "--storage-path", f"s3://{studies}/ray",
               "--name", "tracked", "--tracking-uri", server.uri, "--experiment", "pg"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=SEARCH_TIMEOUT_S,
                          env={**os.environ, **s3_env, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + server.log()[-3000:]

    runs = runs_in_postgres(postgres)
    ((parent, _),) = runs["search"]
    assert len(runs["trial"]) == 3 and {p for _, p in runs["trial"]} == {parent}, runs
    keys = s3_server.keys(bucket, "mlflow/")
    for child, _ in runs["trial"]:
        mine = [key for key in keys if f"/{child}/artifacts/" in key]
        assert any(key.endswith("/progress.gif") for key in mine), (child, mine)
        assert any("/samples/epoch_" in key and key.endswith(".png") for key in mine), (child, mine)
    assert any(key.endswith("/MLmodel") for key in keys) and any("/data/model." in key for key in keys), keys

    assert report.main(["--tracking-uri", server.uri, "--experiment", "pg", "--out", str(tmp_path / "report")]) == 0
    (html,) = (tmp_path / "report").glob("*.html")
    assert html.read_text().count("data:image/png;base64,") >= 3  # plots and the best trial's samples, inlined
    assert any(key.endswith(html.name) and f"/{parent}/" in key for key in s3_server.keys(bucket, "mlflow/"))
    grid = tmp_path / "grid.png"
    assert sample.main(["--run-id", parent, "--tracking-uri", server.uri, "-n", "16", "--out", str(grid)]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cluster_yaml_postgresql_head_passes_rays_schema():
    """cluster.yaml's documented alternative, made as its comment says: the #PG lines uncommented, the sqlite
    `mlflow server` line deleted. It must still validate, and run the same server on PostgreSQL."""
    import re

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config
    from test_cluster import CLUSTER_YAML

    lines = [re.sub(r"^(\s*)#PG ", r"\1", line) for line in CLUSTER_YAML.read_text().splitlines()
             if "--backend-store-uri sqlite:" not in line]
    config = yaml.safe_load("\n".join(lines))
    validate_config(prepare_config(config))
    (server,) = [command for command in config["head_start_ray_commands"] if "mlflow server" in command]
    assert "--backend-store-uri 'postgresql:///mlflow?host=/var/run/postgresql'" in server and "--port 5000" in server
    assert "gan_tune[postgres]" in " ".join(config["head_setup_commands"])
