"""One MLflow child run per Tune trial (per member of a cohort trial), written by `TrackingCallback` in the Ray driver.

Every MLflow write happens in the Ray driver process. A sqlite store takes one writer at a time, so trials
never talk to MLflow: `TrackingCallback` (a `ray.tune.Callback`, which Ray runs in the driver) turns each
trial's reported results into child-run params, per-epoch metrics and tags with explicit run ids
(MlflowClient, not the fluent active-run stack), records why each trial stopped, uploads its files
(trial_files) and sends every write through the outage queue (write_queue). A cohort trial's members each get a
run of their own (member_runs), so that MLflow compares configurations; the cohort trial itself has none.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.tune.result import TIME_TOTAL_S
from ray.tune.utils import flatten_dict

from gan_tune.tracking.member_runs import MemberRuns
from gan_tune.tracking.parent_run import (
    MAX_PARAMS_PER_BATCH,
    NOT_METRICS,
    numeric_metrics,
    truncate,
)
from gan_tune.tracking.store import fail_fast_http, now_ms
from gan_tune.tracking.trial_files import TrialFiles, trial_files, upload_files
from gan_tune.tracking.write_queue import (
    FINAL_PATIENCE_S,
    PendingWrites,
    batch,
    write_undelivered,
)
from gan_tune.training.cohort import is_cohort_config

log = logging.getLogger(__name__)

STEP_METRIC = "loss_d"  # a metric in every trial report
SEARCH_PAGE = 10_000  # runs per search_runs call; a study has far fewer trials


def hook(method: Callable) -> Callable:
    """Wrap a callback hook: fail fast on HTTP, time it per trial, and turn any error into a counted warning.

    An exception escaping a Tune callback aborts the whole search; a tracking hiccup must not.
    """

    @functools.wraps(method)
    def run(self: "TrackingCallback", iteration: int, trials: list, trial: Any, **info: Any) -> None:
        start = time.perf_counter()
        try:
            with fail_fast_http():
                method(self, trial, **info)
        except Exception as err:  # reported below and counted in the end-of-search summary
            self.warn(f"{method.__name__} for trial {trial}: {type(err).__name__}: {err}")
        finally:
            self.overhead_s[trial.trial_id] += time.perf_counter() - start

    return run


class TrackingCallback(MemberRuns, tune.Callback):
    """Child run per trial under `parent_run_id`: params, per-epoch metrics, stop reason, trial files.

    `stop_reasons` is the GAN stopper's live `reasons` dict (trial_id -> "diverged" | "D dominates" |
    "mode collapse"). A trial that ends before `max_epochs` with no such reason was stopped by the
    scheduler (`<scheduler> early stop`).
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, max_epochs: int,
                 stop_reasons: Mapping[str, str] | None = None, scheduler: str = "scheduler"):
        self.tracking_uri, self.parent_run_id, self.max_epochs = tracking_uri, parent_run_id, max_epochs
        self.stop_reasons = stop_reasons if stop_reasons is not None else {}
        self.scheduler = scheduler
        self.client: MlflowClient | None = None  # made in setup(): the callback is pickled into tuner.pkl
        self.writes: PendingWrites | None = None  # made in setup(), on the client
        self.run_ids: dict[str, str] = {}  # trial or member id -> child run id, once the store made the run
        self.without_params: set[str] = set()  # reused runs a killed driver left between create_run and params
        self.logged_steps: dict[str, int] = {}  # trial or member id -> last epoch logged, in this or an earlier session
        self.open_trials: set[str] = set()
        self.outcomes: dict[str, str] = {}  # trial_id -> stop reason (a cohort trial's too: Tune's view of it)
        self.uploaded: dict[str, dict[str, int]] = defaultdict(dict)  # trial or member id -> {artifact path: size}
        self.exploits: dict[str, list[tuple[int, str]]] = defaultdict(list)  # trial or member id -> (epoch, donor)
        self.overhead_s: dict[str, float] = defaultdict(float)
        self.trial_time_s: dict[str, float] = {}
        self.failures: list[str] = []
        MemberRuns.__init__(self)  # a cohort trial's members and their outcomes

    def setup(self, **info: Any) -> None:
        """Connect; on a resumed search, reopen the parent and reuse the child runs it already has."""
        self.client = MlflowClient(self.tracking_uri)
        self.writes = PendingWrites(self.client, self.run_ids, self.warn)
        with fail_fast_http():
            parent = self.client.get_run(self.parent_run_id)
            self.experiment_id = parent.info.experiment_id
            if parent.info.status != "RUNNING":
                self.client.update_run(self.parent_run_id, status="RUNNING")
            for run in self.client.search_runs([self.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = "
                                               f"'{self.parent_run_id}'", max_results=SEARCH_PAGE):
                if "trial_id" in run.data.tags:
                    self.run_ids.setdefault(run.data.tags["trial_id"], run.info.run_id)
                    self.logged_steps[run.data.tags["trial_id"]] = last_step(self.client, run.info.run_id)
                    if not run.data.params:
                        self.without_params.add(run.data.tags["trial_id"])
                    self.note_ended_member(run)

    def warn(self, message: str) -> None:
        self.failures.append(message)
        log.warning("mlflow tracking: %s", message)

    @hook
    def on_trial_start(self, trial: Any, **info: Any) -> None:
        """Create the child run (a cohort trial: its members'); a trial started again (PBT, HyperBand, a retry,
        --resume) keeps its run."""
        if trial.trial_id in self.open_trials:
            return
        self.open_trials.add(trial.trial_id)
        if is_cohort_config(trial.config):
            self.start_members(trial)
        else:
            self.start_run(trial.trial_id, str(trial), trial.config, trial.path)

    def start_run(self, key: str, name: str, config: dict, trial_path: str, **tags: str) -> None:
        """The child run of `key` (a trial or member id, its trial_id tag): made with its params, or reused."""
        if key in self.run_ids:  # started in an earlier session of a resumed search
            self.writes.add(key, "update_run", {"status": "RUNNING"})
            if key in self.without_params:  # that session's driver died before the params
                self.without_params.discard(key)
                self.log_params(key, config)
            return
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial_id": key, "run_kind": "trial",
                "ray.trial_path": trial_path, **tags}
        self.writes.add(key, "create_run", {"experiment_id": self.experiment_id, "run_name": name,
                                            "tags": tags, "start_time": now_ms()})
        self.log_params(key, config)

    def log_params(self, key: str, config: dict) -> None:
        params = [Param(k, truncate(str(v))) for k, v in sorted(flatten_dict(config).items())]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.writes.add(key, "log_batch", batch(params=params[start:start + MAX_PARAMS_PER_BATCH]))

    @hook
    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        if is_cohort_config(trial.config):
            self.log_member_reports(trial, result)
        else:
            self.log_report(trial.trial_id, trial.config, result)
        if TIME_TOTAL_S in result:
            self.trial_time_s[trial.trial_id] = float(result[TIME_TOTAL_S])

    def log_report(self, key: str, config: dict, report: Mapping[str, Any], own: tuple[str, ...] = ()) -> None:
        """One report's numbers as metrics at step = epoch and its strings as tags, on the run of `key`;
        `own`: other ids a checkpoint of this run's own lineage may be reported as restored from."""
        step = int(report["epoch"]) if "epoch" in report else int(report["training_iteration"])
        now = now_ms()
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(report).items()]
        if self.replayed(key, report, step, own):
            metrics = []
        tags = [RunTag(k, v) for k, v in string_tags(report).items()]
        tags += self.exploit_tags(key, config, report, step, own)
        self.writes.add(key, "log_batch", batch(metrics, tags=tags))

    def replayed(self, trial_id: str, result: Mapping[str, Any], step: int, own: tuple[str, ...] = ()) -> bool:
        """An epoch the trial's run already has, trained again from the trial's own older state.

        A restarted worker or an unreadable checkpoint (trainable.restore_readable) rewinds a trial to
        an earlier checkpoint, and `--resume` after a killed driver to Tune's last saved state (every
        ~10 s). The run keeps the first value of each step: one point per epoch. A PBT exploit also
        rewinds, but onto another trial's lineage, whose epochs are logged (and tagged pbt.exploits).
        """
        donor = result.get("restored_from")
        if step <= self.logged_steps.get(trial_id, 0) and donor in (None, "", trial_id, *own):
            return True
        self.logged_steps[trial_id] = step
        return False

    def exploit_tags(self, key: str, config: dict, result: Mapping[str, Any], epoch: int,
                     own: tuple[str, ...] = ()) -> list[RunTag]:
        """PBT: a trial that copied another keeps its own run; record each donor and the config it now has."""
        donor = result.get("restored_from")
        notes = self.exploits[key]
        resumed = donor in (key, *own)  # from its own checkpoint (HyperBand, a retry)
        if not isinstance(donor, str) or not donor or resumed or (notes and notes[-1][1] == donor):
            return []
        notes.append((epoch, donor))
        return [RunTag("pbt.exploits", truncate("; ".join(f"epoch {e}: from {d}" for e, d in notes))),
                RunTag("pbt.config", truncate(json.dumps(flatten_dict(config), default=str)))]

    @hook
    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self.finish_members(trial, RunStatus.FINISHED, self.end_reason(trial), "TERMINATED")
        self.finish_trial(trial, RunStatus.FINISHED, self.stop_reason(trial), "TERMINATED")

    @hook
    def on_trial_error(self, trial: Any, **info: Any) -> None:
        error = error_line(trial)
        self.finish_members(trial, RunStatus.FAILED, "error", "ERROR", error)
        self.finish_trial(trial, RunStatus.FAILED, "error", "ERROR", error)

    def stop_reason(self, trial: Any) -> str:
        """The GAN stopper's reason; else diverged, completed, or stopped early by the scheduler."""
        if trial.trial_id not in self.stop_reasons and trial.last_result.get("balance") == "diverged":
            return "diverged"  # the trainable ends a diverged run itself
        return self.end_reason(trial)

    def end_reason(self, trial: Any) -> str:
        """The GAN stopper's reason; else completed, or stopped early by the scheduler. A cohort trial's members
        report their own divergence (stop_reason), so the ones still training when it ends get this."""
        if trial.trial_id in self.stop_reasons:
            return self.stop_reasons[trial.trial_id]
        last = trial.last_result
        epoch = last.get("epoch", last.get("training_iteration", 0))
        return "completed" if epoch >= self.max_epochs else f"{self.scheduler} early stop"

    def finish_trial(self, trial: Any, status: int, reason: str, tune_status: str, error: str = "") -> None:
        """Record the trial's outcome and end its child run (a cohort trial has none: finish_members ends its
        members' runs)."""
        if trial.trial_id not in self.open_trials:
            return
        self.outcomes[trial.trial_id] = reason
        try:
            if not is_cohort_config(trial.config):
                self.end_run(trial.trial_id, functools.partial(trial_files, trial), status, reason, tune_status,
                             error, self.overhead_s[trial.trial_id])
        finally:
            self.open_trials.discard(trial.trial_id)

    def end_run(self, key: str, files: Callable[[], TrialFiles], status: int, reason: str, tune_status: str,
                error: str, overhead_s: float) -> None:
        """Tags (stop_reason, Tune's trial_status, error), `files()` and overhead; then end the child run of `key`."""
        tags = [RunTag("stop_reason", reason), RunTag("trial_status", tune_status)]
        if error:
            tags.append(RunTag("error", truncate(error)))
        try:
            self.upload(key, files)
        finally:
            overhead = Metric("mlflow_overhead_s", overhead_s, now_ms(), 0)
            self.writes.add(key, "log_batch", batch([overhead], tags=tags))
            self.writes.add(key, "set_terminated", {"status": RunStatus.to_string(status), "end_time": now_ms()})

    def files_to_upload(self, key: str, found: TrialFiles) -> TrialFiles:
        """The `found` files of run `key` not uploaded yet (or grown since)."""
        done = self.uploaded[key]
        return {rel: (fs, info) for rel, (fs, info) in found.items() if done.get(rel) != info.size}

    def upload(self, key: str, files: Callable[[], TrialFiles]) -> None:
        """Upload `files()` (trial_files or member_files) to the run of `key`, those not uploaded already."""
        if self.writes.queue:  # the store is down, or the run not made yet: on_experiment_end tries again
            return
        todo = self.files_to_upload(key, files())
        if todo:
            upload_files(self.client, self.run_ids[key], todo)
            self.uploaded[key].update({rel: info.size for rel, (_, info) in todo.items()})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Give a store that went away a last chance, close trials the search ended (time budget, Ctrl-C),
        upload late-synced files, save what the store never took, summarise."""
        with fail_fast_http():
            self.writes.drain(FINAL_PATIENCE_S)  # returns at once when nothing waits
            for trial in trials:
                if trial.trial_id not in self.open_trials and trial.trial_id not in self.outcomes:
                    continue
                start = time.perf_counter()
                try:
                    if trial.trial_id in self.members:
                        self.end_cohort_at_search_end(trial)
                    elif trial.trial_id in self.open_trials:
                        self.finish_trial(trial, RunStatus.KILLED, "search ended", trial.status)
                    else:  # finished in this session: its final sync came after
                        self.upload(trial.trial_id, functools.partial(trial_files, trial))
                except Exception as err:  # counted and reported like every tracking failure
                    self.warn(f"on_experiment_end for trial {trial}: {type(err).__name__}: {err}")
                self.overhead_s[trial.trial_id] += time.perf_counter() - start
            outcomes = json.dumps(dict(self.configuration_outcomes()))
            self.writes.add(None, "log_batch", batch(tags=[RunTag("trial_outcomes", outcomes)]), self.parent_run_id)
        self.summarise(self.save_undelivered(trials))

    def save_undelivered(self, trials: list) -> tuple[str, int] | None:
        """Append the writes the store never took to the study folder's UNDELIVERED file: (its path, how many).

        Trial files not uploaded become one upload_files entry per trial (per member of a cohort trial), and a
        last entry ends the parent run, which parent_run.finish_search_run cannot reach either (its best-trial
        record is not replayed).
        """
        files = [{"trial_id": t.trial_id, "run_id": None, "kind": "upload_files", "payload": {"folder": t.path}}
                 for t in trials if t.trial_id in self.outcomes and t.trial_id not in self.members
                 and self.files_to_upload(t.trial_id, trial_files(t))]
        files += [entry for t in trials if t.trial_id in self.members for entry in self.undelivered_member_files(t)]
        left = [*self.writes.queue, *files]
        if not left or not trials:
            return None
        left.append({"trial_id": None, "run_id": self.parent_run_id, "kind": "set_terminated",
                     "payload": {"status": "FINISHED", "end_time": now_ms()}})
        entries = [{**entry, "run_id": entry["run_id"] or self.run_ids.get(entry["trial_id"])} for entry in left]
        return write_undelivered(trials[0].storage, entries), len(entries)

    def summarise(self, undelivered: tuple[str, int] | None) -> None:
        counts = self.configuration_outcomes()
        print(f"mlflow: {len(self.run_ids)} trial runs under parent {self.parent_run_id} at {self.tracking_uri}; "
              f"outcomes {dict(counts)}; {overhead_line(self.overhead_s, self.trial_time_s)}", file=sys.stderr)
        if self.failures:
            print(f"mlflow: {len(self.failures)} tracking failures (warnings above), first: {self.failures[0]}",
                  file=sys.stderr)
        if undelivered:
            path, count = undelivered
            print(f"mlflow: {count} writes never reached {self.tracking_uri}; they are saved in {path}: once "
                  f"the store is back, run `python -m gan_tune.tracking replay {path} --tracking-uri "
                  f"{self.tracking_uri}` (every epoch's metrics are also in each trial's result.json and "
                  "progress.csv)", file=sys.stderr)


def string_tags(result: Mapping[str, Any]) -> dict[str, str]:
    """Reported strings (balance, node_id, data_source, restored_from) become tags holding the latest value."""
    return {k: truncate(v) for k, v in result.items() if k not in NOT_METRICS and isinstance(v, str) and v}


def last_step(client: MlflowClient, run_id: str) -> int:
    """The last epoch a run has metrics for (every report carries STEP_METRIC); 0 for none."""
    return max((m.step for m in client.get_metric_history(run_id, STEP_METRIC)), default=0)


def overhead_line(overhead_s: Mapping[str, float], trial_time_s: Mapping[str, float]) -> str:
    if not overhead_s:
        return "no trials"
    mean = sum(overhead_s.values()) / len(overhead_s)
    timed = [overhead_s[t] / trial_time_s[t] for t in trial_time_s if t in overhead_s and trial_time_s[t] > 0]
    share = f", {100 * sum(timed) / len(timed):.1f} % of trial time" if timed else ""
    return f"logging overhead {mean:.3f} s per trial{share}"


def error_line(trial: Any) -> str:
    """The last line of the trial's error file (the exception), or its status when there is none."""
    path = trial.error_file
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "trial failed (no error file)"
