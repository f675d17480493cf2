"""A Ray Tune study of a space: the Tuner (built or restored), its fit with tracking and the console,
and choosing the kept generator; the flow of `python -m gan_tune.search` after its checks.

Flow: resources -> plan -> MNIST once -> Tuner.fit -> the summary and the finalists -> best_config.yaml.
Results go to --storage-path (default ./ray_results), a local folder or a URI such as s3://BUCKET/PATH;
the study's location is kept as a string so that a URI stays one.
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from ray import tune

from gan_tune.tracking import child_runs, parent_run, store
from gan_tune.training.cohort import config_of
from gan_tune.training.config import first_line, from_dict, resolve_derived
from gan_tune.training.data import Mnist, load_mnist
from gan_tune.tuning import console, finalists, schedulers, searchers, space_values, spaces
from gan_tune.tuning.cluster import (
    queue_lazily,
    sharing_note,
    trial_resources,
    trials_at_once,
)
from gan_tune.tuning.cohort_trainable import Halving, train_cohort
from gan_tune.tuning.finalists import Finalist
from gan_tune.tuning.space_files import resolve_space
from gan_tune.tuning.spaces import Space
from gan_tune.tuning.stopping import FailingTrials, GanStopper
from gan_tune.tuning.study_storage import (
    BEST_CONFIG,
    check_storage,
    join_uri,
    save_args,
    tune_storage,
    write_study_file,
)
from gan_tune.tuning.summary import (
    edge_warnings,
    print_best,
    print_finalists,
    print_resume_hint,
    score_text,
    summarise,
)
from gan_tune.tuning.trainable import train_gan

MAX_FAILURES = 2  # a crashed trial restarts from its last checkpoint twice before it counts as errored
# Checkpoints kept per trial, best by the metric (the latest ones under PBT, see checkpoint_config).
CHECKPOINTS_KEPT = 4


def print_plan(space: Space, location: str, trial: dict[str, float], args: argparse.Namespace) -> None:
    fixed = from_dict(space.train_fields)
    at_once = trials_at_once(trial)
    device = f"{trial['gpu']:g} GPU" if trial["gpu"] else "no GPU (the cluster has none)"
    budget = space_values.format_duration(space.time_budget_s) if space.time_budget_s else "none"
    subset = f", first {fixed.subset} images" if fixed.subset else ""
    print(f"study {tune_storage(location)[1]}: space {space.name} ({space.where})")
    print(f"  trials:    {spaces.describe_trials(space)}, {space.search_alg} search, seed {args.seed}")
    print(f"  scheduler: {schedulers.describe_scheduler(space)} on {space.metric} ({space.mode})")
    print(f"  resources: {trial['cpu']:g} CPU + {device} per trial; {at_once} at a time")
    if (note := sharing_note(trial["gpu"])) is not None:
        print(f"  {note}")
    print(f"  budget:    {budget} (--time-budget overrides)")
    print(f"  model:     {fixed.model}, width {fixed.width:g}, batch {fixed.batch_size}; "
          f"data {fixed.data_source}{subset}")
    print(f"  results:   {location}", flush=True)


def start_tracking(space: Space, args: argparse.Namespace, data: Mnist, trial: dict[str, float],
                   stopper: GanStopper, location: str) -> tuple[str, list[tune.Callback]]:
    """The study's MLflow parent run (found again on --resume) and the driver-side callback logging each trial."""
    experiment = args.experiment or store.DEFAULT_EXPERIMENT
    parent = parent_run.find_search_run(args.tracking_uri, experiment, location) if args.resume is not None else None
    if parent is None:
        storage_path, name = tune_storage(location)
        resolved = {**vars(args), "name": name, "storage_path": storage_path, "resources": trial,
                    "num_samples": space.num_samples, "max_epochs": space.max_epochs, "metric": space.metric,
                    "mode": space.mode, "time_budget_s": space.time_budget_s, "experiment": experiment}
        parent = parent_run.start_search_run(args.tracking_uri, experiment, space.name, resolve_space(args.space),
                                             resolved, data.source, space.scheduler["type"], space.search_alg, location)
    print(f"mlflow parent run: {parent} (experiment {experiment} at {args.tracking_uri})", flush=True)
    callback = child_runs.TrackingCallback(args.tracking_uri, parent, space.max_epochs, stopper.reasons,
                                           scheduler=space.scheduler["type"])
    return parent, [callback]


def finish_tracking(best: Finalist | None, space: Space, args: argparse.Namespace, parent: str) -> None:
    """Log the chosen generator (its trial, checkpoint, scores) on the parent run, and end it."""
    rescored = best is not None and bool(best.scores)  # else parent_run picks the trial's best kept checkpoint
    parent_run.finish_search_run(args.tracking_uri, parent, best.result if best else None, space.metric, space.mode,
                                 edge_warnings=edge_warnings(space, best.searched) if best else [],
                                 chosen=(best.checkpoint, best.reported) if rescored else None,
                                 rescored=best.scores if rescored else None)
    print(f"mlflow: compare the trials with `mlflow ui --backend-store-uri {args.tracking_uri}`; "
          f"samples: python -m gan_tune.sample --run-id {parent} --tracking-uri {args.tracking_uri}")


# Modules a study saved before the sub-package layout names in its tuner.pkl (its stopper and callbacks),
# and where they live now; restore_tuner makes the old names import the new modules.
MOVED_MODULES = {
    "gan_tune.console": "gan_tune.tuning.console",
    "gan_tune.stopping": "gan_tune.tuning.stopping",
    "gan_tune.trainable": "gan_tune.tuning.trainable",
    "gan_tune.trial_runs": "gan_tune.tracking.child_runs",
}


def alias_moved_modules() -> None:
    for old, new in MOVED_MODULES.items():
        sys.modules.setdefault(old, importlib.import_module(new))


def restore_tuner(location: str, trainable: tune.Trainable, restart_errored: bool, **run_config: Any) -> tune.Tuner:
    """Tuner.restore, unfinished trials from their checkpoints; errored ones too, or from scratch.

    Restore unpickles the first session's stopper, callbacks and console settings; this session's own
    (whose stop reasons and outcomes summarise() prints) take their place.
    """
    alias_moved_modules()
    tuner = tune.Tuner.restore(location, trainable=trainable, resume_unfinished=True,
                               resume_errored=not restart_errored, restart_errored=restart_errored)
    return replace_restored_run_config(tuner, **run_config)


def replace_restored_run_config(tuner: tune.Tuner, **changes: Any) -> tune.Tuner:
    """Set RunConfig fields of a restored Tuner. Ray (2.60) has no public route: Tuner.restore takes no
    run_config, and the restored one, unpickled from tuner.pkl, is reachable only through the private
    `_local_tuner`. tests/test_search.py checks this against Ray, so a Ray that moves it fails there first."""
    run_config = tuner._local_tuner.get_run_config()
    for key, value in changes.items():
        if not hasattr(run_config, key):
            raise AttributeError(f"RunConfig has no field {key!r}")
        setattr(run_config, key, value)
    return tuner


def checkpoint_config(space: Space) -> tune.CheckpointConfig:
    """Each trial keeps its CHECKPOINTS_KEPT best by the metric (the finalists), and Tune keeps its latest too.

    Not under PBT: an exploit clones the checkpoint the donor saved at its last perturbation, and the clone
    restores it later, while the donor trains on. Kept by score, that checkpoint is deleted as soon as a
    newer one is reported unless it ranks among the best, and the clone then fails with "does not exist on
    storage anymore". Kept by recency, it stays for two more perturbation intervals.
    """
    if space.scheduler["type"] != "pbt":
        return tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT, checkpoint_score_attribute=space.metric,
                                     checkpoint_score_order=space.mode)
    saves_per_interval = space.scheduler["perturbation_interval"] // from_dict(space.train_fields).checkpoint_every
    return tune.CheckpointConfig(num_to_keep=max(CHECKPOINTS_KEPT, 2 * saves_per_interval + 1))


def shared_keys(space: Space) -> list[str]:
    """The searched keys at the top of a trial's config (all, but a cohort's member draws)."""
    return [key for key in space.search if key not in space.member_keys]


def make_trainable(space: Space, data: Mnist, trial: dict[str, float], quiet: bool) -> tune.Trainable:
    """train_gan, or train_cohort when the space trains cohorts (its halving from the space's scheduler)."""
    if space.cohort == 1:
        return tune.with_resources(tune.with_parameters(train_gan, data=data, quiet=quiet), trial)
    halving = Halving(space.metric, space.mode, schedulers.cohort_rungs(space),
                      space.scheduler.get("reduction_factor", 3), schedulers.cohort_pbt_plan(space))
    return tune.with_resources(tune.with_parameters(train_cohort, data=data, halving=halving, quiet=quiet), trial)


def cohort_dirname(trial: Any) -> str:
    """A cohort trial's folder: Tune's default name lists every member's draws and is cut at an arbitrary point."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def build_tuner(space: Space, args: argparse.Namespace, data: Mnist, trial: dict[str, float],
                stopper: tune.Stopper, location: str, callbacks: list[tune.Callback]) -> tune.Tuner:
    trainable = make_trainable(space, data, trial, quiet=not args.verbose)
    output = {"verbose": None, "progress_reporter": None,  # Tune's defaults, unless the table engine's
              **console.run_config_output(shared_keys(space), space.metric, args.verbose, space.cohort > 1)}
    if args.resume is not None:
        return restore_tuner(location, trainable, args.restart_errored, stop=stopper, callbacks=callbacks, **output)
    storage_path, name = tune_storage(location)
    run_config = tune.RunConfig(
        name=name, storage_path=storage_path, stop=stopper, callbacks=callbacks, **output,
        sync_config=tune.SyncConfig(sync_artifacts=True),  # trial files from every node reach the storage path
        checkpoint_config=checkpoint_config(space),
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES))
    tune_config = tune.TuneConfig(
        metric=space.metric, mode=space.mode, scheduler=schedulers.make_scheduler(space),
        search_alg=searchers.make_search_alg(space, args.seed), num_samples=space.tune_num_samples,
        time_budget_s=space.time_budget_s, trial_dirname_creator=cohort_dirname if space.cohort > 1 else None,
        reuse_actors=True)  # a new trial (or a PBT/HyperBand resume) skips starting a process and importing torch
    return tune.Tuner(trainable, param_space=searchers.param_space(space, args.seed), tune_config=tune_config,
                      run_config=run_config)


def best_epoch(result: tune.Result, space: Space) -> pd.Series:
    """The report with the best score of a trial (the playbook: pick the best checkpoint in hindsight)."""
    frame = result.metrics_dataframe
    scores = frame[space.metric]
    return frame.loc[scores.idxmin() if space.mode == "min" else scores.idxmax()]


def choose_best(results: tune.ResultGrid, space: Space, data: Mnist) -> tuple[Finalist | None, list[Finalist]]:
    """(the generator the search keeps, the finalists it was chosen from, best first).

    With finalists (finalists.rescore) the best by the many-sample score; without (finalists.trials 0, a metric
    that is no sample score, no kept scored checkpoint) the trial's best report and its best kept checkpoint."""
    rescored = finalists.rescore(results, space.metric, space.mode, data, space.finalists["trials"],
                                 space.finalists["samples"], device="cuda" if torch.cuda.is_available() else "cpu")
    if rescored:
        return rescored[0], rescored
    try:
        result = results.get_best_result(space.metric, space.mode, scope="all")
    except RuntimeError:  # no trial reported the metric
        return None, []
    row = best_epoch(result, space).to_dict()  # finish_tracking lets parent_run pick the kept checkpoint
    config = resolve_derived(config_of(result.config, row.get("member")))
    return Finalist(result, result.checkpoint, row, {}, config), []


def write_best_config(best: Finalist, space: Space, location: str) -> str:
    """TrainConfig fields only (derived params resolved), trained for as many epochs as the chosen checkpoint."""
    name = tune_storage(location)[1]
    values = {**best.config, "max_epochs": best.epoch, "name": f"{name}-best"}
    cfg = from_dict(values, where=f"trial {best.trial_id} config")
    path = join_uri(location, BEST_CONFIG)
    header = (f"# Best trial {best.trial_id} of study {name} (space {space.where}):\n"
              f"# {score_text(best, space.metric)} at epoch {best.epoch}.\n"
              f"# Reproduce: python -m gan_tune.train --config {path}\n")
    return write_study_file(location, BEST_CONFIG, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run(plans: dict[bool, Space], args: argparse.Namespace, location: str) -> int:
    """Everything after Ray is up: resources, plan, data, fit, summary."""
    space, trial = trial_resources(plans, args)
    check_storage(args.storage_path, args.storage_is_shared)
    print_plan(space, location, trial, args)
    fixed = from_dict(space.train_fields)
    data = load_mnist(fixed.data_source, fixed.data_dir, fixed.subset)  # once, shared through the object store
    print(f"data: {data.source} ({len(data)} images)", flush=True)
    random.seed(args.seed)  # the driver-side draws of Tune's schedulers (PBT explore, ASHA brackets)
    np.random.seed(args.seed)
    stopper, failing = GanStopper(space.max_epochs), FailingTrials(space.num_samples)
    parent, callbacks = start_tracking(space, args, data, trial, stopper, location)  # after every check
    started = time.time()
    try:
        if args.resume is None:
            save_args(args, location)
        stop = tune.stopper.CombinedStopper(stopper, failing)
        lines = console.TrialLines(shared_keys(space), space.metric, callbacks[0].outcomes)  # after tracking's
        tuner = build_tuner(space, args, data, trial, stop, location, [*callbacks, lines, failing])
        with console.table_engine(args.verbose), queue_lazily(space, trial), lines.quiet_unstarted():
            results = tuner.fit()
    except BaseException as err:
        parent_run.fail_search_run(args.tracking_uri, parent, f"{type(err).__name__}: {first_line(err)}")
        raise
    if failing.space_fails:
        return report_failing_space(failing, args, parent)
    try:  # the summary reads and writes the study's storage, which may have failed (an S3 server gone)
        best = summarise_and_choose(results, space, stopper, location, started, data)
    except BaseException as err:
        parent_run.fail_search_run(args.tracking_uri, parent, f"{type(err).__name__}: {first_line(err)}")
        raise
    finish_tracking(best, space, args, parent)
    print_resume_hint(results, callbacks[0].outcomes, space, location)
    return 0 if best else 1


def summarise_and_choose(results: tune.ResultGrid, space: Space, stopper: GanStopper, location: str,
                         started: float, data: Mnist) -> Finalist | None:
    """The summary, the finalists and the kept generator with its best_config.yaml (None: no trial scored)."""
    summarise(results, space, stopper, location, started, time.time())
    scoring = time.time()
    best, rescored = choose_best(results, space, data)
    print_finalists(rescored, space, time.time() - scoring)
    if best is None:
        print(f"error: no trial reported {space.metric}", file=sys.stderr)
        return None
    print_best(best, space, started)
    print(f"best config: {write_best_config(best, space, location)}")
    return best


def report_failing_space(failing: FailingTrials, args: argparse.Namespace, parent: str) -> int:
    """Trials that all raised before any report: one line per distinct error, the parent run FAILED, exit 1."""
    lines = failing.summary()
    for line in lines:
        print(f"error: search stopped, {line}", file=sys.stderr)
    parent_run.fail_search_run(args.tracking_uri, parent, "; ".join(lines))
    return 1
