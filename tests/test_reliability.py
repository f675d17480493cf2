"""Issue 9, faults: a truncated checkpoint, and a trial's worker process killed mid-search."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from ray import tune
from ray.tune.experiment import Experiment

from gan_tune import train
from gan_tune.training import checkpoint, config, loop, step
from gan_tune.training.data import DataError
from gan_tune.tuning import searchers, spaces, trainable

SMOKE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"
TINY = {"model": "balanced", "width": 0.25, "latent_dim": 32, "batch_size": 128, "max_epochs": 2,
        "data_source": "mnist-test-10k-bundled", "subset": 256, "eval_every": 0}


def truncated_checkpoint(folder: Path, cfg: config.TrainConfig) -> Path:
    """A real training state (checkpoint.state), cut to half its bytes (a disk filled mid-write)."""
    device = torch.device("cpu")
    gan, generator = step.make_gan(cfg, device), loop.make_generator(cfg, device)
    path = checkpoint.write(checkpoint.state(gan, 1, loop.fixed_noise(cfg, device), generator, []), folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_resume_of_a_truncated_checkpoint_exits_2_naming_the_file(tmp_path, capsys):
    cfg = config.from_dict({**TINY, "out_dir": str(tmp_path)})
    config.save(cfg, tmp_path / "config.yaml")
    path = truncated_checkpoint(tmp_path, cfg)
    assert train.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{path}: unreadable checkpoint" in err


def test_trainable_restore_of_a_truncated_checkpoint_names_the_file(tmp_path):
    cfg = config.from_dict(TINY)
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    path = truncated_checkpoint(folder, cfg)
    gan, generator = step.make_gan(cfg, torch.device("cpu")), loop.make_generator(cfg, torch.device("cpu"))
    with pytest.raises(DataError, match=f"{path.name}: unreadable checkpoint"):
        trainable.restore(gan, generator, tune.Checkpoint.from_directory(folder))


def epochs_reported(exp_dir: Path) -> pd.DataFrame | None:
    found = list(exp_dir.glob("*/progress.csv"))
    if not found:
        return None
    try:
        return pd.read_csv(found[0], dtype={"trial_id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError):  # Tune is writing it
        return None


def process_tree(root: int) -> dict[int, str]:
    """pid -> command line of every process below `root`, read from /proc (psutil is not installed)."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # the field after "(comm) state"
    below, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in below:
                below[child] = titles[child]
                frontier.append(child)
    return below


EPOCHS_KILL = 4  # the GAN stopper ends a smoke trial (coverage <= 2) after epoch 3 anyway
STEPS_KILL = 10  # D steps per epoch; the fault gate, not the epoch's length, keeps the trial alive for the kill
GATE_EPOCH = 2  # the trial waits after reporting (and checkpointing) this epoch until the test has injected its fault


def wait_until(ready: Callable[[], object], search: subprocess.Popen, what: str, timeout_s: float,
               every_s: float = 0.2) -> None:
    """Poll `ready` until it is true: the event a fault test waits for. Fails naming `what` when the search ends
    first, or when `timeout_s` passes (a hang guard: the event, not the clock, decides the outcome)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if search.poll() is not None:
            pytest.fail(f"the search ended (exit {search.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"not in {timeout_s} s: {what}")
        time.sleep(every_s)


def wait_for_gate(search: subprocess.Popen, gate: Path, timeout_s: float = 240) -> int:
    """The pid of the trial worker waiting at the fault gate (trainable.fault_gate) once it is there."""
    wait_until(gate.exists, search, "a trial reached the fault gate", timeout_s)
    pid = int(gate.read_text())
    assert pid in process_tree(search.pid), (pid, process_tree(search.pid))  # a worker of this search
    return pid


def held_at_once(gates: Path, search: subprocess.Popen, expected: int) -> list[Path]:
    """With GAN_TUNE_FAULT_GATE_TRIAL=* (a gate per trial): until `expected` trials wait at their gates at the same
    time (each holds its resources while it waits, so only trials Ray placed at once can all get there), then
    opens the gates; the gate files."""
    deadline = time.monotonic() + trainable.FAULT_GATE_TIMEOUT_S - 60  # before a held gate opens by itself
    while len(held := sorted(gates.parent.glob(f"{gates.name}-*[0-9]"))) < expected:
        assert search.poll() is None, f"the search ended (exit {search.returncode}) with {len(held)} trials held"
        assert time.monotonic() < deadline, f"only {len(held)} of {expected} trials were ever held at once"
        time.sleep(0.2)
    Path(f"{gates}.release").touch()
    return held


def wait_for_epoch(search: subprocess.Popen, exp_dir: Path, epoch: int, timeout_s: float) -> None:
    def reached() -> bool:
        frame = epochs_reported(exp_dir)
        return frame is not None and len(frame) > 0 and frame["epoch"].max() >= epoch

    wait_until(reached, search, f"a trial reached epoch {epoch}", timeout_s, every_s=0.5)


def slow_d_space(tmp_path: Path, name: str, steps: int, epochs: int, trials: int = 1) -> Path:
    """`trials` smoke trials (FIFO, each its own seed) of `epochs` epochs of `steps` D steps, a checkpoint each.

    A slow D, so the GAN stopper's "D dominates" and "mode collapse" leave every trial to run all its epochs."""
    smoke = yaml.safe_load(SMOKE.read_text())
    space = tmp_path / f"smoke_{name}.yaml"
    space.write_text(yaml.safe_dump({**smoke, "base": {**smoke["base"], "checkpoint_every": 1, "steps_per_epoch": steps},
                                     "search": {"lr_d": {"grid": [1.0e-4]}, "lr_g": {"grid": [5.0e-4]}},
                                     "search_alg": "grid", "num_samples": trials, "max_epochs": epochs,
                                     "scheduler": {"type": "fifo"}}, sort_keys=False))
    return space


def one_trial_search(tmp_path: Path, name: str, steps: int, epochs: int) -> tuple[subprocess.Popen, Path, Path, str]:
    """The CLI on one slow_d_space trial, in the background, its trial held at the fault gate after GATE_EPOCH.

    Returns (process, study folder, its output file, tracking URI); the gate file is tmp_path/gate."""
    space = slow_d_space(tmp_path, name, steps, epochs)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = tmp_path / "search.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_TRACKING_URI": uri,
           trainable.FAULT_GATE_ENV: f"{GATE_EPOCH}:{tmp_path / 'gate'}"}
    with open(log, "w") as out:
        search = subprocess.Popen([sys.executable, "-m", "gan_tune.search", "--space", str(space), "--storage-path",
                                   str(tmp_path / "rr"), "--name", name, "--tracking-uri", uri],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)
    return search, tmp_path / "rr" / name, log, uri


def test_a_killed_trial_worker_resumes_from_its_checkpoint_and_logs_each_epoch_once(tmp_path):
    search, exp_dir, log, uri = one_trial_search(tmp_path, "kill", STEPS_KILL, EPOCHS_KILL)
    try:
        worker = wait_for_gate(search, tmp_path / "gate")
        wait_for_epoch(search, exp_dir, GATE_EPOCH, timeout_s=60)  # the driver has recorded the checkpoint
        os.kill(worker, signal.SIGKILL)
        code = search.wait(timeout=240)
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
    assert code == 0, log.read_text()[-3000:]
    frame = epochs_reported(exp_dir)
    assert frame["epoch"].max() == EPOCHS_KILL, frame[["epoch", "restored_epoch"]]
    resumed = frame[frame["restored_epoch"] > 0]
    assert len(resumed), "the trial did not restart from a checkpoint"
    first = resumed.iloc[0]
    assert first["restored_from"] == first["trial_id"] and first["epoch"] == first["restored_epoch"] + 1

    client = MlflowClient(uri)
    trial_runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    "tags.run_kind = 'trial'")
    assert len(trial_runs) == 1
    steps = [m.step for m in client.get_metric_history(trial_runs[0].info.run_id, "loss_d")]
    assert sorted(steps) == list(range(1, EPOCHS_KILL + 1)), steps


def test_ctrl_c_stops_gracefully_and_the_printed_command_finishes_the_study(tmp_path):
    smoke = yaml.safe_load(SMOKE.read_text())
    space = tmp_path / "smoke_int.yaml"
    base = {**smoke["base"], "checkpoint_every": 1}
    space.write_text(yaml.safe_dump({**smoke, "base": base, "num_samples": 2, "max_epochs": 4,
                                     "scheduler": {"type": "fifo"}}, sort_keys=False))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_dir = tmp_path / "rr" / "int"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # one trial waits after epoch 1 until Ctrl-C has landed, so the study is unfinished however fast trials train
    gated = {**env, trainable.FAULT_GATE_ENV: f"1:{tmp_path / 'gate'}"}
    search = subprocess.Popen([sys.executable, "-m", "gan_tune.search", "--space", str(space), "--storage-path",
                               str(tmp_path / "rr"), "--name", "int", "--tracking-uri", uri],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=gated)
    try:
        wait_for_gate(search, tmp_path / "gate")
        wait_for_epoch(search, exp_dir, 1, timeout_s=60)
        search.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, _ = search.communicate(timeout=240)
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
    assert search.returncode == 0, out[-3000:]
    hints = [line.strip() for line in out.splitlines() if line.strip().startswith("python -m gan_tune.search")]
    assert len(hints) == 1, out[-4000:]
    hint = hints[0]
    assert hint == f"python -m gan_tune.search --resume {exp_dir}"  # the saved flags fill in the rest

    resumed = subprocess.run([sys.executable, *hint.split()[1:]], capture_output=True, text=True, env=env, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    finals = [pd.read_csv(path)["epoch"].max() for path in exp_dir.glob("*/progress.csv")]
    assert finals == [4, 4]  # both trials finished all epochs
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert len(client.search_runs(experiments, "tags.run_kind = 'trial'")) == 2  # no duplicate child runs
    assert len(client.search_runs(experiments, "tags.run_kind = 'search'")) == 1  # the parent run was reused


def study_outcome(exp_dir: Path, uri: str) -> dict:
    """What a finished study in a folder left (see outcome)."""
    files = [(pd.read_csv(path, dtype={"trial_id": str}), json.loads((path.parent / "params.json").read_text()))
             for path in exp_dir.glob("*/progress.csv")]
    return outcome(files, str(exp_dir), uri)


def outcome(files: list[tuple[pd.DataFrame, dict]], experiment_path: str, uri: str) -> dict:
    """Each trial's config and epochs in Tune (its progress.csv and params.json), its child runs, their configs
    and steps in MLflow, and the parent runs of the study at experiment_path."""
    trials = {frame["trial_id"].iloc[-1]: {"config": (params["lr_d"], params["lr_g"], params["seed"]),
                                           "epochs": sorted(frame["epoch"])} for frame, params in files}
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, f"tags.`ray.experiment_path` = '{experiment_path}'")
    children = client.search_runs(experiments, "tags.run_kind = 'trial'")
    steps = {run.data.tags["trial_id"]: [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")]
             for run in children}
    configs = sorted((float(run.data.params["lr_d"]), float(run.data.params["lr_g"]), int(run.data.params["seed"]))
                     for run in children)
    return {"trials": trials, "parents": len(parents), "children": len(children), "steps": steps, "configs": configs}


KILL_TRIALS, KILL_EPOCHS = 3, 4


def uninterrupted_configs(space_path: Path, seed: int = 0) -> list[tuple[float, float, int]]:
    """The (lr_d, lr_g, seed) of every trial an uninterrupted search of the space runs with --seed `seed`, sorted:
    drawn by the search algorithm and param_space the search builds (searchers.make_search_alg,
    searchers.param_space), without running a trial."""
    space = spaces.load_space(space_path)
    alg = searchers.make_search_alg(space, seed)
    alg.add_configurations([Experiment("uninterrupted", run=lambda config: None, num_samples=space.tune_num_samples,
                                       config=searchers.param_space(space, seed))])
    configs = []
    while (trial := alg.next_trial()) is not None:
        configs.append((trial.config["lr_d"], trial.config["lr_g"], trial.config["seed"]))
    return sorted(configs)


@pytest.fixture(scope="module")
def kill_study(tmp_path_factory) -> tuple[Path, list[tuple[float, float, int]]]:
    """The driver-kill study (slow_d_space: KILL_TRIALS FIFO trials of KILL_EPOCHS epochs) and the trial configs an
    uninterrupted search of it runs (uninterrupted_configs: the grid and the seed fix them)."""
    space = slow_d_space(tmp_path_factory.mktemp("kill_study"), "fifo", steps=10, epochs=KILL_EPOCHS,
                         trials=KILL_TRIALS)
    return space, uninterrupted_configs(space)


def finished_trial_stored(frames: list[pd.DataFrame], epochs: int) -> bool:
    """A trial's progress.csv in the study's storage has all its epochs: Tune's upload of it is done."""
    return any(len(frame) and frame["epoch"].max() == epochs for frame in frames)


def every_trial_run_has_params(uri: str, trials: int) -> bool:
    """Each trial's child run exists with its params. A SIGKILL between a run's create and its params would leave
    a run without params that --resume does not fill in (the resumed driver reuses the run as it finds it)."""
    try:
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.run_kind = 'trial'")
    except Exception:  # the driver holds the sqlite write lock
        return False
    return len(runs) == trials and all("lr_d" in run.data.params for run in runs)


def folder_frames(exp_dir: Path) -> list[pd.DataFrame]:
    frames = []
    for path in exp_dir.glob("*/progress.csv"):
        try:
            frames.append(pd.read_csv(path))
        except (pd.errors.EmptyDataError, pd.errors.ParserError):  # Tune is writing it
            pass
    return frames


def bucket_frames(s3_server, bucket: str, name: str) -> list[pd.DataFrame]:
    return [pd.read_csv(io.BytesIO(s3_server.read(bucket, key)))
            for key in s3_server.keys(bucket, f"studies/{name}/") if key.endswith("/progress.csv")]


def s3_study_outcome(s3_server, bucket: str, name: str, uri: str) -> dict:
    """study_outcome for a study in the bucket, its files read through the S3 API."""
    files = [(pd.read_csv(io.BytesIO(s3_server.read(bucket, key)), dtype={"trial_id": str}),
              json.loads(s3_server.read(bucket, key.replace("/progress.csv", "/params.json"))))
             for key in s3_server.keys(bucket, f"studies/{name}/") if key.endswith("/progress.csv")]
    return outcome(files, f"s3://{bucket}/studies/{name}", uri)


@pytest.mark.parametrize("storage", ["folder", "s3"])
def test_a_killed_driver_resumes_to_the_study_an_uninterrupted_search_runs(storage, kill_study, request, tmp_path):
    """SIGKILL of the driver mid-study, then `--resume FOLDER` or `--resume s3://BUCKET/studies/NAME` (the
    AWS_ENDPOINT_URL form) alone finishes it: one parent run, one child run per trial with every epoch once, and
    the trials of an uninterrupted search (kill_study's configs).

    The kill lands while one trial waits at the fault gate after epoch 2, another has finished with its
    progress.csv in the storage (Tune's state and trial folders travel in one upload that is not atomic: README,
    Reliability; a kill before that file is there could leave a finished trial without its Tune files), and the
    third has its child run with its params (every_trial_run_has_params)."""
    space, expected = kill_study
    env, name, gate = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, "killed", tmp_path / "gate"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    if storage == "s3":
        s3_server = request.getfixturevalue("s3_server")
        env.update(s3_server.env())
        bucket = s3_server.make_bucket("resume")
        root, location = f"s3://{bucket}/studies", f"s3://{bucket}/studies/{name}"
        frames = lambda: bucket_frames(s3_server, bucket, name)  # noqa: E731
    else:
        root, location = str(tmp_path / "rr"), str(tmp_path / "rr" / name)
        frames = lambda: folder_frames(Path(location))  # noqa: E731
    (tmp_path / "cwd").mkdir()
    driver = subprocess.Popen([sys.executable, "-m", "gan_tune.search", "--space", str(space), "--storage-path", root,
                               "--name", name, "--tracking-uri", uri], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**env, trainable.FAULT_GATE_ENV: f"2:{gate}"},
                              cwd=tmp_path / "cwd")
    try:
        wait_for_gate(driver, gate, timeout_s=300)  # the study cannot end before the kill
        wait_until(lambda: finished_trial_stored(frames(), KILL_EPOCHS)
                   and every_trial_run_has_params(uri, KILL_TRIALS),
                   driver, "a finished trial stored and every trial run with its params", 300, every_s=0.5)
        driver.send_signal(signal.SIGKILL)  # no handler runs: Tune's state is whatever it last saved
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    resumed = subprocess.run([sys.executable, "-m", "gan_tune.search", "--resume", location], capture_output=True,
                             text=True, env=env, cwd=tmp_path / "cwd", timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]

    killed = s3_study_outcome(s3_server, bucket, name, uri) if storage == "s3" else study_outcome(Path(location), uri)
    assert killed["parents"] == 1  # the parent run was reused
    assert killed["children"] == KILL_TRIALS and killed["configs"] == expected  # one child run per trial
    assert sorted(trial["config"] for trial in killed["trials"].values()) == expected  # and one Tune trial each
    for trial_id, trial in killed["trials"].items():
        assert trial["epochs"][-1] == KILL_EPOCHS, (trial_id, trial)  # every trial finished
        assert sorted(killed["steps"][trial_id]) == list(range(1, KILL_EPOCHS + 1)), (trial_id, killed["steps"])


def trial_seed(folder: Path) -> int:
    return json.loads((folder / "params.json").read_text())["seed"]


def test_a_trial_killed_more_often_than_max_failures_ends_errored_and_restart_errored_reruns_it(tmp_path):
    """README: a crashed trial restarts twice (FailureConfig(max_failures=2)); killed a third time it is errored,
    the search goes on; `--resume --restart-errored` then trains it again from scratch."""
    kills = 3  # the documented max_failures (2) + 1
    smoke = yaml.safe_load(SMOKE.read_text())
    space = tmp_path / "smoke_fail.yaml"
    # no checkpoint before the end, so every restart trains epoch 1 again and meets the re-armed gate
    space.write_text(yaml.safe_dump({**smoke, "base": {**smoke["base"], "checkpoint_every": 10, "steps_per_epoch": 4},
                                     "search": {"lr_d": {"grid": [1.0e-4]}, "lr_g": {"grid": [5.0e-4]}},
                                     "search_alg": "grid", "num_samples": 2, "max_epochs": 2,
                                     "scheduler": {"type": "fifo"}}, sort_keys=False))
    uri, gate, exp_dir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "gate", tmp_path / "rr" / "fail"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", trainable.FAULT_GATE_ENV: f"1:{gate}",
           trainable.FAULT_GATE_TRIAL_ENV: "_00000"}  # only the first trial is killed; the second trains on
    search = subprocess.Popen([sys.executable, "-m", "gan_tune.search", "--space", str(space), "--storage-path",
                               str(tmp_path / "rr"), "--name", "fail", "--tracking-uri", uri],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for kill in range(kills):
            worker = wait_for_gate(search, gate)
            if kill < kills - 1:  # re-arm the gate for the restarted trial; after the last kill the next trial runs free
                gate.unlink()
                Path(f"{gate}.claim").unlink()
            os.kill(worker, signal.SIGKILL)
        out, _ = search.communicate(timeout=300)
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
    assert search.returncode == 0, out[-3000:]  # one trial still finished: the search goes on and has a best
    assert "2 trials, 1 errored" in out, out[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.run_kind = 'trial'")
    outcome = sorted((run.info.status, run.data.tags["stop_reason"]) for run in runs)
    assert outcome == [("FAILED", "error"), ("FINISHED", "completed")], outcome
    first = {path.parent: pd.read_csv(path) for path in exp_dir.glob("*/progress.csv")}
    assert sorted(frame["epoch"].max() for frame in first.values()) == [1, 2]  # the errored trial never passed epoch 1
    errored, = [folder for folder, frame in first.items() if frame["epoch"].max() == 1]

    # README: `--resume --restart-errored` runs errored trials again from scratch (the gate stays claimed: no kill);
    # Ray gives the rerun a new trial id and folder, so MLflow gets a new child run beside the FAILED one
    resumed = subprocess.run([sys.executable, "-m", "gan_tune.search", "--resume", str(exp_dir), "--restart-errored"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert "2 trials, 0 errored" in resumed.stdout, resumed.stdout[-3000:]
    new_folders = {path.parent for path in exp_dir.glob("*/progress.csv")} - set(first)
    assert len(new_folders) == 1, (new_folders, out[-4000:], resumed.stdout[-3000:], resumed.stderr[-3000:])
    (rerun_folder,) = new_folders
    assert trial_seed(rerun_folder) == trial_seed(errored)  # the same trial config
    rerun = pd.read_csv(rerun_folder / "progress.csv")
    assert list(rerun["epoch"]) == [1, 2] and (rerun["restored_epoch"] == 0).all()  # from scratch, not a checkpoint
