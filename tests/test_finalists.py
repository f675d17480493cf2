"""Finalists: the kept checkpoints of the top trials scored again on more samples; the best by that is kept."""

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from ray import tune

from gan_tune.tracking import html_report, parent_run, store
from gan_tune.training import checkpoint, loop, step
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import BUNDLED, load_mnist
from gan_tune.tuning import finalists

SPACE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"
CPU = torch.device("cpu")
# two epochs on 5000 images take FID from ~990 (untrained) to ~300 on our scale
CFG = TrainConfig(model="balanced", width=0.25, latent_dim=16, batch_size=64, data_source=BUNDLED, subset=5000,
                  max_epochs=2, lr_d=5.0e-4, lr_g=5.0e-4, eval_every=0)
SAMPLES = 2000


def saved(gan: step.Gan, folder: Path, epoch: int) -> tune.Checkpoint:
    noise, generator = loop.fixed_noise(CFG, CPU), loop.make_generator(CFG, CPU)
    folder.mkdir(parents=True)
    checkpoint.write(checkpoint.state(gan, epoch, noise, generator, []), folder)
    return tune.Checkpoint.from_directory(str(folder))


def result(trial_id: str, kept: list[tuple[tune.Checkpoint, int, float]], path: Path) -> tune.Result:
    """A trial's Result as Tune hands it over: its kept checkpoints with the reports they were saved with."""
    config = {"model": "balanced", "width": 0.25, "latent_dim": 16, "lr_d": 5.0e-4}
    reports = [{"trial_id": trial_id, "epoch": epoch, "fid": fid, "fid_samples": 500, "config": config}
               for _, epoch, fid in kept]
    return tune.Result(metrics=reports[-1], checkpoint=kept[-1][0], error=None, path=str(path),
                       best_checkpoints=[(ckpt, rep) for (ckpt, _, _), rep in zip(kept, reports)])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Three trials whose reported few-sample scores lie: the untrained generators report the best FIDs,
    and the one generator trained for 2 epochs reports a worse one. Only the many-sample score tells."""
    tmp = tmp_path_factory.mktemp("finalists")
    data = load_mnist(BUNDLED, CFG.data_dir, CFG.subset)
    untrained = step.make_gan(CFG, CPU)
    trained = step.make_gan(CFG, CPU)
    generator = loop.make_generator(CFG, CPU)
    for _ in loop.fit(trained, data.images, generator):
        pass
    results = [
        result("a_00000", [(saved(untrained, tmp / "a1", 1), 1, 40.0), (saved(trained, tmp / "a2", 2), 2, 60.0)], tmp),
        result("b_00001", [(saved(untrained, tmp / "b1", 1), 1, 45.0)], tmp),
        result("c_00002", [(saved(trained, tmp / "c2", 2), 2, 500.0)], tmp),  # not a top-2 trial by its report
    ]
    return results, data, tmp


def test_rescoring_keeps_the_checkpoint_best_at_many_samples(prepared):
    results, data, _ = prepared
    ranked = finalists.rescore(results, "fid", "min", data, trials=2, samples=SAMPLES)
    assert [(f.trial_id, f.epoch) for f in ranked][0] == ("a_00000", 2)  # reported 60, yet the best generator
    assert {(f.trial_id, f.epoch) for f in ranked} == {("a_00000", 1), ("a_00000", 2), ("b_00001", 1)}  # c left out
    assert all(f.scores["fid_samples"] == SAMPLES for f in ranked)
    fids = [f.scores["fid"] for f in ranked]
    assert fids == sorted(fids) and fids[0] < fids[-1] / 2  # trained vs untrained: far apart
    assert ranked[0].reported["fid"] == 60.0 and ranked[0].config["latent_dim"] == 16


def test_rescoring_off_or_for_a_metric_that_is_no_sample_score(prepared):
    results, data, _ = prepared
    assert finalists.rescore(results, "fid", "min", data, trials=0, samples=SAMPLES) == []
    assert finalists.rescore(results, "d_acc", "max", data, trials=2, samples=SAMPLES) == []


def test_the_rescored_generator_and_both_scores_reach_mlflow_and_the_report(prepared):
    results, data, tmp = prepared
    best = finalists.rescore(results, "fid", "min", data, trials=2, samples=SAMPLES)[0]
    uri = f"sqlite:///{tmp}/mlflow.db"
    store.check_tracking(uri)
    parent = parent_run.start_search_run(uri, "finalists", "smoke", SPACE, {}, BUNDLED, "asha", "random")
    parent_run.finish_search_run(uri, parent, best.result, "fid", "min", chosen=(best.checkpoint, best.reported),
                                 rescored=best.scores)
    run = MlflowClient(uri).get_run(parent)
    assert run.data.tags["best.trial_id"] == "a_00000" and run.data.tags["best.epoch"] == "2"
    assert run.data.tags[parent_run.RESCORED_TAG] == str(SAMPLES)
    assert run.data.metrics["fid"] == 60.0 and run.data.metrics["fid_2k"] == pytest.approx(best.scores["fid"])
    assert run.data.metrics["coverage_2k"] == best.scores["coverage"]
    line = html_report.best_line(run, report_trials())
    assert f"on {SAMPLES} samples (60 when reported)" in line and "at epoch 2" in line, line


def report_trials():
    import pandas as pd

    return pd.DataFrame({"tags.trial_id": ["a_00000"], "tags.mlflow.runName": ["a_00000"]})
