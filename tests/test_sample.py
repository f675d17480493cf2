import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from ray import tune

from gan_tune import sample
from gan_tune.tracking import logged_model, parent_run, store
from gan_tune.training import checkpoint, loop, step
from gan_tune.training.config import TrainConfig

SPACE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"


def checkpoint_of(cfg: TrainConfig, folder: Path, epoch: int) -> tune.Checkpoint:
    """A trial checkpoint as the trainable writes it: checkpoint.state() in checkpoint.pt."""
    gan = step.make_gan(cfg, torch.device("cpu"))
    noise, generator = loop.fixed_noise(cfg, gan.device), loop.make_generator(cfg, gan.device)
    folder.mkdir(parents=True)
    checkpoint.write(checkpoint.state(gan, epoch, noise, generator, []), folder)
    return tune.Checkpoint.from_directory(str(folder))


@pytest.fixture(scope="module")
def logged_search(tmp_path_factory):
    """A parent run finished with a real Result: the best of two kept checkpoints is logged as the generator."""
    tmp_path = tmp_path_factory.mktemp("sample")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store.check_tracking(uri)
    parent = parent_run.start_search_run(uri, "sample-test", "smoke", SPACE, {"space": "smoke"}, "none", "fifo",
                                         "random")
    cfg = TrainConfig(model="balanced", width=0.25, latent_dim=16)
    early, late = checkpoint_of(cfg, tmp_path / "ckpt1", 1), checkpoint_of(cfg, tmp_path / "ckpt2", 2)
    config = {"model": "balanced", "width": 0.25, "latent_dim": 16, "lr_d": 2.0e-4}
    metrics = {"epoch": 2, "fid": 90.0, "trial_id": "abc_00001", "balance": "balanced", "config": config}
    result = tune.Result(metrics=metrics, checkpoint=late, error=None, path=str(tmp_path),
                         best_checkpoints=[(early, {**metrics, "epoch": 1, "fid": 80.0}), (late, metrics)])
    parent_run.finish_search_run(uri, parent, result, "fid", "min")
    return uri, parent


def test_finish_search_run_records_the_best_checkpoint(logged_search):
    uri, parent = logged_search
    run = MlflowClient(uri).get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.tags["best.trial_id"] == "abc_00001" and run.data.tags["best.epoch"] == "1"  # fid 80 < 90
    assert run.data.metrics["fid"] == 80.0 and run.data.params["best.lr_d"] == "0.0002"


def test_sample_writes_a_grid_from_the_logged_generator(logged_search, tmp_path, capsys):
    uri, parent = logged_search
    out = tmp_path / "grid.png"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    assert sample.main(["--run-id", parent, "-n", "16", "--out", str(out), "--tracking-uri", uri]) == 0
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # later searches in this process keep their default
    assert Image.open(out).size == (8 * 30 + 2, 2 * 30 + 2)  # 8 per row, 28 px + 2 px padding
    model_uri = capsys.readouterr().out.split("samples from ", 1)[1].split(":", 2)[:2]
    assert sample.main(["--model-uri", ":".join(model_uri), "-n", "8", "--out", str(out), "--tracking-uri", uri]) == 0


def test_sample_writes_the_raw_images_as_arrays(logged_search, tmp_path):
    """.npy: uint8 (N, 28, 28) as MNIST stores digits; .npz: the same array with the seed and model URI; the same
    seed gives the same images as the grid's."""
    uri, parent = logged_search
    npy, npz = tmp_path / "samples.npy", tmp_path / "samples.npz"
    assert sample.main(["--run-id", parent, "-n", "12", "--seed", "3", "--out", str(npy), "--tracking-uri", uri]) == 0
    assert sample.main(["--run-id", parent, "-n", "12", "--seed", "3", "--out", str(npz), "--tracking-uri", uri]) == 0
    images = np.load(npy)
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8 and images.max() > images.min()
    with np.load(npz) as saved:
        assert (saved["images"] == images).all() and int(saved["seed"]) == 3
        assert str(saved["model_uri"]).startswith("models:/")
    other = tmp_path / "other.npy"
    assert sample.main(["--run-id", parent, "-n", "12", "--seed", "4", "--out", str(other), "--tracking-uri", uri]) == 0
    assert (np.load(other) != images).any()


@pytest.mark.parametrize("args, message", [
    (["--run-id", "0123456789abcdef"], "--run-id: 0123456789abcdef: no such run"),
    (["-n", "0", "--run-id", "x"], "-n: 0: must be >= 1"),
    (["--model-uri", "models:/m-doesnotexist"], "--model-uri: models:/m-doesnotexist: cannot load a model"),
    (["--run-id", "x", "--out", "grid.jpg"], "--out: grid.jpg: unknown format .jpg (use .png, .npy, .npz)"),
    (["--run-id", "x", "--out", "/no/such/folder/s.npz"], "--out: /no/such/folder/s.npz: /no/such/folder is not a folder"),
])
def test_sample_bad_input_exits_2_with_one_line(logged_search, capsys, args, message):
    uri, _ = logged_search
    try:
        code = sample.main([*args, "--tracking-uri", uri])
    except SystemExit as exit_:  # the parser's own errors (-n and --out are checked by their argparse types)
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_run_without_a_model_exits_2(logged_search, capsys):
    uri, parent = logged_search
    client = MlflowClient(uri)
    child = client.create_run(client.get_run(parent).info.experiment_id, tags={"mlflow.parentRunId": parent})
    assert sample.main(["--run-id", child.info.run_id, "--tracking-uri", uri]) == 2
    assert "has no logged generator model" in capsys.readouterr().err


def test_sample_from_the_smoke_search(smoke_study, tmp_path):
    code, exp_dir, out = smoke_study
    uri = f"sqlite:///{exp_dir.parent}/mlflow.db"
    parent = out.split("mlflow parent run: ", 1)[1].split()[0]
    assert sample.main(["--run-id", parent, "--tracking-uri", uri, "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size == (8 * 30 + 2, 8 * 30 + 2)


def test_an_unreadable_checkpoint_still_ends_the_parent_run(logged_search, tmp_path, capsys):
    uri, _ = logged_search
    parent = parent_run.start_search_run(uri, "sample-test", "smoke", SPACE, {}, "none", "fifo", "random")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / checkpoint.FILE).write_bytes(b"not a checkpoint")
    result = tune.Result(metrics={"trial_id": "t1", "fid": 50.0, "config": {}}, error=None, path=str(tmp_path),
                         checkpoint=tune.Checkpoint.from_directory(str(tmp_path / "ckpt")))
    parent_run.finish_search_run(uri, parent, result, "fid", "min")
    run = MlflowClient(uri).get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["best.trial_id"] == "t1" and run.data.tags["tracking_error"]
    assert "could not record the best trial" in capsys.readouterr().err


def test_a_model_logged_on_a_gpu_machine_validates_and_loads_on_the_cpu(tmp_path, monkeypatch, caplog):
    """On a GPU machine MLflow validated the CPU-exported pt2 program on CUDA and printed "can't be loaded on
    'cuda' device" (issue 23). Here torch reports a GPU that is not there, which is all MLflow reads."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store.check_tracking(uri)
    parent = parent_run.start_search_run(uri, "gpu-log", "smoke", SPACE, {"space": "smoke"}, "none", "fifo", "random")
    best = checkpoint_of(TrainConfig(model="balanced", width=0.25, latent_dim=16), tmp_path / "ckpt", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level("WARNING"):
        parent_run.log_generator(uri, parent, best)
    assert "can't be loaded on 'cuda'" not in caplog.text and "Failed to validate" not in caplog.text
    assert "MLFLOW_DEFAULT_PREDICTION_DEVICE" not in os.environ  # scoped to the logging
    model_uri = f"runs:/{parent}/{parent_run.MODEL_NAME}"
    with store.using_tracking_uri(uri):
        g = logged_model.load_generator(model_uri)  # what `python -m gan_tune.sample` loads, on any machine
        pyfunc = mlflow.pyfunc.load_model(model_uri, model_config={"device": "cpu"})  # README: pyfunc on a GPU host
    z = torch.randn(3, 16)
    assert g(z).shape == (3, 1, 28, 28) and pyfunc.predict(z.numpy()).shape == (3, 1, 28, 28)
