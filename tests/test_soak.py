"""Issue 9, load: 32 smoke trials, 8 at a time on 2 CPUs, tracked into one sqlite MLflow store.

Checks what a long study on a small machine breaks first: metrics lost between Tune and MLflow
(every reported epoch of every trial must be in the trial's child run, once), sqlite's
"database is locked", and a driver whose memory grows with the number of trials.
Run it with: .venv/bin/pytest -m slow -s tests/test_soak.py
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from gan_tune.tuning.trainable import REPORTED_METRICS

SMOKE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"
TRIALS = 32
EPOCHS = 3  # the GAN stopper ends a trial at epoch 3 at the earliest (3 reports of D dominating; mode collapse after 3)
CPUS_PER_TRIAL = 0.25  # 8 trials at a time on the 2 CPUs Ray sees here
# Driver memory. While trials run, the driver keeps each trial's last results, Tune's trial objects and
# the MLflow client: a few MB for 32 trials (measured: +4..7 MB from the end of the first wave of 8 to the
# last trial). A leak per report or per trial (a sample grid, a checkpoint, an uploaded trial file is
# 0.1..2 MB) would add tens of MB over the 24 later trials, so steady growth is held under 50 MB.
# The wrap-up after the last trial (summary, best generator logged with mlflow.pytorch) is a one-off
# +70..190 MB measured; 300 MB bounds the whole run's peak above its first report.
STEADY_GROWTH_LIMIT_MB = 50
PEAK_GROWTH_LIMIT_MB = 300
SAMPLE_EVERY_S = 1.0


def rss_mb(pid: int) -> float | None:
    """Resident memory of `pid` from /proc (psutil is only vendored inside Ray); None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return None if kib is None else int(kib) / 1024  # a zombie has no VmRSS


def sample_driver_rss(search: subprocess.Popen, exp_dir: Path, timeout_s: float) -> pd.DataFrame:
    """The driver's RSS every second, from the first trial's first report until the search exits,
    with the number of trials finished by then (a leak grows with it; a warm-up does not)."""
    samples, start, deadline = [], time.monotonic(), time.monotonic() + timeout_s
    while search.poll() is None and time.monotonic() < deadline:
        started = samples or any(exp_dir.glob("*/progress.csv"))
        if started and (rss := rss_mb(search.pid)) is not None:
            finished = sum(1 for _ in exp_dir.glob(f"*/checkpoint_{EPOCHS - 1:06d}"))  # a trial's last epoch saved
            samples.append({"t_s": time.monotonic() - start, "rss_mb": rss, "finished": finished})
        time.sleep(SAMPLE_EVERY_S)
    return pd.DataFrame(samples)


def soak_space(tmp_path: Path) -> Path:
    """The smoke space at soak scale: FIFO, so no trial is stopped early and the step count is exact."""
    smoke = yaml.safe_load(SMOKE.read_text())
    space = tmp_path / "soak.yaml"
    space.write_text(yaml.safe_dump({**smoke, "base": {**smoke["base"], "fid_samples": 256}, "num_samples": TRIALS,
                                     "max_epochs": EPOCHS, "scheduler": {"type": "fifo"}, "time_budget": "60m"},
                                    sort_keys=False))
    return space


def logged_steps(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """Metric -> sorted steps of its history, for every per-epoch metric the child run holds."""
    keys = set(client.get_run(run_id).data.metrics) & set(REPORTED_METRICS)
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def check_child_runs(uri: str, exp_dir: Path) -> int:
    """Every trial's reported epochs are in its child run once, for every metric; returns the steps counted."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parent, = client.search_runs(experiments, "tags.run_kind = 'search'")
    children = client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == TRIALS
    counted = 0
    for run in children:
        progress, = exp_dir.glob(f"*{run.data.tags['trial_id']}*/progress.csv")
        epochs = sorted(pd.read_csv(progress)["epoch"])
        assert epochs == list(range(1, EPOCHS + 1)), progress
        steps = logged_steps(client, run.info.run_id)
        assert {"loss_d", "loss_g", "fid"} <= set(steps)
        assert all(logged == epochs for logged in steps.values()), (progress.parent.name, steps)
        counted += len(epochs)
    return counted


@pytest.mark.slow
def test_32_trials_8_at_a_time_lose_no_metric_and_keep_the_driver_bounded(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_dir = tmp_path / "rr" / "soak"
    out, err = tmp_path / "search.out", tmp_path / "search.err"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.monotonic()
    with open(out, "w") as stdout, open(err, "w") as stderr:
        search = subprocess.Popen([sys.executable, "-m", "gan_tune.search", "--space", str(soak_space(tmp_path)),
                                   "--cpus-per-trial", str(CPUS_PER_TRIAL), "--storage-path", str(tmp_path / "rr"),
                                   "--name", "soak", "--tracking-uri", uri], stdout=stdout, stderr=stderr, env=env)
    try:
        rss = sample_driver_rss(search, exp_dir, timeout_s=1800)
        code = search.wait(timeout=60)
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
    wall_s = time.monotonic() - start
    output = out.read_text() + err.read_text()
    assert code == 0, output[-3000:]
    assert "8 at a time" in output  # the plan line: 2 CPUs / 0.25 per trial
    steps = check_child_runs(uri, exp_dir)
    rss.to_csv(tmp_path / "driver_rss.csv", index=False)
    first, peak, final = rss["rss_mb"].iloc[0], rss["rss_mb"].max(), rss["rss_mb"].iloc[-1]
    running = rss[rss["finished"] < TRIALS]  # before the wrap-up
    steady = running["rss_mb"].iloc[-1] - running.loc[running["finished"] >= TRIALS // 4, "rss_mb"].iloc[0]
    print(f"\nsoak: {TRIALS} trials x {EPOCHS} epochs in {wall_s:.0f} s ({TRIALS / wall_s * 60:.1f} trials/min); "
          f"{steps} steps logged; driver RSS {first:.0f} MB at the first report, peak {peak:.0f} MB, "
          f"final {final:.0f} MB; {steady:+.1f} MB from trial {TRIALS // 4} to the last ({len(rss)} samples)")
    assert steps == TRIALS * EPOCHS
    assert "database is locked" not in output.lower()
    assert "mlflow tracking:" not in output, output  # the tracking callback's warning for a failed write
    assert steady < STEADY_GROWTH_LIMIT_MB and peak - first < PEAK_GROWTH_LIMIT_MB
