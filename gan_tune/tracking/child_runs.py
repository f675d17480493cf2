"""One MLflow child run per Tune trial, written by `TrackingCallback` in the Ray driver.

Every MLflow write happens in the Ray driver process. A sqlite store takes one writer at a time, so trials
never talk to MLflow: `TrackingCallback` (a `ray.tune.Callback`, which Ray runs in the driver) turns each
trial's reported results into child-run params, per-epoch metrics and tags with explicit run ids
(MlflowClient, not the fluent active-run stack), records why each trial stopped, uploads its files
(trial_files) and sends every write through the outage queue (write_queue).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.tune.result import TIME_TOTAL_S
from ray.tune.utils import flatten_dict

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


class TrackingCallback(tune.Callback):
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
        self.run_ids: dict[str, str] = {}  # trial_id -> child run id, once the store made the run
        self.without_params: set[str] = set()  # reused runs a killed driver left between create_run and params
        self.logged_steps: dict[str, int] = {}  # trial_id -> last epoch logged, in this or an earlier session
        self.open_trials: set[str] = set()
        self.outcomes: dict[str, str] = {}  # trial_id -> stop reason
        self.uploaded: dict[str, dict[str, int]] = defaultdict(dict)  # trial_id -> {artifact path: size}
        self.exploits: dict[str, list[tuple[int, str]]] = defaultdict(list)  # trial_id -> (epoch, donor)
        self.overhead_s: dict[str, float] = defaultdict(float)
        self.trial_time_s: dict[str, float] = {}
        self.failures: list[str] = []

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

    def warn(self, message: str) -> None:
        self.failures.append(message)
        log.warning("mlflow tracking: %s", message)

    @hook
    def on_trial_start(self, trial: Any, **info: Any) -> None:
        """Create the child run; a trial started again (PBT, HyperBand, a retry, --resume) keeps its run."""
        if trial.trial_id in self.open_trials:
            return
        self.open_trials.add(trial.trial_id)
        if trial.trial_id in self.run_ids:  # started in an earlier session of a resumed search
            self.writes.add(trial.trial_id, "update_run", {"status": "RUNNING"})
            if trial.trial_id in self.without_params:  # that session's driver died before the params
                self.without_params.discard(trial.trial_id)
                self.log_params(trial)
            return
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial_id": trial.trial_id, "run_kind": "trial",
                "ray.trial_path": trial.path}
        self.writes.add(trial.trial_id, "create_run", {"experiment_id": self.experiment_id, "run_name": str(trial),
                                                       "tags": tags, "start_time": now_ms()})
        self.log_params(trial)

    def log_params(self, trial: Any) -> None:
        params = [Param(k, truncate(str(v))) for k, v in sorted(flatten_dict(trial.config).items())]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.writes.add(trial.trial_id, "log_batch", batch(params=params[start:start + MAX_PARAMS_PER_BATCH]))

    @hook
    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        step = int(result["epoch"]) if "epoch" in result else int(result["training_iteration"])
        now = now_ms()
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        if self.replayed(trial.trial_id, result, step):
            metrics = []
        tags = [RunTag(k, v) for k, v in string_tags(result).items()]
        tags += self.exploit_tags(trial, result, step)
        self.writes.add(trial.trial_id, "log_batch", batch(metrics, tags=tags))
        if TIME_TOTAL_S in result:
            self.trial_time_s[trial.trial_id] = float(result[TIME_TOTAL_S])

    def replayed(self, trial_id: str, result: dict, step: int) -> bool:
        """An epoch the trial's run already has, trained again from the trial's own older state.

        A restarted worker or an unreadable checkpoint (trainable.restore_readable) rewinds a trial to
        an earlier checkpoint, and `--resume` after a killed driver to Tune's last saved state (every
        ~10 s). The run keeps the first value of each step: one point per epoch. A PBT exploit also
        rewinds, but onto another trial's lineage, whose epochs are logged (and tagged pbt.exploits).
        """
        donor = result.get("restored_from")
        if step <= self.logged_steps.get(trial_id, 0) and donor in (None, "", trial_id):
            return True
        self.logged_steps[trial_id] = step
        return False

    def exploit_tags(self, trial: Any, result: dict, epoch: int) -> list[RunTag]:
        """PBT: a trial that copied another keeps its own run; record each donor and the config it now has."""
        donor = result.get("restored_from")
        notes = self.exploits[trial.trial_id]
        own = donor == trial.trial_id  # a trial resumed from its own checkpoint (HyperBand, a retry)
        if not isinstance(donor, str) or not donor or own or (notes and notes[-1][1] == donor):
            return []
        notes.append((epoch, donor))
        return [RunTag("pbt.exploits", truncate("; ".join(f"epoch {e}: from {d}" for e, d in notes))),
                RunTag("pbt.config", truncate(json.dumps(flatten_dict(trial.config), default=str)))]

    @hook
    def on_trial_complete(self, trial: Any, **info: Any) -> None:
        self.finish_trial(trial, RunStatus.FINISHED, self.stop_reason(trial), "TERMINATED")

    @hook
    def on_trial_error(self, trial: Any, **info: Any) -> None:
        self.finish_trial(trial, RunStatus.FAILED, "error", "ERROR", error_line(trial))

    def stop_reason(self, trial: Any) -> str:
        """The GAN stopper's reason; else diverged, completed, or stopped early by the scheduler."""
        if trial.trial_id in self.stop_reasons:
            return self.stop_reasons[trial.trial_id]
        last = trial.last_result
        if last.get("balance") == "diverged":  # the trainable ends a diverged run itself
            return "diverged"
        epoch = last.get("epoch", last.get("training_iteration", 0))
        return "completed" if epoch >= self.max_epochs else f"{self.scheduler} early stop"

    def finish_trial(self, trial: Any, status: int, reason: str, tune_status: str, error: str = "") -> None:
        """Tags (stop_reason, Tune's trial_status, error), trial files and overhead; then end the child run."""
        if trial.trial_id not in self.open_trials:
            return
        self.outcomes[trial.trial_id] = reason
        tags = [RunTag("stop_reason", reason), RunTag("trial_status", tune_status)]
        if error:
            tags.append(RunTag("error", truncate(error)))
        try:
            self.upload_trial_files(trial)
        finally:
            overhead = Metric("mlflow_overhead_s", self.overhead_s[trial.trial_id], now_ms(), 0)
            self.writes.add(trial.trial_id, "log_batch", batch([overhead], tags=tags))
            self.writes.add(trial.trial_id, "set_terminated", {"status": RunStatus.to_string(status),
                                                               "end_time": now_ms()})
            self.open_trials.discard(trial.trial_id)

    def files_to_upload(self, trial: Any) -> TrialFiles:
        """Trial files not uploaded yet (or grown since); the newest copy of each."""
        done = self.uploaded[trial.trial_id]
        return {rel: (fs, info) for rel, (fs, info) in trial_files(trial).items() if done.get(rel) != info.size}

    def upload_trial_files(self, trial: Any) -> None:
        if self.writes.queue:  # the store is down, or the run not made yet: on_experiment_end tries again
            return
        todo = self.files_to_upload(trial)
        if todo:
            upload_files(self.client, self.run_ids[trial.trial_id], todo)
            self.uploaded[trial.trial_id].update({rel: info.size for rel, (_, info) in todo.items()})

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
                    if trial.trial_id in self.open_trials:
                        self.finish_trial(trial, RunStatus.KILLED, "search ended", trial.status)
                    else:  # finished in this session: its final sync came after
                        self.upload_trial_files(trial)
                except Exception as err:  # counted and reported like every tracking failure
                    self.warn(f"on_experiment_end for trial {trial}: {type(err).__name__}: {err}")
                self.overhead_s[trial.trial_id] += time.perf_counter() - start
            outcomes = json.dumps(dict(Counter(self.outcomes.values())))
            self.writes.add(None, "log_batch", batch(tags=[RunTag("trial_outcomes", outcomes)]), self.parent_run_id)
        self.summarise(self.save_undelivered(trials))

    def save_undelivered(self, trials: list) -> tuple[str, int] | None:
        """Append the writes the store never took to the study folder's UNDELIVERED file: (its path, how many).

        Trial files not uploaded become one upload_files entry per trial, and a last entry ends the parent
        run, which search_run.finish_search_run cannot reach either (its best-trial record is not replayed).
        """
        files = [{"trial_id": t.trial_id, "run_id": None, "kind": "upload_files", "payload": {"folder": t.path}}
                 for t in trials if t.trial_id in self.outcomes and self.files_to_upload(t)]
        left = [*self.writes.queue, *files]
        if not left or not trials:
            return None
        left.append({"trial_id": None, "run_id": self.parent_run_id, "kind": "set_terminated",
                     "payload": {"status": "FINISHED", "end_time": now_ms()}})
        entries = [{**entry, "run_id": entry["run_id"] or self.run_ids.get(entry["trial_id"])} for entry in left]
        return write_undelivered(trials[0].storage, entries), len(entries)

    def summarise(self, undelivered: tuple[str, int] | None) -> None:
        counts = Counter(self.outcomes.values())
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
