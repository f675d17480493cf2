import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import requests
import torch
import urllib3
from mlflow import MlflowClient
from PIL import Image
from ray import cloudpickle, tune

import gan_tune
from gan_tune.tracking import child_runs, parent_run, store
from gan_tune.training import artifacts
from gan_tune.training.config import ConfigError

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
SPACE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"
EPOCHS = 5


def grid_png() -> bytes:
    """A real sample grid's PNG bytes, made here once: the trainable below writes them without importing torch."""
    with tempfile.TemporaryDirectory() as folder:
        return artifacts.save_grid(torch.rand(8, 1, 28, 28) * 2 - 1, Path(folder, "grid.png")).read_bytes()


GRID_PNG = grid_png()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_line_error(check, uri) -> str:
    with pytest.raises(ConfigError) as err:
        check(uri)
    message = str(err.value)
    assert message.startswith("--tracking-uri: ") and "\n" not in message
    return message


@pytest.mark.parametrize("uri", ["htp://localhost:5000", "s3://bucket/store", "ftp://host/db"])
def test_check_rejects_an_unknown_scheme(uri):
    assert "unknown scheme" in one_line_error(store.check_tracking, uri)


def test_check_rejects_an_unreachable_server_after_one_connection_attempt(monkeypatch):
    """Fast because nothing is retried: one refused connection, no backoff to wait out (urllib3's connect counted)."""
    attempts, connect = [], urllib3.util.connection.create_connection

    def counted(address, *args, **kwargs):
        attempts.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counted)
    port = free_port()
    message = one_line_error(store.check_tracking, f"http://127.0.0.1:{port}")
    assert "no MLflow server answered" in message and attempts == [("127.0.0.1", port)], attempts


def test_check_rejects_an_unwritable_sqlite_path(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    assert "not writable" in one_line_error(store.check_tracking, f"sqlite:///{tmp_path}/a_file/mlflow.db")
    missing = f"sqlite:///{tmp_path}/missing/dir/mlflow.db"
    assert "not writable" in one_line_error(store.check_tracking, missing)
    assert "in-memory" in one_line_error(store.check_tracking, "sqlite://")
    (tmp_path / "garbage.db").write_bytes(b"not a database" * 100)
    garbage = f"sqlite:///{tmp_path}/garbage.db"
    assert "cannot open the sqlite store" in one_line_error(store.check_tracking, garbage)


def test_check_refuses_the_file_store_and_creates_a_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert "MLFLOW_ALLOW_FILE_STORE" in one_line_error(store.check_tracking, str(tmp_path / "mlruns"))
    store.check_tracking(f"sqlite:///{tmp_path}/mlflow.db")
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()  # store made and migrated


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert store.resolve_tracking_uri(None) == "http://env:5000"
    assert store.resolve_tracking_uri("sqlite:///flag.db") == "sqlite:///flag.db"


def test_fluent_calls_leave_the_process_tracking_uri_alone(monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI: a later search in this process must not inherit it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///outer.db")
    with store.using_tracking_uri("sqlite:///inner.db"):
        assert mlflow.get_tracking_uri() == "sqlite:///inner.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow.get_tracking_uri() == "sqlite:///outer.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with store.using_tracking_uri("sqlite:///inner.db"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ


def counting_trainable(config):
    """A cheap stand-in for the GAN trainable (no torch: 16 workers start fast): reports like it, writes its files."""
    for epoch in range(1, config["max_epochs"] + 1):
        if config["a"] == "crash" and epoch == 2:
            raise RuntimeError("crashed on purpose")
        Path("samples").mkdir(exist_ok=True)
        Path("samples", f"epoch_{epoch:03d}.png").write_bytes(GRID_PNG)
        Path("history.csv").write_text(f"epoch,loss_d\n{epoch},1.0\n")
        tune.report({"epoch": epoch, "fid": 100.0 / epoch, "loss_d": 1.0 + epoch, "balance": "balanced",
                     "restored_from": ""})
    Path("final_grid.png").write_bytes(GRID_PNG)


class ScriptedStopper(tune.Stopper):
    """Stops 'collapse' with a recorded reason, and 'cut' silently at epoch 2, as ASHA would."""

    def __init__(self):
        self.reasons = {}

    def __call__(self, trial_id, result):
        if result["epoch"] == 2 and result["config"]["a"] == "collapse":
            self.reasons[trial_id] = "mode collapse"
        return result["epoch"] == 2 and result["config"]["a"] in ("collapse", "cut")

    def stop_all(self):
        return False


def tracked_search(uri, storage, values, cpu, experiment="test"):
    """Run `counting_trainable` over config a in `values`, tracked under a new parent; returns (parent, callback)."""
    store.check_tracking(uri)
    parent = parent_run.start_search_run(uri, experiment, "smoke", SPACE,
                                         {"space": "smoke", "num_samples": len(values)}, "none", "asha", "grid")
    stopper = ScriptedStopper()
    callback = child_runs.TrackingCallback(uri, parent, EPOCHS, stopper.reasons, scheduler="asha")
    tuner = tune.Tuner(tune.with_resources(counting_trainable, {"cpu": cpu}),
                       param_space={"a": tune.grid_search(values), "max_epochs": EPOCHS},
                       run_config=tune.RunConfig(storage_path=str(storage), name="study", stop=stopper,
                                                 callbacks=[callback], verbose=0,
                                                 sync_config=tune.SyncConfig(sync_artifacts=True)))
    tuner.fit()
    return parent, callback


def children(client, parent):
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {run.data.params["a"]: run for run in runs}


def test_sixteen_concurrent_trials_on_sqlite_lose_no_metric(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    values = [f"t{i}" for i in range(16)]
    parent, callback = tracked_search(uri, tmp_path / "ray", values, cpu=0.1)  # all 16 run at once
    client = MlflowClient(uri)
    runs = children(client, parent)
    assert sorted(runs) == sorted(values) and not callback.failures
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
        for key in ("fid", "loss_d", "time_total_s"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (run.info.run_name, key, steps)


@pytest.fixture(scope="module", autouse=True)
def mlflow_server_process(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 at a free port, launched when the module starts (its ~30 s cold start
    overlaps the tests before the one that needs it) and stopped at the end; yields (process, uri, log)."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{folder}/server.db", "--artifacts-destination", str(folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(folder / "server.log", "w") as log:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey job workers: starts faster
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            yield server, f"http://127.0.0.1:{port}", folder / "server.log"
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the whole group: the CLI runs uvicorn as a child
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_server(mlflow_server_process):
    """The server's URI once GET /health answers."""
    server, uri, log = mlflow_server_process
    deadline = time.monotonic() + 120  # a cold start on a busy 2-core machine takes ~30 s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                return uri
        except requests.RequestException:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not start: {log.read_text()[-2000:]}")


def test_search_tracked_on_a_real_server(ray_local, tmp_path, mlflow_server):
    parent, callback = tracked_search(mlflow_server, tmp_path / "ray", ["ok", "collapse", "cut", "crash"], cpu=0.5,
                                      experiment="server-test")
    client = MlflowClient(mlflow_server)
    parent_record = client.get_run(parent)
    assert parent_record.data.tags["space"] == "smoke" and parent_record.data.tags["scheduler"] == "asha"
    assert {a.path for a in client.list_artifacts(parent)} == {"search_args.json", "space"}
    runs = children(client, parent)
    assert sorted(runs) == ["collapse", "crash", "cut", "ok"] and not callback.failures
    expected = {"ok": ("completed", EPOCHS, "FINISHED"), "collapse": ("mode collapse", 2, "FINISHED"),
                "cut": ("asha early stop", 2, "FINISHED"), "crash": ("error", 1, "FAILED")}
    for value, (reason, epochs, status) in expected.items():
        run = runs[value]
        assert (run.data.tags["stop_reason"], run.info.status) == (reason, status), value
        assert run.data.params["max_epochs"] == str(EPOCHS) and run.data.tags["balance"] == "balanced"
        history = client.get_metric_history(run.info.run_id, "fid")
        assert [(m.step, m.value) for m in history] == [(e, 100.0 / e) for e in range(1, epochs + 1)], value
        grids = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
        assert grids == {f"samples/epoch_{e:03d}.png" for e in range(1, epochs + 1)}, value
    assert "crashed on purpose" in runs["crash"].data.tags["error"]
    top = {a.path for a in client.list_artifacts(runs["ok"].info.run_id)}
    assert {"final_grid.png", "history.csv", "samples"} <= top
    local = Path(client.download_artifacts(runs["ok"].info.run_id, "final_grid.png", str(tmp_path)))
    assert local.read_bytes() == GRID_PNG and Image.open(local).size == (8 * 30 + 2, 30 + 2)  # 8 per row
    assert json.loads(parent_record.data.tags["trial_outcomes"]) == {
        "completed": 1, "mode collapse": 1, "asha early stop": 1, "error": 1}


def smoke_store(smoke_study):
    """The shared smoke search (conftest) tracks into mlflow.db beside its study folder: (client, uri, parent)."""
    code, exp_dir, out = smoke_study
    assert code == 0, out
    uri = f"sqlite:///{exp_dir.parent}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(store.DEFAULT_EXPERIMENT).experiment_id
    parents = client.search_runs([experiment], f"tags.`{parent_run.EXPERIMENT_PATH_TAG}` = '{exp_dir}'")
    assert len(parents) == 1
    return client, uri, parents[0]


def test_smoke_search_parent_run(smoke_study):
    client, _, parent = smoke_store(smoke_study)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and tags["space"] == "smoke" and tags["scheduler"] == "asha"
    assert tags["search_alg"] == "random" and tags["data_source"].startswith("mnist-test-10k-bundled")
    assert tags["gan_tune_version"] == gan_tune.__version__ and tags["best.trial_id"]
    # test_report may already have added its report to this shared study's parent run
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} - {"report"} == {"search_args.json", "space"}
    assert parent.data.params["best.lr_d"] and parent.data.metrics["fid"] > 0
    models = client.search_logged_models([parent.info.experiment_id],
                                         filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert [m.name for m in models] == [parent_run.MODEL_NAME]


def test_smoke_search_child_runs(smoke_study):
    client, _, parent = smoke_store(smoke_study)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(runs) == 3  # the smoke space's num_samples
    for run in runs:
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "fid")]
        assert epochs == list(range(1, len(epochs) + 1)) and epochs, run.info.run_name
        reason = run.data.tags["stop_reason"]
        assert reason in ("completed", "asha early stop", "diverged", "D dominates", "mode collapse")
        assert (reason == "completed") == (epochs[-1] == 2), (reason, epochs)  # smoke: max_epochs 2
        assert {"lr_d", "lr_g", "model", "seed"} <= set(run.data.params) and run.data.tags["balance"]
        for key in ("loss_d", "loss_g", "d_acc", "img_per_s", "mlflow_overhead_s"):
            assert key in run.data.metrics, key
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        grids = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
        assert {"final_grid.png", "progress.gif", "history.png", "history.csv", "samples"} <= files
        assert grids == {f"samples/epoch_{e:03d}.png" for e in epochs}


def test_a_resumed_search_logs_the_params_a_killed_driver_never_wrote(tmp_path):
    """A driver killed between a trial's create_run and its params left a run without params; --resume reuses
    the run (one per trial) and now logs them when the trial starts again, instead of leaving it bare."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store.check_tracking(uri)
    parent = parent_run.start_search_run(uri, "resume-test", "smoke", SPACE, {"space": "smoke"}, "none", "asha",
                                         "random")
    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    bare = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "trial_id": "t_00000"}).info.run_id
    done = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "trial_id": "t_00001"}).info.run_id
    client.log_param(done, "lr_d", "0.0002")
    callback = child_runs.TrackingCallback(uri, parent, max_epochs=2)
    callback.setup()

    class Trial:  # what the callback reads of Tune's Trial
        def __init__(self, trial_id, config):
            self.trial_id, self.config, self.path = trial_id, config, str(tmp_path / trial_id)

    callback.on_trial_start(0, [], Trial("t_00000", {"lr_d": 1.0e-4, "lr_g": 3.0e-4}))
    callback.on_trial_start(0, [], Trial("t_00001", {"lr_d": 5.0e-4}))  # a PBT-explored config: not logged again
    assert callback.failures == []
    assert client.get_run(bare).data.params == {"lr_d": "0.0001", "lr_g": "0.0003"}
    assert client.get_run(done).data.params == {"lr_d": "0.0002"}
    assert len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")) == 2  # reused, none made
