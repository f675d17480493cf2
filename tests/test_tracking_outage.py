"""The tracking server going away mid-search (issue #9), with a real `mlflow server` killed under a real search run
through the CLI: trials keep training, the outage is logged once, queued writes reach the server when it is back,
and writes it never took are saved in the study folder and replayed later."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from servers import MlflowServer, free_port
from test_reliability import wait_for_gate, wait_until

from gan_tune.tracking import store, write_queue
from gan_tune.tracking.__main__ import main as replay_main
from gan_tune.tuning import trainable

ROOT = Path(__file__).parents[1]
EXPERIMENT = "outage"
SEARCH_TIMEOUT_S = 480
TRIALS, EPOCHS = 2, 4  # the outages happen while trial _00000 waits at the fault gate after epoch 1


@pytest.fixture
def servers(tmp_path):
    """Makes `mlflow server`s on one store in tmp_path (a test kills and restarts them); kills every one at the end."""
    made = []

    def make() -> MlflowServer:
        folder = tmp_path / "server"
        made.append(MlflowServer(folder, f"sqlite:///{folder}/server.db", str(folder / "artifacts"), {}))
        return made[-1]

    yield make
    for server in made:
        server.stop()


@contextlib.contextmanager
def running_search(tmp_path: Path, uri: str, gate: Path | None = None) -> subprocess.Popen:
    search = start_search(tmp_path, uri, gate)
    try:
        yield search
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(search.pid, signal.SIGKILL)  # whatever a failed test left running, its Ray included


def start_search(tmp_path: Path, uri: str, gate: Path | None = None) -> subprocess.Popen:
    """`python -m gan_tune.search` on the smoke space with FIFO, so only the GAN stopper ends a trial early; with a
    gate, trial _00000 waits at the fault gate after epoch 1 (trainable.fault_gate) until the test releases it."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if gate is not None:
        env.update({trainable.FAULT_GATE_ENV: f"1:{gate}", trainable.FAULT_GATE_TRIAL_ENV: "_00000"})
    space = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    space["scheduler"] = {"type": "fifo"}
    space["base"]["fid_samples"] = 200  # the claims are about tracking: the fewest samples that still score
    space["finalists"] = {"trials": 0}
    (tmp_path / "outage.yaml").write_text(yaml.safe_dump(space))
    command = [sys.executable, "-m", "gan_tune.search", "--space", str(tmp_path / "outage.yaml"),
               "--num-samples", str(TRIALS), "--max-epochs", str(EPOCHS), "--storage-path", str(tmp_path / "ray"),
               "--name", "study", "--tracking-uri", uri, "--experiment", EXPERIMENT]
    with open(tmp_path / "search.out", "w") as out, open(tmp_path / "search.err", "w") as err:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, env=env, start_new_session=True)


def finish_search(search: subprocess.Popen, tmp_path: Path) -> str:
    """Wait for the search to exit 0; its stderr."""
    try:
        code = search.wait(timeout=SEARCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(search.pid, signal.SIGKILL)
        code = "timeout"
    err = (tmp_path / "search.err").read_text()
    assert code == 0, f"{code}\n{(tmp_path / 'search.out').read_text()[-3000:]}\n{err[-5000:]}"
    return err


def trial_runs(uri: str) -> list:
    with store.fail_fast_http():
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        return client.search_runs([experiment.experiment_id], "tags.run_kind = 'trial'") if experiment else []


def wait_for_metric(uri: str, trial: str, search: subprocess.Popen) -> None:
    """Until the child run of the trial whose id ends in `trial` has its first epoch's metrics on the server."""
    wait_until(lambda: any(run.data.metrics for run in trial_runs(uri) if run.data.tags["trial_id"].endswith(trial)),
               search, f"{trial}'s first metric reached the server", SEARCH_TIMEOUT_S)


def wait_for_line(tmp_path: Path, text: str, search: subprocess.Popen) -> None:
    """Until the search's stderr has `text` (e.g. the driver's one outage line)."""
    wait_until(lambda: text in (tmp_path / "search.err").read_text(), search, f"the search printed {text!r}",
               SEARCH_TIMEOUT_S)


def logged_steps(uri: str, run_id: str, key: str) -> list[int]:
    with store.fail_fast_http():
        return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def trained_epochs(run) -> list[int]:
    """The epochs Ray recorded for the run's trial, from the trial folder's progress.csv."""
    return pd.read_csv(Path(run.data.tags["ray.trial_path"]) / "progress.csv")["epoch"].tolist()


def assert_every_epoch_logged(uri: str) -> None:
    """Each trial's child run has every epoch Ray recorded, once, and its end."""
    runs = trial_runs(uri)
    assert len(runs) == TRIALS
    for run in runs:
        epochs = trained_epochs(run)
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) > 1, epochs  # trained on after the kill
        for key in ("loss_d", "fid", "img_per_s"):
            assert logged_steps(uri, run.info.run_id, key) == epochs, (run.info.run_name, key)
        assert run.info.status == "FINISHED" and run.data.tags["stop_reason"]


def assert_saved_or_logged(study: Path, uri: str, held: str) -> None:
    """Each epoch Ray recorded is in MLflow or in the saved file, once. The trial held at the gate while the server
    went (`held`) has exactly its first epoch in MLflow and the rest in the file. The other trial trained on its own
    clock, so how its epochs split between the two depends on the machine's speed: only their union is exact."""
    runs = {run.data.tags["trial_id"]: run for run in trial_runs(uri)}
    entries = [json.loads(line) for line in (study / write_queue.UNDELIVERED).read_text().splitlines()]
    for trial_path in study.glob("train_gan_*"):
        progress = pd.read_csv(trial_path / "progress.csv")
        trial_id, epochs = progress["trial_id"].iloc[0], progress["epoch"].tolist()
        assert epochs == list(range(1, len(epochs) + 1)), (trial_id, epochs)
        in_mlflow = logged_steps(uri, runs[trial_id].info.run_id, "loss_d") if trial_id in runs else []
        in_file = [m["step"] for e in entries if e["trial_id"] == trial_id and e["kind"] == "log_batch"
                   for m in e["payload"]["metrics"] if m["key"] == "loss_d"]
        assert sorted(in_mlflow + in_file) == epochs, (trial_id, in_mlflow, in_file)
        if trial_id.endswith(held):
            assert in_mlflow == [1] and in_file == epochs[1:] and len(epochs) > 1, (trial_id, in_mlflow, in_file)


def test_queued_writes_keep_their_order_and_find_their_run(tmp_path, caplog):
    """Writes to a port nobody listens on wait, in order, behind one warning; once a store answers they arrive,
    the metrics under the run that the queued create_run made."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store.check_tracking(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("queue")
    parent = client.create_run(experiment).info.run_id
    warnings = []
    writes = write_queue.PendingWrites(MlflowClient(f"http://127.0.0.1:{free_port()}"), {}, warnings.append)
    create = {"experiment_id": experiment, "run_name": "t1", "start_time": 1,
              "tags": {MLFLOW_PARENT_RUN_ID: parent, "trial_id": "t1"}}
    with store.fail_fast_http():
        writes.add("t1", "create_run", create)
        for step in (1, 2, 3):
            writes.add("t1", "log_batch", write_queue.batch([Metric("loss_d", step / 10, 1000 + step, step)]))
    assert [entry["kind"] for entry in writes.queue] == ["create_run"] + ["log_batch"] * 3
    assert len(warnings) == 1 and warnings[0].startswith("store unreachable")
    assert writes.next_try > time.monotonic()  # no retry before it is due

    writes.client = client  # the store is back
    writes.add("t1", "create_run", create)  # a create retried after a lost reply finds the run
    writes.add("t2", "log_batch", write_queue.batch())  # a trial whose run was never made: refused, not retried
    writes.drain(0)
    assert not writes.queue and writes.refused == 1 and len(warnings) == 2
    assert "store back, delivered 5 queued writes" in caplog.text
    run_id = writes.run_ids["t1"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss_d")] == [(1, .1), (2, .2), (3, .3)]
    assert len(client.search_runs([experiment], "tags.trial_id = 't1'")) == 1


@pytest.mark.parametrize("store", ["mlflow server", "postgresql"])
def test_writes_wait_for_a_store_that_comes_back(store, servers, request, tmp_path):
    """The store goes away mid-search: the `mlflow server` itself is killed, or PostgreSQL stops under a live
    server (cluster.yaml's PostgreSQL head, which answers 5xx until the database is back). It goes while trial
    _00000 waits at the fault gate after epoch 1; the gate opens, so _00000's next epoch meets the dead store
    however fast the machine (trial _00001 may or may not be done by then), and the store comes back once the
    driver has said it is unreachable. The writes wait in order in the driver's queue: every epoch of every trial
    reaches the store once, the outage and its end are each logged once, nothing is saved for later."""
    if store == "postgresql":
        server, _ = request.getfixturevalue("tracking_server")
        postgres = request.getfixturevalue("postgres")
        stop, start = postgres.stop, postgres.start
    else:
        server = servers()
        server.start()
        stop, start = server.stop, server.start
    gate = tmp_path / "gate"
    with running_search(tmp_path, server.uri, gate) as search:
        wait_for_gate(search, gate)
        stop()
        Path(f"{gate}.release").touch()  # trial _00000 trains on into the outage
        wait_for_line(tmp_path, "mlflow tracking: store unreachable", search)  # a write met the dead store
        start()  # until the store answers again; the search's end waits write_queue.FINAL_PATIENCE_S for it
        err = finish_search(search, tmp_path)
    assert err.count("mlflow tracking: store unreachable") == 1, err
    assert err.count("mlflow tracking: store back, delivered") == 1, err
    assert "writes never reached" not in err and not (tmp_path / "ray" / "study" / write_queue.UNDELIVERED).exists()
    assert_every_epoch_logged(server.uri)
    if store == "postgresql":  # the runs are in PostgreSQL's tables
        assert EXPERIMENT in {row[0] for row in postgres.query("SELECT name FROM experiments", "mlflow")}


def test_writes_a_gone_server_never_took_are_saved_and_replayed(servers, tmp_path):
    """The server dies for good while trial _00000 waits at the fault gate after its first epoch (whose metrics it
    already took); a server on the same store starts behind a port the search never hears of. Every later write is
    saved in the study folder, one line says where, and `python -m gan_tune.tracking replay` delivers it there."""
    server, back = servers(), servers()  # back: the same store behind a port the search never hears of
    server.start()
    gate = tmp_path / "gate"
    with running_search(tmp_path, server.uri, gate) as search:
        wait_for_gate(search, gate)
        wait_for_metric(server.uri, "_00000", search)
        server.stop()
        back.launch()
        Path(f"{gate}.release").touch()  # trial _00000 trains on: epochs 2.. meet the dead server
        err = finish_search(search, tmp_path)
    saved = tmp_path / "ray" / "study" / write_queue.UNDELIVERED
    assert f"writes never reached {server.uri}; they are saved in {saved}" in err, err
    assert err.count("mlflow tracking: store unreachable") == 1, err
    back.wait()
    assert_saved_or_logged(tmp_path / "ray" / "study", back.uri, held="_00000")
    assert replay_main(["replay", str(saved.parent), "--tracking-uri", back.uri]) == 0  # the study folder will do
    assert not saved.exists()
    assert_every_epoch_logged(back.uri)
    client = MlflowClient(back.uri)
    for run in trial_runs(back.uri):
        assert "final_grid.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FINISHED"
