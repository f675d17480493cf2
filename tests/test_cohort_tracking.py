"""Cohort trials in MLflow (issue 27): a real Tune search of a stand-in cohort trainable, tracked into a real sqlite
store, gives every member a child run of its own (params, per-epoch metrics, files, stop_reason) and the cohort
trial none."""

import io
import json
import sys
from pathlib import Path

from mlflow import MlflowClient
from PIL import Image
from ray import cloudpickle, tune
from test_tracking import ScriptedStopper  # stops "collapse" with a reason and "cut" silently at epoch 2

from gan_tune.tracking import child_runs, parent_run, store
from gan_tune.training import cohort

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
SPACE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"
EPOCHS = 3
HALVED = "cohort halving at epoch 2"  # what the stand-in reports for each trial's member 2 at epoch 2


def tiny_png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (4, 4), color=128).save(out, format="PNG")
    return out.getvalue()


PNG = tiny_png()


def member_epoch(member: str, config: dict, epoch: int) -> dict:
    """One member's epoch: its files in members/<id>/ and its report, with numbers made from its own lr_d."""
    folder = Path(cohort.MEMBERS_KEY, member)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "samples" / f"epoch_{epoch:03d}.png").write_bytes(PNG)
    stop = HALVED if member.endswith("-m2") and epoch == 2 else "completed" if epoch == EPOCHS else ""
    if stop:
        (folder / "final_grid.png").write_bytes(PNG)
    return {"epoch": epoch, "fid": config["lr_d"] * 1e6 / epoch, "loss_d": config["lr_d"] * 1e4 + epoch,
            "balance": "balanced", "restored_from": "", "stop_reason": stop}


def cohort_trainable(config):
    """Stands in for tuning.cohort_trainable: reports the contract's shape (the best member's report at the top,
    every training member's under MEMBERS_KEY) and drops a member once it reported a stop_reason."""
    trial_id = tune.get_context().get_trial_id()
    members = {cohort.member_id(trial_id, k): c for k, c in enumerate(cohort.member_configs(config))}
    for epoch in range(1, EPOCHS + 1):
        if config["a"] == "crash" and epoch == 2:
            raise RuntimeError("crashed on purpose")
        reports = {member: member_epoch(member, c, epoch) for member, c in members.items()}
        best = min(reports, key=lambda member: reports[member]["fid"])
        Path("history.csv").write_text(f"epoch\n{epoch}\n")  # the cohort trial's own file: no run's
        top = {k: v for k, v in reports[best].items() if k != "stop_reason"}
        tune.report({**top, "member": best, "members_alive": len(members), cohort.MEMBERS_KEY: reports})
        members = {member: c for member, c in members.items() if not reports[member]["stop_reason"]}


def tracked_search(tmp_path, param_space, experiment):
    """Run `cohort_trainable` over `param_space`, tracked under a new parent: (client, parent, callback, results)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store.check_tracking(uri)
    parent = parent_run.start_search_run(uri, experiment, "smoke", SPACE, {"space": "smoke"}, "none", "asha", "grid")
    stopper = ScriptedStopper()
    callback = child_runs.TrackingCallback(uri, parent, EPOCHS, stopper.reasons, scheduler="asha")
    tuner = tune.Tuner(tune.with_resources(cohort_trainable, {"cpu": 0.5}), param_space=param_space,
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="study", stop=stopper,
                                                 callbacks=[callback], verbose=0,
                                                 sync_config=tune.SyncConfig(sync_artifacts=True)))
    return MlflowClient(uri), parent, callback, tuner.fit()


def child_runs_of(client, parent):
    """{trial_id tag: run} of every run under `parent`."""
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {run.data.tags["trial_id"]: run for run in runs}


def history(client, run, key):
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def test_each_member_of_a_cohort_trial_gets_its_own_child_run(ray_local, tmp_path):
    lr_d = [[1.0e-4, 2.0e-4, 3.0e-4], [4.0e-4, 5.0e-4, 6.0e-4]]  # one list per cohort trial
    space = {"a": "ok", "max_epochs": EPOCHS, "lr_g": 2.0e-4,
             cohort.MEMBERS_KEY: tune.grid_search([[{"lr_d": v} for v in trial] for trial in lr_d])}
    client, parent, callback, results = tracked_search(tmp_path, space, "cohort-runs")
    runs = child_runs_of(client, parent)
    trial_ids = sorted({run.data.tags["cohort_trial_id"] for run in runs.values()})
    assert len(trial_ids) == 2 and not callback.failures, callback.failures
    assert sorted(runs) == sorted(cohort.member_id(t, k) for t in trial_ids for k in range(3))  # no cohort's run
    assert sorted(float(run.data.params["lr_d"]) for run in runs.values()) == sorted(sum(lr_d, []))
    for member, run in runs.items():
        lr, epochs = float(run.data.params["lr_d"]), 2 if member.endswith("-m2") else EPOCHS
        assert run.info.run_name == member and run.data.tags["run_kind"] == "trial", member
        assert run.data.params["lr_g"] == "0.0002" and cohort.MEMBERS_KEY not in run.data.params, member
        assert history(client, run, "loss_d") == [(e, lr * 1e4 + e) for e in range(1, epochs + 1)], member
        assert history(client, run, "fid") == [(e, lr * 1e6 / e) for e in range(1, epochs + 1)], member
        reason = HALVED if member.endswith("-m2") else "completed"
        assert (run.data.tags["stop_reason"], run.info.status) == (reason, "FINISHED"), member
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"final_grid.png", "samples"}, member
        grids = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
        assert grids == {f"samples/epoch_{e:03d}.png" for e in range(1, epochs + 1)}, member
    assert json.loads(client.get_run(parent).data.tags["trial_outcomes"]) == {"completed": 4, HALVED: 2}
    assert sorted(callback.outcomes) == trial_ids  # Tune's trials, as the summary and console read them
    resumed = child_runs.TrackingCallback(client.tracking_uri, parent, EPOCHS)
    resumed.setup()  # a resumed search finds the member runs by trial_id, and keeps the ended ones ended
    assert resumed.run_ids == {member: run.info.run_id for member, run in runs.items()}
    assert resumed.ended_members == set(runs)
    best = results.get_best_result("fid", "min")  # no checkpoints: the parent records its last report
    parent_run.finish_search_run(client.tracking_uri, parent, best, "fid", "min")
    tags, params = client.get_run(parent).data.tags, client.get_run(parent).data.params
    winner = cohort.member_id(best.metrics["trial_id"], 0)  # the lowest lr_d, which the stand-in scores best
    assert (tags["best.trial_id"], tags["best.member"]) == (best.metrics["trial_id"], winner)
    assert tags["best.run_id"] == runs[winner].info.run_id and params["best.lr_d"] == "0.0001"
    assert "best.members" not in params


def test_members_still_training_end_with_their_cohort_trials_reason(ray_local, tmp_path):
    space = {"a": tune.grid_search(["collapse", "cut", "crash"]), "max_epochs": EPOCHS,
             cohort.MEMBERS_KEY: [{"lr_d": 1.0e-4}, {"lr_d": 2.0e-4}, {"lr_d": 3.0e-4}]}
    client, parent, callback, _ = tracked_search(tmp_path, space, "cohort-ends")
    runs = child_runs_of(client, parent)
    assert len(runs) == 9 and not callback.failures, callback.failures
    kinds = {run.data.tags["cohort_trial_id"]: run.data.params["a"] for run in runs.values()}
    expected = {"collapse": ("mode collapse", "FINISHED", 2), "cut": ("asha early stop", "FINISHED", 2),
                "crash": ("error", "FAILED", 1)}
    for member, run in runs.items():
        kind = kinds[run.data.tags["cohort_trial_id"]]
        reason, status, epochs = expected[kind]
        if member.endswith("-m2") and kind != "crash":
            reason = HALVED  # it ended on its own report, before its cohort trial did
        assert (run.data.tags["stop_reason"], run.info.status) == (reason, status), (member, kind)
        assert [step for step, _ in history(client, run, "fid")] == list(range(1, epochs + 1)), (member, kind)
        if kind == "crash":
            assert "crashed on purpose" in run.data.tags["error"], member
    assert {kinds[trial_id]: reason for trial_id, reason in callback.outcomes.items()} == {
        "collapse": "mode collapse", "cut": "asha early stop", "crash": "error"}
    assert json.loads(client.get_run(parent).data.tags["trial_outcomes"]) == {
        "mode collapse": 2, "asha early stop": 2, HALVED: 2, "error": 3}
