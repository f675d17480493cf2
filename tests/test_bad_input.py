"""Issue 9, the complete table of bad inputs: each goes through a real CLI in-process and must exit 2 with
one line on stderr naming the file or flag and the key, no traceback, no MLflow run and no Ray left running.

Some rows repeat a case of test_search.py on purpose (that file checks them with Ray forbidden); here each
row also checks the MLflow store and Ray's state, and the table is the one place listing every bad input.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient

from gan_tune import sample, search, train

SMOKE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"
SMOKE_BASE = yaml.safe_load(SMOKE.read_text())["base"]


def space_file(tmp_path, change):
    """The smoke space with top-level keys replaced (a dict) or text appended (a str), as tmp_path/bad.yaml."""
    path = tmp_path / "bad.yaml"
    if isinstance(change, str):
        path.write_text(SMOKE.read_text() + change)
    else:
        path.write_text(yaml.safe_dump({**yaml.safe_load(SMOKE.read_text()), **change}, sort_keys=False))
    return path


def search_case(change=None, *flags):
    """argv builder: search.main on a broken smoke variant (change) or the shipped smoke space, plus flags."""
    def argv(tmp_path):
        space = space_file(tmp_path, change) if change is not None else "smoke"
        return search.main, ["--space", str(space), "--storage-path", str(tmp_path / "rr"),
                             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *flags]
    return argv


def train_case(*flags):
    def argv(tmp_path):
        return train.main, ["--set", f"out_dir={tmp_path / 'runs'}", *flags]
    return argv


def sample_empty_run(tmp_path):
    """A run that exists but holds no generator (a trial's child run looks like this)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("empty"))
    client.set_terminated(run.info.run_id)
    return sample.main, ["--run-id", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "g.png")]


def sample_missing_run(tmp_path):
    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()  # an existing, empty store
    return sample.main, ["--run-id", "0123456789abcdef", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                         "--out", str(tmp_path / "g.png")]


def file_under_a_file(tmp_path):
    (tmp_path / "plain").write_text("a file, not a folder\n")
    return tmp_path / "plain" / "rr"


# id -> (argv builder, strings stderr must contain; "{tmp}" is tmp_path, "{space}" the broken space file)
CASES = {
    "malformed yaml": (search_case("metric: [fid\n"), ["{space}", "line 2"]),
    "unknown key": (search_case({"colour": "red"}), ["{space}", "colour"]),
    "wrong type": (search_case({"base": {**SMOKE_BASE, "batch_size": "big"}}), ["{space}", "base.batch_size"]),
    "lr <= 0 in a space": (search_case({"search": {"lr_d": {"loguniform": [0.0, 1.0e-3]}}}),
                           ["{space}", "search.lr_d"]),
    "lr <= 0 in train": (train_case("--set", "lr_d=-1.0e-4"), ["--set", "lr_d"]),
    "lr bounds reversed": (search_case({"search": {"lr_d": {"loguniform": [1.0e-3, 1.0e-5]}}}),
                           ["{space}", "search.lr_d", "low 0.001 > high 1e-05"]),
    "latent_dim 0": (train_case("--set", "latent_dim=0"), ["--set", "latent_dim"]),
    "latent_dim not an integer": (search_case({"base": {**SMOKE_BASE, "latent_dim": 1.5}}),
                                  ["{space}", "base.latent_dim"]),
    "unknown model": (search_case({"base": {**SMOKE_BASE, "model": "stylegan"}}), ["{space}", "base.model"]),
    "unknown scheduler": (search_case({"scheduler": {"type": "bohb"}}), ["{space}", "scheduler.type"]),
    "pbt without mutations": (search_case({"scheduler": {"type": "pbt", "perturbation_interval": 1}}),
                              ["{space}", "scheduler.hyperparam_mutations"]),
    "metric not reported": (search_case({"metric": "fid_score"}), ["{space}", "metric"]),
    "num_samples 0 in a space": (search_case({"num_samples": 0}), ["{space}", "num_samples"]),
    "num_samples 0 flag": (search_case(None, "--num-samples", "0"), ["num_samples"]),
    "unknown space": (lambda tmp_path: (search.main, ["--space", "no-such-space",
                                                      "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]),
                      ["--space", "no-such-space", "smoke", "balanced", "pbt"]),
    "space path missing": (lambda tmp_path: (search.main, ["--space", str(tmp_path / "gone" / "space.yaml"),
                                                           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]),
                           ["--space", "{tmp}/gone/space.yaml"]),
    "time budget soon": (search_case(None, "--time-budget", "soon"), ["command line", "time_budget", "soon"]),
    "storage path under a file": (lambda tmp_path: search_case(None, "--storage-path",
                                                               str(file_under_a_file(tmp_path)))(tmp_path),
                                  ["--storage-path", "{tmp}/plain"]),
    "tracking uri ftp": (search_case(None, "--tracking-uri", "ftp://x"), ["--tracking-uri", "ftp://x"]),
    "tracking uri dead server": (search_case(None, "--tracking-uri", "http://127.0.0.1:1"),
                                 ["--tracking-uri", "http://127.0.0.1:1"]),
    "address dead": (search_case(None, "--address", "127.0.0.1:1"), ["--address", "127.0.0.1:1"]),
    "address not host:port": (search_case(None, "--address", "nowhere"), ["--address", "nowhere"]),
    "gpus on a cpu cluster": (search_case(None, "--gpus-per-trial", "0.5"), ["--gpus-per-trial", "no GPU"]),
    "resume of no search": (search_case(None, "--resume", "--name", "never-ran"),
                            ["--resume", "{tmp}/rr/never-ran", "no study"]),
    "sample run without a model": (sample_empty_run, ["--run-id", "no logged generator"]),
    "sample unknown run": (sample_missing_run, ["--run-id", "0123456789abcdef", "no such run"]),
    "sample store missing": (lambda tmp_path: (sample.main, ["--run-id", "0123456789abcdef", "--tracking-uri",
                                                             f"sqlite:///{tmp_path}/none.db"]),
                             ["--tracking-uri", "{tmp}/none.db", "no such sqlite store"]),
    "train config missing": (train_case("--config", "/nonexistent/run.yaml"), ["/nonexistent/run.yaml", "not found"]),
    "train resume without checkpoint": (lambda tmp_path: train_case("--resume", str(tmp_path))(tmp_path),
                                        ["--resume", "checkpoint.pt", "not found"]),
}


def mlflow_runs(tmp_path):
    """Runs in the tmp store (0 when the file was never created)."""
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return 0
    client = MlflowClient(f"sqlite:///{db}")
    return sum(len(client.search_runs([exp.experiment_id])) for exp in client.search_experiments())


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(tmp_path, capsys, case):
    if case == "gpus on a cpu cluster" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    build, expected = CASES[case]
    main, argv = build(tmp_path)
    runs_before = mlflow_runs(tmp_path)  # the sample rows create one empty run first
    capsys.readouterr()  # drop what setting up the row printed (MLflow creating the store)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text.format(tmp=tmp_path, space=tmp_path / "bad.yaml") in lines[0], lines[0]
    assert mlflow_runs(tmp_path) == runs_before
    assert not ray.is_initialized()


@pytest.mark.parametrize("case", ["gpus on a cpu cluster", "resume of no search", "unknown scheduler"])
def test_bad_search_input_prints_exactly_one_line_from_a_fresh_process(tmp_path, case):
    """In a real shell nothing else reaches stderr: Ray, which logs its own start-up lines there, never starts."""
    if case == "gpus on a cpu cluster" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    main, argv = CASES[case][0](tmp_path)
    assert main is search.main
    done = subprocess.run([sys.executable, "-m", "gan_tune.search", *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
