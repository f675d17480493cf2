"""What a search prints while it runs: Tune's status table and one line per trial start, stop and error.

Tune's default console (its "new output engine") prints a config box when a trial starts and a result box
of ~30 lines when it ends, and each worker logs a "Checkpoint successfully created" line per checkpoint
(the trainables' `quiet` lowers that logger); in a CPU default search that buried the table and gan_tune's
own lines. By default a search uses Tune's `CLIReporter` table instead (the engine Ray's own RLlib examples
switch to, `RAY_AIR_NEW_OUTPUT=0`), every 30 s with the searched values and the objective, and `TrialLines`
prints one line per event. `--verbose` gives Tune's default console and Ray's log lines back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Mapping

from ray import tune

from gan_tune.tracking.child_runs import error_line
from gan_tune.training.cohort import MEMBERS_KEY

NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # read by Tune when fit() starts: "0" selects the CLIReporter engine
TABLE_EVERY_S = 30  # Tune's own heartbeat period
TABLE_METRICS = ("epoch", "d_acc", "balance")
RESULTS_LOGGER = "ray.tune.analysis.experiment_analysis"  # warns about trials without a progress.csv when fit() ends


@contextlib.contextmanager
def table_engine(verbose: bool) -> Iterator[None]:
    """Tune's CLIReporter engine during fit(), unless verbose; the process environment is restored after."""
    if verbose:
        yield
        return
    before = os.environ.get(NEW_OUTPUT_ENV)
    os.environ[NEW_OUTPUT_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NEW_OUTPUT_ENV, None)
        else:
            os.environ[NEW_OUTPUT_ENV] = before


def run_config_output(searched: list[str], metric: str, verbose: bool, cohort: bool = False) -> dict[str, Any]:
    """RunConfig's `verbose` and `progress_reporter`: the status table only, or Tune's defaults.

    searched: the keys each trial's config has at top level (a cohort's member draws are in its members);
    a cohort's row shows its best member and how many still train."""
    if verbose:
        return {}
    metrics = [*TABLE_METRICS, metric, *(("member", "members_alive") if cohort else ())]
    # not sort_by_metric: Ray's CLIReporter then compares None with None when no trial has the metric yet
    # a cohort space may draw every key per member; an empty list would make Tune show the whole config
    reporter = tune.CLIReporter(parameter_columns=searched or ["max_epochs"], metric_columns=metrics,
                                max_report_frequency=TABLE_EVERY_S)
    return {"verbose": 1, "progress_reporter": reporter}  # 1: the experiment's table, no per-trial boxes


def format_values(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in values.items())


def member_ranges(config: Mapping[str, Any]) -> str:
    """A cohort trial's members in a few words: how many, and each drawn value's range across them."""
    members = config.get(MEMBERS_KEY)
    if not members:
        return ""
    spans = {key: (min(m[key] for m in members), max(m[key] for m in members)) for key in members[0] if key != "seed"}
    text = ", ".join(f"{key} {low:.3g}..{high:.3g}" if isinstance(low, float) else f"{key} {low}..{high}"
                     for key, (low, high) in spans.items())
    return f"cohort of {len(members)} ({text})"


class TrialLines(tune.Callback):
    """One line per trial start, stop (with the reason the tracking callback recorded) and error.

    `outcomes` is the tracking callback's live trial id -> stop reason; it must come before this callback
    in the callback list, so the reason is there when a trial completes."""

    def __init__(self, searched: list[str], metric: str, outcomes: Mapping[str, str]):
        self.searched, self.metric, self.outcomes = searched, metric, outcomes
        self.started: set[str] = set()

    @contextlib.contextmanager
    def quiet_unstarted(self) -> Iterator[None]:
        """During fit(): drop Tune's "Failed to fetch metrics" warning when every trial it lists never started.

        A space that trains until its budget always ends with queued trials that never ran (no folder, no
        progress.csv), and Tune lists each as a FileNotFoundError; the resume hint counts them instead. A
        warning that names a trial which did run (its files lost with a storage outage) still shows."""
        logger = logging.getLogger(RESULTS_LOGGER)
        logger.addFilter(self.keep_record)
        try:
            yield
        finally:
            logger.removeFilter(self.keep_record)

    def keep_record(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Failed to fetch metrics"):
            return True
        listed = [line for line in message.splitlines()[1:] if line.startswith("- ")]
        return not listed or any(trial_id in line.split(":")[0] for line in listed for trial_id in self.started)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.started:  # PBT, HyperBand and retries start a trial again
            return
        self.started.add(trial.trial_id)
        values = {key: trial.config[key] for key in self.searched if key in trial.config}
        text = "; ".join(part for part in (format_values(values), member_ranges(trial.config)) if part)
        print(f"trial {trial.trial_id} started: {text}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        score = last.get(self.metric)
        scored = f", {self.metric} {score:.4g}" if isinstance(score, (int, float)) else ""
        reason = self.outcomes.get(trial.trial_id, "completed")
        print(f"trial {trial.trial_id} stopped after epoch {last.get('epoch', 0)}: {reason}{scored}", flush=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} failed, restarting from its last checkpoint: {error_line(trial)}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} errored: {error_line(trial)}", flush=True)

