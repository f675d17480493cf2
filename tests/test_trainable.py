import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from ray import tune

from gan_tune.quality.measures import DIVERGED_SCORES
from gan_tune.training import loop
from gan_tune.training.checkpoint import FILE as CHECKPOINT_FILE
from gan_tune.training.config import ConfigError, TrainConfig
from gan_tune.training.data import BUNDLED, load_mnist
from gan_tune.tuning.trainable import (
    REPORTED_METRICS,
    epoch_metrics,
    train_gan,
    trial_config,
)


def test_trial_config_is_built_once_and_rejects_unknown_keys():
    cfg = trial_config({"lr_g": 1.0e-4, "lr_ratio": 3.0, "latent_dim": 64.0})  # Tune may hand back 64.0
    assert math.isclose(cfg.lr_d, 3.0e-4) and cfg.latent_dim == 64
    with pytest.raises(ConfigError, match="trial config: lr_dd"):
        trial_config({"lr_dd": 1.0e-4})


def test_scores_are_carried_between_evaluations_and_a_divergence_reports_the_worst():
    scores = {}
    scored = {"epoch": 1, "balance": "balanced", **{k: 1.0 for k in ("fid", "is", "coverage", "coverage_entropy",
                                                                      "mean_confidence", "fid_samples")}}
    assert epoch_metrics(scored, scores, {})["score_epoch"] == 1
    unscored = epoch_metrics({"epoch": 2, "balance": "balanced"}, scores, {})
    assert unscored["fid"] == 1.0 and unscored["score_epoch"] == 1
    diverged = epoch_metrics({"epoch": 3, "balance": "diverged", "loss_d": math.nan}, scores, {})
    assert diverged["fid"] == DIVERGED_SCORES["fid"] and math.isfinite(diverged["fid"])


@pytest.fixture(scope="module")
def smoke_trials(smoke_study):
    """Trial folder -> its reports, for the smoke study."""
    code, exp_dir, _ = smoke_study
    assert code == 0
    return {path.parent: pd.read_csv(path) for path in exp_dir.glob("*/progress.csv")}


def test_every_report_holds_every_metric(smoke_trials):
    assert len(smoke_trials) == 3
    for frame in smoke_trials.values():
        assert set(REPORTED_METRICS) <= set(frame.columns)
        assert frame["fid"].notna().all() and (frame["epoch"] == frame["training_iteration"]).all()
        assert (frame["data_source"] == "mnist-test-10k-bundled[:1000]").all() and frame["node_id"].notna().all()


def test_trial_folders_hold_pictures_tables_and_loadable_checkpoints(smoke_trials):
    for trial in smoke_trials:
        for name in ("final_grid.png", "history.csv", "history.png", "progress.gif", "samples/epoch_001.png"):
            assert (trial / name).is_file(), f"{trial.name} lacks {name}"
        checkpoints = sorted(trial.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
        assert checkpoints
        saved = torch.load(checkpoints[-1], weights_only=True)
        assert saved["trial_id"] in trial.name and saved["epoch"] >= 1


def test_checkpoints_follow_the_clock_when_checkpoint_every_s_is_set():
    cfg = TrainConfig(max_epochs=10, checkpoint_every_s=30.0)
    assert not loop.due(cfg, 3, since_checkpoint_s=29.9).checkpoint
    assert loop.due(cfg, 3, since_checkpoint_s=30.0).checkpoint
    assert loop.due(cfg, 10, since_checkpoint_s=0.1).checkpoint  # the last epoch always
    assert not loop.due(cfg, 3, diverged=True, since_checkpoint_s=99.0).checkpoint  # never a diverged state
    assert loop.due(cfg, 3).checkpoint  # without a clock (the single-run CLI): every checkpoint_every epochs
    assert not loop.due(TrainConfig(checkpoint_every=2), 3, since_checkpoint_s=99.0).checkpoint  # 0: by epochs


def test_a_trial_on_the_clock_checkpoints_only_at_the_end_and_reports_its_cost_split(ray_local, tmp_path):
    """An hour between checkpoints: a 3-epoch trial keeps one, its last epoch's; each report splits its time."""
    config = TrainConfig(width=0.25, batch_size=32, steps_per_epoch=2, max_epochs=3, data_source=BUNDLED,
                         subset=256, eval_every=2, fid_samples=100, sample_every=2, checkpoint_every_s=3600.0)
    data = load_mnist(BUNDLED, subset=256)
    result = tune.Tuner(tune.with_parameters(train_gan, data=data, quiet=True), param_space=config.to_dict(),
                        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()[0]
    assert result.error is None
    kept = sorted(Path(result.path).glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    assert [torch.load(path, weights_only=True)["epoch"] for path in kept] == [3]
    frame = result.metrics_dataframe
    assert (frame[["epoch_time_s", "files_s", "report_s"]] >= 0).all().all()
    assert (frame["score_s"] > 0).tolist() == [False, True, True]  # scored at epochs 2 and 3 (the last)
    assert frame["report_s"].iloc[0] == 0.0 and (frame["report_s"].iloc[1:] > 0).all()  # the previous report's
