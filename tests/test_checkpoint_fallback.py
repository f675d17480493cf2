"""Issue 9, corrupt checkpoint: an unreadable latest checkpoint falls back to an earlier one, or to a fresh start."""

import logging
import os
import signal
import subprocess
from pathlib import Path

import torch
from mlflow import MlflowClient
from ray import tune
from test_reliability import (
    GATE_EPOCH,
    TINY,
    epochs_reported,
    one_trial_search,
    wait_for_epoch,
    wait_for_gate,
)

from gan_tune.training import checkpoint, config, loop, step
from gan_tune.tuning import trainable

CPU = torch.device("cpu")


def save_checkpoint(folder: Path, cfg: config.TrainConfig, epoch: int) -> Path:
    """A real trial checkpoint, as trainable.report writes it: checkpoint.state with the trial id."""
    gan, generator = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    folder.mkdir(parents=True)
    history = [{"epoch": e} for e in range(1, epoch + 1)]
    return checkpoint.write(checkpoint.state(gan, epoch, loop.fixed_noise(cfg, CPU), generator, history, "t1"), folder)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a disk filled mid-write


def restore_latest(trial_dir: Path, cfg: config.TrainConfig) -> tuple[int, list, dict]:
    gan, generator = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    latest = tune.Checkpoint.from_directory(trial_dir / "checkpoint_000002")
    epoch, _, history, restored = trainable.restore_readable(gan, generator, latest, loop.fixed_noise(cfg, CPU))
    return epoch, history, restored


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    cfg = config.from_dict(TINY)
    save_checkpoint(tmp_path / "checkpoint_000001", cfg, epoch=1)
    truncate(latest := save_checkpoint(tmp_path / "checkpoint_000002", cfg, epoch=2))
    save_checkpoint(tmp_path / "checkpoint_000003", cfg, epoch=3)  # newer than the one handed over: never used
    (tmp_path / "samples").mkdir()  # trial files beside the checkpoints are not candidates
    with caplog.at_level(logging.WARNING, logger="gan_tune.tuning.trainable"):
        epoch, history, restored = restore_latest(tmp_path, cfg)
    assert epoch == 1 and len(history) == 1
    assert restored == {"restored_from": "t1", "restored_epoch": 1,
                        "restore_note": "unreadable checkpoint_000002; restored checkpoint_000001"}
    assert f"{latest}: unreadable checkpoint" in caplog.text
    assert "fell back to the previous checkpoint" in caplog.text and "checkpoint_000001" in caplog.text


def test_no_readable_checkpoint_starts_fresh(tmp_path, caplog):
    cfg = config.from_dict(TINY)
    for index in (1, 2):
        truncate(save_checkpoint(tmp_path / f"checkpoint_00000{index}", cfg, epoch=index))
    with caplog.at_level(logging.WARNING, logger="gan_tune.tuning.trainable"):
        epoch, history, restored = restore_latest(tmp_path, cfg)
    assert epoch == 0 and history == []
    assert restored == {"restored_from": "", "restored_epoch": 0,
                        "restore_note": "unreadable checkpoint_000002, checkpoint_000001; started fresh"}
    assert "starts fresh from epoch 0" in caplog.text


def test_a_readable_latest_checkpoint_is_restored_without_a_note(tmp_path):
    cfg = config.from_dict(TINY)
    save_checkpoint(tmp_path / "checkpoint_000002", cfg, epoch=2)
    epoch, _, restored = restore_latest(tmp_path, cfg)
    assert epoch == 2 and restored["restore_note"] == ""



EPOCHS = 4  # as in test_reliability's worker-kill test: with its rates the GAN stopper leaves the trial alone
STEPS = 10  # D steps per epoch; the fault gate holds the trial while the test breaks its checkpoint


def truncate_latest_and_kill(search: subprocess.Popen, exp_dir: Path, gate: Path) -> Path:
    """With the trial waiting at the fault gate, truncate its latest checkpoint and kill it: Tune retries from it."""
    worker = wait_for_gate(search, gate)
    wait_for_epoch(search, exp_dir, GATE_EPOCH, timeout_s=60)  # the driver has recorded the checkpoint
    # checkpoint_every 1 and fewer than CHECKPOINTS_KEPT epochs: epoch e is in checkpoint_{e-1}, none deleted
    latest, = exp_dir.glob(f"*/checkpoint_{GATE_EPOCH - 1:06d}/{checkpoint.FILE}")
    truncate(latest)
    os.kill(worker, signal.SIGKILL)
    return latest


def test_a_trial_restarted_on_a_truncated_checkpoint_falls_back_and_finishes(tmp_path):
    search, exp_dir, log, uri = one_trial_search(tmp_path, "truncate", STEPS, EPOCHS)
    try:
        latest = truncate_latest_and_kill(search, exp_dir, tmp_path / "gate")
        code = search.wait(timeout=240)
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
    output = log.read_text()
    assert code == 0, output[-3000:]
    frame = epochs_reported(exp_dir)
    assert frame["epoch"].max() == EPOCHS, frame[["epoch", "restored_epoch", "restore_note"]]
    fallback = frame[frame["restore_note"].notna()]
    assert len(fallback), frame[["epoch", "restored_epoch", "restore_note"]]
    first, truncated = fallback.iloc[0], latest.parent.name
    previous = f"checkpoint_{int(truncated.split('_')[1]) - 1:06d}"
    assert first["restore_note"] == f"unreadable {truncated}; restored {previous}"
    assert first["epoch"] == first["restored_epoch"] + 1 == int(truncated.split("_")[1]) + 1
    assert first["restored_from"] == first["trial_id"]
    assert f"{latest}: unreadable checkpoint" in output, output[-3000:]  # the worker's warning, forwarded by Ray
    (run,) = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()],
                                           "tags.run_kind = 'trial'")
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "loss_d")]
    assert sorted(steps) == list(range(1, EPOCHS + 1)), steps  # the re-trained epoch is one point, not two
    assert run.data.tags["restore_note"] == first["restore_note"]
