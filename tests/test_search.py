import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from ray import tune

from gan_tune import search, train
from gan_tune.training.config import load as load_config
from gan_tune.tuning import (
    cluster,
    console,
    space_values,
    spaces,
    study_storage,
    summary,
    trainable,
    tuner,
)

SMOKE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"


def smoke_variant(tmp_path, name, **changes):
    """The smoke space with top-level keys replaced, written to tmp_path/NAME.yaml."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(SMOKE.read_text()), **changes}, sort_keys=False))
    return path


def run_search(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = search.main([str(arg) for arg in argv])
    return code, out.getvalue()


def trial_frames(exp_dir):
    """trial_id -> that trial's reports. progress.csv, not result.json: Ray's JSON logger drops the
    result on which PBT exploits (it pauses the trial before the loggers see the result)."""
    frames = [pd.read_csv(path, dtype={"trial_id": str}) for path in Path(exp_dir).glob("*/progress.csv")]
    return {frame["trial_id"].iloc[0]: frame for frame in frames}


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if search.main gets as far as starting Ray."""
    def refuse(address):
        raise AssertionError("Ray was started before the input was validated")
    monkeypatch.setattr(search, "start_ray", refuse)


BAD_SPACES = [
    ("metric: [fid\n", "line"),  # YAML syntax error, with its line
    ({"colour": "red"}, "colour"),
    ({"search": {"lr_d": {"normal": [0.0, 1.0]}}}, "search.lr_d"),
    ({"search": {"lr_d": {"loguniform": [1.0e-3, 1.0e-5]}}}, "search.lr_d: low 0.001 > high 1e-05"),
    ({"search": {"lr_d": {"loguniform": ["1e-5", 1.0e-3]}}}, "search.lr_d"),  # PyYAML reads 1e-5 as a string
    ({"scheduler": {"type": "bohb"}}, "scheduler.type"),
    ({"search_alg": "bayesopt"}, "search_alg"),
    ({"base": {**yaml.safe_load(SMOKE.read_text())["base"], "model": "stylegan"}}, "base.model"),
    ({"search": {"model": {"choice": ["dcgan", "stylegan"]}}}, "search.model"),
    ({"metric": "fid_score"}, "metric"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 1}}, "scheduler.hyperparam_mutations"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 1,
                    "hyperparam_mutations": {"latent_dim": {"choice": [32, 64]}}}}, "hyperparam_mutations.latent_dim"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 1,
                    "hyperparam_mutations": {"model": {"choice": ["mlp", "dcgan"]}}}}, "hyperparam_mutations.model"),
    ({"num_samples": 0}, "num_samples"),
    ({"time_budget": "soon"}, "time_budget"),
]


@pytest.mark.parametrize("change, key", BAD_SPACES, ids=[key for _, key in BAD_SPACES])
def test_bad_space_exits_2_naming_file_and_key_before_ray_starts(tmp_path, capsys, no_ray, change, key):
    if isinstance(change, str):
        path = tmp_path / "broken.yaml"
        path.write_text(SMOKE.read_text() + change)
    else:
        path = smoke_variant(tmp_path, "broken", **change)
    assert search.main(["--space", str(path)]) == 2
    err = capsys.readouterr().err
    assert key in err and str(path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, key", [
    (["--space", "no-such-space"], "smoke"),  # lists the known names
    (["--space", "smoke", "--time-budget", "15x"], "--time-budget"),
    (["--space", "smoke", "--num-samples", "0"], "--num-samples"),
    (["--space", "smoke", "--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--space", "smoke", "--resume"], "--name"),
])
def test_bad_flags_exit_2_before_ray_starts(capsys, no_ray, argv, key):
    try:
        code = search.main(argv)
    except SystemExit as exit_:  # the parser's own errors: counts, budgets and CPUs have argparse types
        code = exit_.code
    assert code == 2
    assert key in capsys.readouterr().err


def test_list_spaces_names_the_shipped_spaces(capsys):
    assert search.main(["--list-spaces"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("balanced", "ttur", "pbt", "wide", "smoke", "cohort"))


def test_the_installed_console_script_lists_the_shipped_spaces(tmp_path):
    """pyproject's [project.scripts]: gan-tune-search sits beside the venv's python and, run outside the checkout,
    finds the spaces inside the installed package."""
    done = subprocess.run([str(Path(sys.executable).parent / "gan-tune-search"), "--list-spaces"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ("balanced", "ttur", "pbt", "wide", "smoke", "cohort"))


def test_gpus_requested_on_a_cpu_cluster_exit_2_without_hanging(ray_local, tmp_path, capsys):
    if ray_local.cluster_resources().get("GPU", 0):
        pytest.skip("this cluster has a GPU")
    assert search.main(["--space", "smoke", "--gpus-per-trial", "0.5", "--storage-path", str(tmp_path)]) == 2
    assert "no GPU" in capsys.readouterr().err


def test_smoke_search_writes_a_best_config_that_train_accepts(smoke_study, tmp_path):
    code, exp_dir, out = smoke_study
    assert code == 0
    best = exp_dir / study_storage.BEST_CONFIG
    assert f"best config: {best}" in out and "best trial" in out
    # time to quality: when the best score arrived, within the smoke search's minute or two
    minutes, seconds = map(int, re.search(r"best trial .*, reported (\d+) min (\d+) s into the search", out).groups())
    assert 0 < minutes * 60 + seconds < 600
    assert re.search(r"results in .* \((\d+\.\d) MiB written\)", out)  # the disk volume a search used
    cfg = load_config(best)
    assert cfg.width == 0.25 and cfg.subset == 1000 and 1.0e-4 <= cfg.lr_d <= 1.0e-3
    assert train.main(["--config", str(best), "--set", "max_epochs=1", "--set", f"out_dir={tmp_path}",
                       "--set", "eval_every=0"]) == 0
    assert list(tmp_path.glob("*/final_grid.png"))


def test_smoke_search_rescored_its_finalists_and_kept_the_best_of_them(smoke_study):
    code, exp_dir, out = smoke_study
    assert code == 0
    # smoke.yaml: finalists {trials: 2, samples: 1000}; trials were scored on 500 samples
    assert re.search(r"finalists: \d+ kept checkpoints of the top 2 trials scored again on 1000 samples", out), out
    rows = re.findall(r"^  (\w+_\d+)\s+(\d+)\s+([\d.e+]+)\s+([\d.e+]+)\s+\d+$", out, re.MULTILINE)
    assert rows and [float(r[3]) for r in rows] == sorted(float(r[3]) for r in rows)  # best first by the new score
    trial, epoch = rows[0][0], rows[0][1]
    assert re.search(rf"best trial {trial}: fid [\d.]+ on 1000 samples \([\d.]+ on 500 when reported\) "
                     rf"at epoch {epoch},", out), out
    assert load_config(exp_dir / study_storage.BEST_CONFIG).max_epochs == int(epoch)  # the kept checkpoint's epoch


def test_a_worker_trains_the_trials_after_its_first_in_the_same_process(smoke_study):
    """reuse_actors: the smoke search's third trial waits for a slot and runs in a finished trial's worker
    (Tune reports each result's `pid`), so a worker's start-up (process, imports, CUDA context, the cached
    classifier) is paid once. With reuse_actors=False every trial gets a process of its own."""
    code, exp_dir, _ = smoke_study
    pids = {csv.parent.name: set(pd.read_csv(csv)["pid"]) for csv in exp_dir.glob("train_gan_*/progress.csv")}
    assert code == 0 and len(pids) == 3 and all(len(p) == 1 for p in pids.values()), pids
    assert len(set.union(*pids.values())) == 2, pids  # two slots (one CPU each on two), two processes


def test_a_search_without_num_samples_starts_trials_until_its_budget(ray_local, tmp_path, capfd):
    """Trials that end early free their slots: new ones start until the budget ends, not after the first two.
    The trials still queued at the end are counted as never started, without Tune's FileNotFoundError list."""
    base = {**yaml.safe_load(SMOKE.read_text())["base"], "fid_samples": 200}
    space = yaml.safe_load(SMOKE.read_text())
    del space["num_samples"]
    path = tmp_path / "until_budget.yaml"
    path.write_text(yaml.safe_dump({**space, "base": base, "max_epochs": 1, "scheduler": {"type": "fifo"},
                                    "time_budget": "40s", "finalists": {"trials": 0}}))
    code, out = run_search("--space", path, "--storage-path", tmp_path / "rr", "--name", "budget",
                           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert code == 0, out
    assert "new trials until the budget ends, each up to 1 epochs" in out
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"trial \w+ started: ", line)]
    stops = [i for i, line in enumerate(lines) if re.match(r"trial \w+ stopped after epoch 1: ", line)]
    assert stops and starts[-1] > stops[0], out  # a slot the first trial to end freed got a new trial
    used, ran = re.search(r"budget: (\S+) of 40s \(\d+%\), (\d+) trials ran", out).groups()
    assert int(ran) == len(trial_frames(tmp_path / "rr" / "budget")) and space_values.parse_duration(used, "", "") >= 30
    queued = re.search(r"\((\d+) more never reported", out)
    assert not queued or int(queued.group(1)) <= 4, out  # one queued per slot plus the two cut, not 200 ahead
    assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ  # the next search in this process decides for itself
    # one queued trial per slot is always waiting when the budget ends
    assert re.search(r"^\d+ of \d+ trials were still training and [12] never started when the search ended", out,
                     flags=re.M), out
    assert "Failed to fetch metrics" not in capfd.readouterr().err


def test_tunes_warning_about_trials_without_files_shows_only_when_one_of_them_ran():
    lines = console.TrialLines([], "fid", {})
    lines.started = {"ab12c_00000"}
    logger = logging.getLogger(console.RESULTS_LOGGER)
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    missing = "- train_gan_{}: FileNotFoundError('Could not fetch metrics for train_gan_{}: ...')"
    try:
        with lines.quiet_unstarted():
            logger.warning("Failed to fetch metrics for 1 trial(s):\n" + missing.format("ab12c_00001", "ab12c_00001"))
            logger.warning("Failed to fetch metrics for 1 trial(s):\n" + missing.format("ab12c_00000", "ab12c_00000"))
            logger.warning("another warning")
        logger.warning("Failed to fetch metrics for 1 trial(s):\n" + missing.format("ab12c_00001", "ab12c_00001"))
    finally:
        logger.removeHandler(handler)
    shown = [record.getMessage() for record in seen]
    assert len(shown) == 3 and "ab12c_00000" in shown[0] and shown[1] == "another warning", shown  # after fit: all


@pytest.mark.parametrize("reported, outcomes, line", [
    ("t0 t1", {"t0": "search ended", "t1": "search ended"}, "2 of 4 trials were still training and 2 never started"),
    ("t0 t1 t2 t3", {"t0": "search ended", "t1": "completed", "t2": "search ended", "t3": "asha"},
     "2 of 4 trials were still training when"),
    ("t0 t1 t2 t3", {"t0": "completed", "t1": "asha", "t2": "completed", "t3": "completed"}, None),
    ("t0 t1 t2", {"t2": "search ended"}, "1 of 4 trials were still training and 1 never started"),  # resumed: t0, t1
])                                                                                     # ended in an earlier session
def test_the_resume_hint_counts_trials_cut_and_never_started(reported, outcomes, line, capsys):
    space = spaces.for_cpu(spaces.load_space(SMOKE.with_name("balanced.yaml")))  # trains until its budget
    metrics = [{"trial_id": f"t{i}", **({"training_iteration": 1} if f"t{i}" in reported.split() else {})}
               for i in range(4)]  # 4 trials drawn; Tune's metrics of one that never reported have its id only
    results = [types.SimpleNamespace(metrics=m) for m in metrics]
    summary.print_resume_hint(results, outcomes, space, "/tmp/study")
    printed = capsys.readouterr().out
    assert (line in printed) if line else printed == "", printed


def test_a_pbt_population_without_max_epochs_trains_until_the_budget(ray_local, tmp_path):
    # batch 32 and lr 4e-4: more than 2 digit classes from epoch 2, so the mode-collapse stopper leaves them be
    base = {**yaml.safe_load(SMOKE.read_text())["base"], "fid_samples": 200, "checkpoint_every": 1, "batch_size": 32,
            "lr_g": 4.0e-4}
    space = yaml.safe_load(SMOKE.read_text())
    del space["max_epochs"]
    path = tmp_path / "pbt_budget.yaml"
    path.write_text(yaml.safe_dump({**space, "base": base, "num_samples": 2, "time_budget": "30s",
                                    "search": {"lr_d": {"loguniform": [3.0e-4, 6.0e-4]}},
                                    "finalists": {"trials": 1, "samples": 500},
                                    "scheduler": {"type": "pbt", "perturbation_interval": 2,
                                                  "hyperparam_mutations": {"lr_d": {"loguniform": [1.0e-4, 1.0e-3]}}}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, out = run_search("--space", path, "--storage-path", tmp_path / "rr", "--name", "pbt-budget", "--tracking-uri", uri)
    assert code == 0, out
    assert "2 x training until the budget ends" in out
    epochs = {trial_id: frame["epoch"].max() for trial_id, frame in trial_frames(tmp_path / "rr" / "pbt-budget").items()}
    assert len(epochs) == 2 and min(epochs.values()) >= 1, epochs  # how many epochs fit is the benchmark's question
    assert re.search(r"budget: \S+ of 30s \(\d+%\), 2 trials ran", out), out
    assert re.search(r"\d of 2 trials were still training when the search ended \(this space trains until its "
                     r"time budget\)", out) and "did not finish" not in out, out
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.run_kind = 'trial'")
    reasons = {run.data.tags["stop_reason"] for run in runs}
    assert "search ended" in reasons and "completed" not in reasons, reasons  # no epoch limit: the budget ends them


def test_pbt_exploits_another_trials_checkpoint(ray_local, tmp_path):
    base = {**yaml.safe_load(SMOKE.read_text())["base"], "lr_g": 2.0e-4, "checkpoint_every": 1}
    space = smoke_variant(
        tmp_path, "smoke_pbt", base=base, search={"lr_d": {"grid": [3.0e-4, 1.0e-6]}}, search_alg="grid",
        num_samples=1, max_epochs=4,
        scheduler={"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5,
                   "hyperparam_mutations": {"lr_d": {"loguniform": [1.0e-5, 1.0e-3]},
                                            "lr_g": {"loguniform": [1.0e-5, 1.0e-3]}}})
    code, out = run_search("--space", space, "--storage-path", tmp_path / "rr", "--name", "pbt")
    assert code == 0, out
    frames = trial_frames(tmp_path / "rr" / "pbt")
    exploits = [(trial_id, row) for trial_id, frame in frames.items() for _, row in frame.iterrows()
                if isinstance(row["restored_from"], str) and row["restored_from"] != trial_id]
    assert exploits, {trial_id: frame["restored_from"].tolist() for trial_id, frame in frames.items()}
    for trial_id, row in exploits:
        donor = frames[row["restored_from"]]
        donor_row = donor[donor["epoch"] == row["restored_epoch"]].iloc[0]
        assert row["epoch"] > row["restored_epoch"] and row["lr_g"] > 0
        # explore perturbed the donor's rates; the restored optimisers must use the new ones
        assert (row["lr_d"], row["lr_g"]) != (donor_row["lr_d"], donor_row["lr_g"])


def donor_checkpoint_survives(space_path, tmp_path) -> bool:
    """Ray's checkpoint manager (the one each Tune trial has) with the search's CheckpointConfig: a donor
    reports a checkpoint per epoch, its FID improving with 1k-sample noise; PBT clones the one of epoch 4
    (its latest at that perturbation). Is it still on disk two epochs later, when the clone restores it?"""
    from ray.train._internal.checkpoint_manager import (
        _CheckpointManager,
        _TrainingResult,
    )

    space = spaces.load_space(space_path)
    manager = _CheckpointManager(tuner.checkpoint_config(space))
    fids = [90.0, 60.0, 45.0, 50.0, 38.0, 36.0, 35.0]  # epoch 4 (50.0) is worse than its neighbours
    for epoch, fid in enumerate(fids, start=1):
        folder = tmp_path / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        manager.register_checkpoint(_TrainingResult(tune.Checkpoint.from_directory(folder), {"fid": fid}))
        if epoch == 4:
            cloned = folder
    return cloned.exists()


def test_a_pbt_donor_keeps_the_checkpoint_an_exploit_cloned(tmp_path):
    """Seen in a PBT run: kept by score, the donor's clone point (not among its 4 best) was deleted before the
    exploiting trial restored it, which then errored. Under PBT, Tune keeps the latest checkpoints instead."""
    pbt = smoke_variant(tmp_path, "pbt", scheduler={"type": "pbt", "perturbation_interval": 2,
                                                     "hyperparam_mutations": {"lr_d": {"loguniform": [1e-4, 1e-3]}}})
    asha = smoke_variant(tmp_path, "asha", scheduler={"type": "asha"})
    assert donor_checkpoint_survives(pbt, tmp_path / "pbt_ckpt")
    assert not donor_checkpoint_survives(asha, tmp_path / "asha_ckpt")  # by score: the 4 best and the latest
    assert tuner.checkpoint_config(spaces.load_space(asha)).checkpoint_score_attribute == "fid"


def test_hyperband_stops_the_worse_trial_of_a_halving_bracket(ray_local, tmp_path):
    # Ray's HyperBand with max_t 2 and reduction_factor 2 fills two brackets of two trials: the first runs both
    # for 2 epochs, the second keeps the better one after epoch 1 and stops the other. It waits for a bracket's
    # reports (they decide, not time); in 2 epochs the GAN stopper cannot stop anything (it needs 3 or more).
    space = smoke_variant(tmp_path, "smoke_hb", scheduler={"type": "hyperband", "reduction_factor": 2},
                          base={**yaml.safe_load(SMOKE.read_text())["base"], "checkpoint_every": 1, "fid_samples": 200},
                          num_samples=4, time_budget="10m")  # a trial left paused shows as "search ended"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, out = run_search("--space", space, "--storage-path", tmp_path / "rr", "--name", "hb", "--tracking-uri", uri)
    assert code == 0, out
    assert "0 errored" in out
    epochs = {trial_id: frame["epoch"].max() for trial_id, frame in trial_frames(tmp_path / "rr" / "hb").items()}
    assert sorted(epochs.values()) == [1, 2, 2, 2], epochs
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.run_kind = 'trial'")
    reasons = {run.data.tags["trial_id"]: run.data.tags["stop_reason"] for run in runs}
    assert reasons == {trial_id: "completed" if last == 2 else "hyperband early stop"
                       for trial_id, last in epochs.items()}, (reasons, epochs)


def test_a_diverging_trial_stops_as_diverged_while_the_other_finishes(ray_local, tmp_path, mlflow_store):
    space = smoke_variant(tmp_path, "smoke_nan", search={"lr_d": {"grid": [2.0e-4, 50.0]}}, search_alg="grid",
                          num_samples=1, scheduler={"type": "fifo"})
    code, out = run_search("--space", space, "--storage-path", tmp_path / "rr", "--name", "nan")
    assert code == 0, out
    frames = trial_frames(tmp_path / "rr" / "nan")
    by_lr = {frame["lr_d"].iloc[0]: (trial_id, frame) for trial_id, frame in frames.items()}
    bad_id, bad = by_lr[50.0]
    _, good = by_lr[2.0e-4]
    assert f"stopped {bad_id}: diverged" in out
    assert bad["balance"].iloc[-1] == "diverged" and bad["fid"].iloc[-1] > 1e5  # a finite sentinel, not NaN
    assert good["epoch"].max() == 2 and "diverged" not in set(good["balance"])
    client = MlflowClient(mlflow_store)  # the search tracked into the session store (no --tracking-uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.trial_id = '{bad_id}'")
    assert [run.data.tags["stop_reason"] for run in runs] == ["diverged"]


def test_a_uri_study_location_stays_a_uri_for_tune():
    # Path("s3://b/x").resolve() would be the local folder ./s3:/b/x, and checkpoints would never reach S3
    location = study_storage.study_location("s3://bucket/gan_tune/ray/", "NAME")
    assert location == "s3://bucket/gan_tune/ray/NAME"
    assert study_storage.tune_storage(location) == ("s3://bucket/gan_tune/ray", "NAME")
    assert study_storage.tune_storage(location + "/") == ("s3://bucket/gan_tune/ray", "NAME")


def test_a_local_study_location_is_the_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = study_storage.study_location("rr", "NAME")
    assert location == str(tmp_path.resolve() / "rr" / "NAME")
    assert study_storage.tune_storage(location) == (str(tmp_path.resolve() / "rr"), "NAME")


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_study_files_go_through_the_storage_filesystem(tmp_path, as_uri):
    folder = tmp_path / "rr" / "NAME"
    location = folder.as_uri() if as_uri else str(folder)
    assert not study_storage.study_exists(location) and study_storage.study_mib(location) == 0
    assert study_storage.read_study_file(location, "flags.json") is None
    assert study_storage.write_study_file(location, "flags.json", "x" * 2**20) == f"{location}/flags.json"
    assert (folder / "flags.json").read_text() == "x" * 2**20  # made the missing folders
    assert study_storage.read_study_file(location, "flags.json") == "x" * 2**20
    assert study_storage.study_exists(location) and study_storage.study_mib(location) == 1.0


def test_a_search_and_its_resume_keep_a_file_uri_storage_path(ray_local, tmp_path):
    storage = (tmp_path / "rr").as_uri()
    code, out = run_search("--space", "smoke", "--storage-path", storage, "--name", "uri",
                           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert code == 0, out
    location = f"{storage}/uri"
    folder = tmp_path / "rr" / "uri"
    assert f"results in {location} (" in out and f"best config: {location}/{study_storage.BEST_CONFIG}" in out
    assert load_config(folder / study_storage.BEST_CONFIG).width == 0.25
    assert json.loads((folder / study_storage.SAVED_ARGS).read_text())["storage_path"] == storage
    assert len(trial_frames(folder)) == 3 and not list(tmp_path.glob("**/file:*"))
    assert run_search("--space", "smoke", "--storage-path", storage, "--name", "uri")[0] == 2  # taken
    parent = re.search(r"mlflow parent run: (\w+)", out).group(1)
    code, out = run_search("--resume", location)  # the saved flags fill in the rest, the tracking store too
    assert code == 0, out
    assert f"results in {location} (" in out and f"mlflow parent run: {parent} " in out


def test_time_to_quality_counts_from_this_sessions_start():
    assert summary.time_to(1_000_125, 1_000_000.4) == "reported 2 min 05 s into the search"
    assert summary.time_to(999_000, 1_000_000.4) == "reported before this session resumed the study"


def test_a_restored_tuner_takes_this_sessions_stopper_callbacks_and_console(smoke_study):
    """search.replace_restored_run_config reaches into Ray's private Tuner._local_tuner (no public route in
    Ray 2.60): this fails first when a Ray upgrade moves it, before a resumed search silently keeps the first
    session's callbacks (and prints stale stop reasons) or its old console."""
    code, study, _ = smoke_study
    assert code == 0
    stopper, marker = tune.stopper.MaximumIterationStopper(1), tune.Callback()
    restored = tuner.restore_tuner(str(study), trainable.train_gan, restart_errored=False, stop=stopper,
                                   callbacks=[marker], verbose=1)
    run_config = restored._local_tuner.get_run_config()
    assert run_config.stop is stopper and run_config.callbacks == [marker] and run_config.verbose == 1
    with pytest.raises(AttributeError, match="no field 'stopper'"):
        tuner.replace_restored_run_config(restored, stopper=stopper)


def test_the_console_shows_the_table_and_one_line_per_trial_event(tmp_path):
    """Issue 15: by default no per-checkpoint lines and no per-trial boxes; --verbose brings Tune's boxes back."""
    smoke = yaml.safe_load(SMOKE.read_text())
    space = tmp_path / "two.yaml"
    space.write_text(yaml.safe_dump({**smoke, "num_samples": 2, "max_epochs": 2, "scheduler": {"type": "fifo"}}))

    def search_output(name, *flags):
        done = subprocess.run([sys.executable, "-m", "gan_tune.search", "--space", str(space), "--storage-path",
                               str(tmp_path / "rr"), "--name", name, "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                               *flags], capture_output=True, text=True, timeout=400,
                              env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    quiet = search_output("quiet")
    assert len(re.findall(r"^trial \w+ started: lr_d [\d.e-]+, lr_g [\d.e-]+$", quiet, flags=re.M)) == 2, quiet
    assert len(re.findall(r"^trial \w+ stopped after epoch 2: completed, fid [\d.]+$", quiet, flags=re.M)) == 2, quiet
    assert "| Trial name" in quiet  # Tune's status table
    for noise in ("Checkpoint successfully created", "started with configuration", "Started a local Ray instance"):
        assert noise not in quiet, noise
    verbose = search_output("verbose", "--verbose", "--num-samples", "1", "--max-epochs", "1")  # one event will do
    assert "started with configuration" in verbose and "Checkpoint successfully created" in verbose


def test_sharing_a_gpu_without_mps_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(cluster.MPS_PIPE_ENV, str(tmp_path))
    note = cluster.sharing_note(0.25)
    assert note.startswith("note: 0.25 GPU per trial shares each GPU between 4 trials") and "\n" not in note
    assert cluster.sharing_note(1.0) is None and cluster.sharing_note(0) is None  # nothing shared
    (tmp_path / "control").touch()  # an MPS control daemon's pipe
    assert cluster.mps_running() and cluster.sharing_note(0.25) is None
