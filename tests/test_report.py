import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from gan_tune import report
from gan_tune.quality.measures import DIVERGED_FID
from gan_tune.tracking import html_report, parent_run, store
from gan_tune.training import artifacts

WIDE = Path(__file__).parents[1] / "search_spaces" / "wide.yaml"
FAMILIES = ("mlp", "dcgan", "balanced")
EDGE_WARNING = "lr_d 0.000105 is at the low edge of its range [0.0001, 0.001]: widen search.lr_d past it in wide.yaml"
PBT_TRIAL = 8  # its rates change at its last epoch, as a PBT explore would change them


def pbt_factor(index, epoch):
    return 2.0 if index == PBT_TRIAL and epoch == 3 else 1.0


def log_trial(client, experiment, parent, index, family, fid, grid):
    """One child run shaped like TrackingCallback's: params, per-epoch metrics, stop reason, sample grid."""
    rng = np.random.default_rng(index)
    run = client.create_run(experiment, run_name=f"train_gan_{index:05d}", tags={
        "mlflow.parentRunId": parent, "trial_id": f"t{index}", "stop_reason": "completed"})
    run_id = run.info.run_id
    lr_d, lr_g = float(f"{10 ** rng.uniform(-5, -2):.3g}"), float(f"{10 ** rng.uniform(-5, -2):.3g}")
    # trial 0 searches lr_ratio as a ttur space does (no lr_d param); the others lr_d and lr_g
    params = {"model": family, "lr_g": str(lr_g), "seed": str(index),
              **({"lr_ratio": str(lr_d / lr_g)} if index == 0 else {"lr_d": str(lr_d)})}
    now = int(time.time() * 1000)
    epochs = 3
    fids = [fid * (1 + 0.5 * (epochs - e)) for e in range(1, epochs + 1)] if fid < DIVERGED_FID else [DIVERGED_FID] * 3
    metrics = [Metric("fid", v, now, e) for e, v in enumerate(fids, start=1)]
    metrics += [Metric("d_acc", float(rng.uniform(0.3, 0.9)), now, e) for e in range(1, epochs + 1)]
    metrics += [Metric("time_total_s", 10.0 * e, now, e) for e in range(1, epochs + 1)]
    # the rates in use, reported every epoch; a PBT explore doubles them before the last (best) epoch
    metrics += [Metric(key, rate * pbt_factor(index, e), now, e) for key, rate in (("lr_d", lr_d), ("lr_g", lr_g))
                for e in range(1, epochs + 1)]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag("stop_reason", "diverged" if fid >= DIVERGED_FID else "completed")])
    client.log_artifact(run_id, str(grid))
    client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def wide_search(tmp_path_factory):
    """A parent run with 9 trials over three model families, one diverged; returns (uri, parent id, fids)."""
    tmp_path = tmp_path_factory.mktemp("wide")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store.check_tracking(uri)
    parent = parent_run.start_search_run(uri, "report-test", "wide", WIDE, {"space": "wide"}, "mnist-test-10k-bundled",
                                       "hyperband", "random")
    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    grid = artifacts.save_grid(torch.rand(64, 1, 28, 28) * 2 - 1, tmp_path / "final_grid.png")
    fids = [40.0, 120.0, 75.0, 300.0, DIVERGED_FID, 55.0, 90.0, 210.0, 33.0]
    for index, fid in enumerate(fids):
        log_trial(client, experiment, parent, index, FAMILIES[index % 3], fid, grid)
    parent_run.finish_search_run(uri, parent, None, "fid", "min", edge_warnings=[EDGE_WARNING])
    return uri, parent, fids


def table_fids(page: str) -> list[str]:
    """The fid column of the trials table, in page order."""
    table = page.split('class="dataframe trials"', 1)[1].split("</table>", 1)[0]
    header = re.findall(r"<th>(.*?)</th>", table)
    rows = re.findall(r"<tr>\s*(<td>.*?)</tr>", table, flags=re.S)
    return [re.findall(r"<td>(.*?)</td>", row)[header.index("fid")] for row in rows]


def test_report_of_a_wide_search(wide_search, tmp_path, capsys):
    uri, parent, fids = wide_search
    assert report.main(["--parent-run", parent, "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    path = Path(capsys.readouterr().out.split("report: ", 1)[1].strip())
    page = path.read_text()
    assert table_fids(page) == [f"{f:.4g}" for f in sorted(f for f in fids if f < DIVERGED_FID)] + ["diverged"]
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert images == ["lr_d x lr_g coloured by FID", "FID per model family", "samples of train_gan_00008",
                      "FID and D accuracy per epoch of the top trials"]
    assert "src=\"http" not in page and "src=\"file" not in page  # one self-contained file
    assert f"<p class=warn>warning: {EDGE_WARNING}</p>" in page  # the search's boundary warning
    logged = [a.path for a in MlflowClient(uri).list_artifacts(parent, "report")]
    assert logged == [f"report/{path.name}"]


def test_report_finds_the_latest_search_of_an_experiment(wide_search, tmp_path, capsys):
    uri, parent, _ = wide_search
    assert report.main(["--experiment", "report-test", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    assert f"parent run {parent}" in next(tmp_path.glob("wide-*.html")).read_text()


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nope"], "--experiment: nope: no such experiment"),
    (["--parent-run", "0123456789abcdef"], "--parent-run: 0123456789abcdef: no such run"),
])
def test_report_bad_input_exits_2_with_one_line(wide_search, capsys, args, message):
    uri, _, _ = wide_search
    assert report.main([*args, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_report_refuses_a_missing_sqlite_file(tmp_path, capsys):
    assert report.main(["--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no such sqlite store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_report_of_the_smoke_search(smoke_study, tmp_path):
    code, exp_dir, out = smoke_study
    uri = f"sqlite:///{exp_dir.parent}/mlflow.db"
    parent = out.split("mlflow parent run: ", 1)[1].split()[0]
    assert report.main(["--parent-run", parent, "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    page = next(tmp_path.glob("*.html")).read_text()
    assert len(table_fids(page)) == 3
    images = re.findall(r'<img alt="([^"]+)"', page)
    assert images[0] == "lr_d x lr_g coloured by FID" and images[1].startswith("samples of ")
    assert "FID per model family" not in images  # smoke searches one family


def test_the_scatter_plots_the_rates_in_use_at_each_trials_best_epoch(wide_search):
    """A ttur trial has no lr_d param and a PBT trial's rates change: the report reads the reported rates."""
    uri, parent, fids = wide_search
    client = MlflowClient(uri)
    with store.using_tracking_uri(uri):  # load_trials searches with MLflow's fluent API, as report.main does
        trials = html_report.load_trials(client, client.get_run(parent)).set_index("tags.trial_id")
    assert trials.loc["t0", "lr_d"] == pytest.approx(float(trials.loc["t0", "params.lr_ratio"])
                                                      * float(trials.loc["t0", "params.lr_g"]), rel=1e-6)
    pbt = trials.loc[f"t{PBT_TRIAL}"]
    assert pbt["lr_d"] == pytest.approx(2 * float(pbt["params.lr_d"]))  # the best epoch (3) used the explored rate
    assert pbt["lr_g"] == pytest.approx(2 * float(pbt["params.lr_g"]))
    assert trials["lr_d"].notna().all() and trials["lr_g"].notna().all()
