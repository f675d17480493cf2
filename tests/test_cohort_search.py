"""Cohort trials in the search (issue 27): the space's `cohort` key, per-member draws, successive halving inside a
cohort, exact resumes from a cohort checkpoint, and a real search of cohorts through the CLI.

That a member trains exactly as its own trial would is tests/test_cohort.py's claim; this file checks what the
search does with the members.
"""

import contextlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.variant_generator import generate_variants

from gan_tune.training import checkpoint, cohort_checkpoint
from gan_tune.training.cohort import MEMBERS_KEY, config_of, member_configs
from gan_tune.training.config import ConfigError
from gan_tune.training.data import BUNDLED, load_mnist
from gan_tune.tuning import cohort_trainable, schedulers, searchers, spaces
from gan_tune.tuning.cohort_pbt import CohortPbt
from gan_tune.tuning.cohort_trainable import Halving
from gan_tune.tuning.stopping import GanStopper

CPU = torch.device("cpu")
SPACE = {
    "base": {"model": "balanced", "width": 0.25, "batch_size": 128, "data_source": BUNDLED, "subset": 1000,
             "fid_samples": 500, "eval_every": 1, "g_ema": 0.99},
    "search": {"lr_d": {"loguniform": [1.0e-4, 1.0e-3]}, "lr_g": {"loguniform": [1.0e-4, 1.0e-3]},
               "latent_dim": {"choice": [16, 32]}},
    "metric": "fid", "mode": "min", "num_samples": 8, "max_epochs": 3, "search_alg": "random", "cohort": 4,
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpu": 1}, "time_budget": "5m", "finalists": {"trials": 2, "samples": 1000},
}


def write_space(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **changes}))
    return path


def test_a_space_draws_fusing_keys_per_member_and_counts_configurations(tmp_path):
    space = spaces.load_space(write_space(tmp_path, search={**SPACE["search"], "n_disc": {"choice": [1, 2]}},
                                          num_samples=9))
    assert space.cohort == 4
    assert set(space.member_keys) == {"lr_d", "lr_g", "latent_dim"}  # n_disc does not fuse: one draw per trial
    assert space.tune_num_samples == 3  # 9 configurations in trials of 4
    params = searchers.param_space(space, seed=0)
    # what Tune's BasicVariantGenerator (search_alg random) does with the param space, once per trial
    rng = np.random.default_rng(0)
    configs = [next(generate_variants(params, random_state=rng))[1] for _ in range(3)]
    for config in configs:
        members = member_configs(config)
        assert len(members) == 4 and config["n_disc"] in (1, 2) and "lr_d" not in config
        assert len({m["lr_d"] for m in members}) == 4 and len({m["seed"] for m in members}) == 4
        assert all(m["n_disc"] == config["n_disc"] and 1e-4 <= m["lr_g"] <= 1e-3 for m in members)
    assert configs[0][MEMBERS_KEY] != configs[1][MEMBERS_KEY]


def test_an_ordinary_space_is_unchanged(tmp_path):
    space = spaces.load_space(write_space(tmp_path, cohort=1))
    params = searchers.param_space(space, seed=0)
    assert MEMBERS_KEY not in params and "lr_d" in params and "seed" in params and space.member_keys == []


@pytest.mark.parametrize("changes, says", [
    ({"cohort": 0}, "expected an integer in [1, 256], got 0"),
    ({"cohort": "four"}, "expected an integer"),
    ({"cohort": 257}, "in [1, 256]"),
    ({"search_alg": "optuna"}, "needs search_alg random"),
])
def test_a_bad_cohort_names_the_key(tmp_path, changes, says):
    with pytest.raises(ConfigError, match="cohort") as err:
        spaces.load_space(write_space(tmp_path, **changes))
    assert says in str(err.value)


@pytest.mark.parametrize("scheduler, rungs", [
    ({"type": "asha", "grace_period": 2, "reduction_factor": 3}, (2, 6, 18, 54)),
    ({"type": "hyperband", "reduction_factor": 3}, (1, 3, 9, 27)),
    ({"type": "fifo"}, ()),
])
def test_cohorts_halve_at_the_schedulers_rungs(tmp_path, scheduler, rungs):
    space = spaces.load_space(write_space(tmp_path, scheduler=scheduler, max_epochs=60))
    assert schedulers.cohort_rungs(space) == rungs


def report(epoch: int, fid: float, **changes) -> dict:
    return {"epoch": epoch, "fid": fid, "coverage": 10.0, "d_acc": 0.6, "loss_d": 1.0, "loss_g": 1.0,
            "balance": "balanced", **changes}


def test_halving_keeps_the_best_share_and_names_why_the_others_stop():
    halving = Halving("fid", "min", rungs=(2,), reduction_factor=2)
    reports = {"a": report(2, 30.0), "b": report(2, 10.0), "c": report(2, math.nan), "d": report(2, 20.0),
               "e": report(2, 5.0, loss_d=math.inf)}
    reasons = cohort_trainable.stop_reasons(reports, GanStopper(), halving, max_epochs=10)
    # e diverged; of the four left the best ceil(4 / 2) go on: b and d; NaN ranks last
    assert reasons == {"a": "cohort halving at epoch 2", "b": "", "c": "cohort halving at epoch 2", "d": "",
                       "e": "diverged"}
    result = cohort_trainable.cohort_result(reports, reasons, halving)
    assert result["member"] == "b" and result["fid"] == 10.0 and result["members_alive"] == 2
    assert result[MEMBERS_KEY]["a"]["stop_reason"] == "cohort halving at epoch 2"
    off_rung = cohort_trainable.stop_reasons(reports, GanStopper(), Halving("fid", "min", (3,), 2), max_epochs=10)
    assert [m for m, r in off_rung.items() if r] == ["e"]
    last = cohort_trainable.stop_reasons({"a": report(10, 3.0), "b": report(10, 4.0, d_acc=math.nan)},
                                         GanStopper(), halving, max_epochs=10)
    assert last == {"a": "completed", "b": "completed"}


def test_the_gan_stoppers_rules_apply_per_member():
    stopper, halving = GanStopper(), Halving("fid", "min")
    for epoch in (1, 2, 3):  # a dominates three reports in a row; b's D is fine
        reasons = cohort_trainable.stop_reasons({"a": report(epoch, 9.0, d_acc=0.99), "b": report(epoch, 9.0)},
                                                stopper, halving, max_epochs=10)
    assert reasons == {"a": "D dominates", "b": ""}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread does not wait on a second one busy with another test worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(one_thread):
    return load_mnist(BUNDLED, subset=256).images


def tiny_config(**changes) -> dict:
    shared = {"model": "balanced", "width": 0.125, "batch_size": 16, "data_source": BUNDLED, "subset": 256,
              "eval_every": 0, "max_epochs": 4, "g_ema": 0.9, "r1_gamma": 1.0, "steps_per_epoch": 4,
              "sample_every": 100}  # files only for a stopping member: plots cost more than these epochs
    members = [{"lr_d": 2e-4, "lr_g": 1e-4, "seed": 1, "latent_dim": 16},
               {"lr_d": 1e-3, "lr_g": 5e-4, "seed": 2, "latent_dim": 8},
               {"lr_d": 5e-4, "lr_g": 3e-4, "seed": 3, "latent_dim": 16}]
    return {**shared, MEMBERS_KEY: members, **changes}


def train(run, images, epochs: int, tmp_path: Path, stop: str = "") -> None:
    """`epochs` epochs as the trainable runs them; `stop` names a member that stops after the first."""
    for _ in range(epochs):
        cohort_trainable.train_epoch(run, images, None, GanStopper(), Halving("fid", "min"), tmp_path)
        if stop and run.epoch == 1:
            run.stopped[stop] = "cohort halving at epoch 1"
        cohort_trainable.drop_stopped(run)


def test_a_resumed_cohort_trains_on_exactly_as_if_never_stopped(images, tmp_path):
    """Both the resumed and the uninterrupted cohort lose member m1 after epoch 1 (as halving would), so the
    checkpoint must rebuild the fused model at its original noise size and cut it to the survivors."""
    torch.manual_seed(0)
    straight = cohort_trainable.start(tiny_config(), "t", CPU)
    train(straight, images, 3, tmp_path, stop="t-m1")
    resumed = cohort_trainable.start(tiny_config(), "t", CPU)
    train(resumed, images, 2, tmp_path, stop="t-m1")
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    cohort_checkpoint.write(cohort_trainable.save(resumed), folder)
    resumed = cohort_trainable.from_saved(cohort_checkpoint.read(folder, CPU), CPU)
    train(resumed, images, 1, tmp_path)
    assert resumed.ids == straight.ids == ["t-m0", "t-m2"] and resumed.epoch == straight.epoch == 3
    for mine, theirs in zip(resumed.cohort.g.state_dict().values(), straight.cohort.g.state_dict().values()):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(resumed.cohort.opt_d.exp_avg_sq, straight.cohort.opt_d.exp_avg_sq):
        assert torch.equal(mine, theirs)
    assert resumed.histories["t-m2"][-1]["loss_d"] == straight.histories["t-m2"][-1]["loss_d"]
    assert len(resumed.histories["t-m1"]) == 1


def test_a_cohort_without_a_readable_checkpoint_starts_fresh_and_says_so(images, tmp_path):
    """As an ordinary trial does (trainable.restore_readable): a truncated cohort.pt and nothing older means
    epoch 0, with the restore note naming the unreadable checkpoint."""
    run = cohort_trainable.start(tiny_config(), "t", CPU)
    train(run, images, 1, tmp_path)
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    path = cohort_checkpoint.write(cohort_trainable.save(run), folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a disk that filled during the upload
    fresh = cohort_trainable.start_or_restore(tiny_config(), "t", CPU, tune.Checkpoint.from_directory(folder))
    assert fresh.epoch == 0 and fresh.ids == ["t-m0", "t-m1", "t-m2"]
    assert fresh.context["restore_note"] == "unreadable checkpoint_000001; started fresh"
    cohort_checkpoint.write(cohort_trainable.save(run), folder)  # readable again: restored, no note
    restored = cohort_trainable.start_or_restore(tiny_config(), "t", CPU, tune.Checkpoint.from_directory(folder))
    assert restored.epoch == 1 and restored.context["restore_note"] == ""


def test_the_best_member_checkpoint_is_an_ordinary_one(images, tmp_path):
    run = cohort_trainable.start(tiny_config(), "t", CPU)
    train(run, images, 1, tmp_path)
    gan = cohort_checkpoint.member_gan(run.cohort, 1)
    cohort_checkpoint.write_best_member(gan, 1, torch.zeros(4, 8), run.generators[1], run.histories["t-m1"],
                                        "t-m1", tmp_path)
    g, cfg, saved = checkpoint.load_generator(tmp_path)
    assert saved["trial_id"] == "t-m1" and cfg.latent_dim == 8 and cfg.lr_d == 1e-3
    with torch.no_grad():
        z = torch.randn(5, 8)
        assert torch.allclose(g(z), gan.eval_generator().eval()(z), atol=1e-6)


@pytest.fixture(scope="module")
def cohort_study(ray_local, tmp_path_factory):
    from gan_tune import search

    storage = tmp_path_factory.mktemp("cohort_results")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = search.main(["--space", str(write_space(storage, max_epochs=2)), "--storage-path", str(storage),
                            "--name", "c", "--tracking-uri", f"sqlite:///{storage}/mlflow.db"])
    return code, storage / "c", out.getvalue()


def test_a_cohort_search_halves_its_members_and_keeps_the_best_members_config(cohort_study):
    code, study, out = cohort_study
    assert code == 0, out
    trials = sorted(study.glob("train_cohort_*"))
    assert len(trials) == 2  # 8 configurations, 4 per trial
    for trial in trials:
        reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        first = reports[0][MEMBERS_KEY]
        assert len(first) == 4  # every member reports its first epoch
        halved = [m for m, r in first.items() if r["stop_reason"] == "cohort halving at epoch 1"]
        assert len(halved) == 2  # rung 1, reduction factor 2
        for mid in first:
            assert (trial / MEMBERS_KEY / mid / "final_grid.png").is_file()  # a halved member's files are complete
        for r in reports:
            best = r[MEMBERS_KEY][r["member"]]
            assert r["fid"] == best["fid"] == min(m["fid"] for m in r[MEMBERS_KEY].values())
    best = yaml.safe_load((study / "best_config.yaml").read_text())
    line = next(line for line in out.splitlines() if line.startswith("best trial "))
    member = line.split()[2].rstrip(":")
    trial = next(t for t in trials if t.name.endswith(member.rsplit("-m", 1)[0]))
    config = config_of(json.loads((trial / "params.json").read_text()), member)
    assert (best["lr_d"], best["lr_g"], best["latent_dim"]) == (config["lr_d"], config["lr_g"], config["latent_dim"])


def test_pbt_inside_a_cohort_copies_the_best_into_the_worst_and_explores_its_rates(images, tmp_path):
    pbt = CohortPbt(perturbation_interval=1, burn_in_period=0, quantile_fraction=0.5, resample_probability=0.0,
                    mutations={"lr_d": ("loguniform", [1e-4, 1e-3]), "beta1": ("choice", [0.0, 0.5, 0.9])})
    config = tiny_config()
    config[MEMBERS_KEY][1]["latent_dim"] = 16  # all of one latent size: any member may copy any other
    run = cohort_trainable.start(config, "t", CPU)
    halving = Halving("loss_g", "min", pbt=pbt)  # loss_g: these tiny runs are not scored
    cohort_trainable.train_epoch(run, images, None, GanStopper(), halving, tmp_path)
    best, worst = cohort_trainable.ranked(run.last, run.ids, halving)[0], cohort_trainable.ranked(
        run.last, run.ids, halving)[-1]
    b, w = run.ids.index(best), run.ids.index(worst)
    donor_lr = run.cohort.cfgs[b].lr_d
    cohort_trainable.perturb(run, halving, random.Random(0))
    assert run.sources[worst] == best
    for layer in run.cohort.g.state_dict().values():  # weights and buffers: the donor's (no step since)
        if layer.dim() and layer.shape[0] == 3:
            assert torch.equal(layer[w], layer[b])
    new_lr = run.cohort.cfgs[w].lr_d
    assert new_lr in (pytest.approx(donor_lr * 1.2), pytest.approx(donor_lr * 0.8), 1e-4, 1e-3)
    assert float(run.cohort.opt_d.lr[w]) == pytest.approx(new_lr)  # the optimiser trains with the explored rate
    assert run.cohort.cfgs[w].beta1 in (0.0, 0.9) and float(run.cohort.opt_g.beta1[w]) == run.cohort.cfgs[w].beta1
    cohort_trainable.train_epoch(run, images, None, GanStopper(), halving, tmp_path)
    assert run.last[worst]["restored_from"] == best and run.last[best]["restored_from"] == ""


def test_a_cohort_pbt_space_runs_tunes_fifo_and_pbt_inside(tmp_path):
    space = spaces.load_space(write_space(tmp_path, scheduler={
        "type": "pbt", "perturbation_interval": 2, "hyperparam_mutations": {"lr_d": {"loguniform": [1e-4, 1e-3]}}}))
    assert isinstance(schedulers.make_scheduler(space), FIFOScheduler)
    assert schedulers.cohort_pbt_plan(space).mutations == {"lr_d": ("loguniform", [1e-4, 1e-3])}
    assert schedulers.cohort_rungs(space) == ()


def test_a_cohort_search_gives_every_member_its_own_mlflow_run(cohort_study):
    from mlflow import MlflowClient

    code, study, out = cohort_study
    client = MlflowClient(f"sqlite:///{study.parent}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("run_kind") != "trial")
    members = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert len(members) == 8 and all("cohort_trial_id" in r.data.tags for r in members)
    reasons = sorted(r.data.tags["stop_reason"] for r in members)
    assert reasons.count("cohort halving at epoch 1") == 4, reasons  # half of each cohort at rung 1
    assert len({r.data.params["lr_d"] for r in members}) == 8
    best = parent.data.tags["best.member"]
    assert best in {r.data.tags["trial_id"] for r in members}
    assert parent.data.tags["best.run_id"] == next(r.info.run_id for r in members if r.data.tags["trial_id"] == best)
    assert sum(json.loads(parent.data.tags["trial_outcomes"]).values()) == 8  # configurations, not trials


def test_a_killed_cohort_search_resumes_every_member_to_the_end(tmp_path):
    """Issue 27: `--resume` works per member. The driver is killed (SIGKILL, nothing saved on the way out) while
    the cohort trial waits at the fault gate after epoch 2's report and checkpoint; the resumed study trains the
    cohort from that checkpoint to epoch 3, and MLflow holds one child run per member (the killed search's, reused)
    with every epoch logged once."""
    import os
    import signal
    import subprocess
    import sys

    from mlflow import MlflowClient
    from test_reliability import wait_for_gate

    from gan_tune.tuning import trainable

    space = write_space(tmp_path, num_samples=4, scheduler={"type": "fifo"}, finalists={"trials": 1, "samples": 500})
    uri, gate, location = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "gate", tmp_path / "rr" / "killed"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    driver = subprocess.Popen([sys.executable, "-m", "gan_tune.search", "--space", str(space), "--storage-path",
                               str(tmp_path / "rr"), "--name", "killed", "--tracking-uri", uri],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                              env={**env, trainable.FAULT_GATE_ENV: f"2:{gate}"})
    try:
        wait_for_gate(driver, gate, timeout_s=300)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    resumed = subprocess.run([sys.executable, "-m", "gan_tune.search", "--resume", str(location)], cwd=tmp_path,
                             capture_output=True, text=True, env=env, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    (trial,) = location.glob("train_cohort_*")
    reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    assert reports[-1]["epoch"] == 3 and reports[-1]["members_alive"] == 0  # every member ran to max_epochs
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.run_kind = 'trial'")
    steps = {run.data.tags["trial_id"]: [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")]
             for run in runs}
    assert len(runs) == 4 and all(sorted(s) == [1, 2, 3] for s in steps.values()), steps
    assert (location / "best_config.yaml").is_file()
