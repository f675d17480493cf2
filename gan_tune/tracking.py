"""MLflow tracking of a search: one parent run per search, one child run per Tune trial.

Every MLflow write happens in the Ray driver process. A sqlite store takes one writer at a time, and
several processes creating a fresh store at once race on its schema migration, so trials never talk to
MLflow: `check_tracking` creates the store, `start_search_run` the experiment and the parent run, and
`TrackingCallback` (a `ray.tune.Callback`, which Ray runs in the driver) turns each trial's reported
results into child-run metrics with explicit run ids (MlflowClient, not the fluent active-run stack).

Trial files (sample grids, GIF, history) are read where Ray keeps them: the run's storage path on its
pyarrow filesystem (local, NFS, or s3:// / gs:// through pyarrow), plus the driver-local trial folders
when the trial ran on the driver's node. Ray uploads a worker's trial folder to the storage path only
with `tune.SyncConfig(sync_artifacts=True)`, at each checkpointed report and once more when the trial
actor stops, which is after `on_trial_complete`; `on_experiment_end` therefore uploads what arrived late.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlparse

import mlflow
import pyarrow.fs as pafs
import requests
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS, TIME_THIS_ITER_S, TIME_TOTAL_S
from ray.tune.utils import flatten_dict

import gan_tune
from gan_tune.config import ConfigError
from gan_tune.train import CHECKPOINT, generate, generator_from_state, read_checkpoint

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "gan_tune"
SERVER_CHECK_TIMEOUT_S = 3.0  # a search should not wait on a dead tracking server before its first trial
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "databricks", "http", "https", "file", "")
# The files a trial writes (artifacts.py) that its child run gets; checkpoints stay in Ray's storage.
TRIAL_FILES = ("samples/epoch_*.png", "final_grid.png", "progress.gif", "history.png", "history.csv")
# Ray's bookkeeping keys are not metrics; its timings are.
NOT_METRICS = (set(DEBUG_METRICS) | set(AUTO_RESULT_KEYS) | {"done", "should_checkpoint", "epoch"}) \
    - {TIME_THIS_ITER_S, TIME_TOTAL_S}
MODEL_NAME = "generator"
EXPERIMENT_PATH_TAG = "ray.experiment_path"
MODEL_EXAMPLE_BATCH = 4  # > 1 so torch.export keeps the batch dimension dynamic
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
SEARCH_PAGE = 10_000  # runs per search_runs call; a study has far fewer trials
MAX_TAG_CHARS = 5000  # MLflow caps tag values at 8000 characters


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent calls (log_model, search_runs, load_model: no client form) at `uri` for a block.

    mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI, which a later search in the same process
    (tests, notebooks) would inherit as its default; both are put back afterwards.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # clears the global and the variable ...
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env  # ... which then gets its old value back


def resolve_tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def open_client(uri: str) -> MlflowClient:
    """A client on an existing store, for readers (report, sample): never creates an empty sqlite file."""
    if uri.startswith("sqlite:///") and not Path(uri.split(":///", 1)[1]).is_file():
        raise ConfigError("--tracking-uri", f"{uri}: no such sqlite store")
    return MlflowClient(uri)


def check_tracking(uri: str) -> None:
    """Fail fast, before any trial starts, with a one-line ConfigError naming --tracking-uri.

    An http(s) server must answer GET /health within 3 s; a sqlite file must be writable, and its
    store is created here, in the driver, so trials never race on the schema migration.
    """
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in DB_SCHEMES or (scheme == "" and "://" in uri):
        raise ConfigError("--tracking-uri", f"{uri}: unknown scheme {scheme!r} (use sqlite:///mlflow.db, "
                                            "http(s)://host:port, postgresql://, mysql:// or mssql://)")
    if scheme in ("http", "https"):
        check_server(uri)
    elif scheme == "sqlite":
        check_sqlite(uri)
    elif scheme in ("file", "") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise ConfigError("--tracking-uri", f"{uri}: MLflow 3 refuses the file store unless "
                                            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlflow.db")


def check_server(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        reply = requests.get(url, timeout=SERVER_CHECK_TIMEOUT_S)
    except requests.RequestException as err:
        raise ConfigError("--tracking-uri", f"{uri}: no MLflow server answered GET /health within "
                                            f"{SERVER_CHECK_TIMEOUT_S:g} s ({type(err).__name__})") from None
    if reply.status_code != 200:
        raise ConfigError("--tracking-uri", f"{uri}: GET /health answered HTTP {reply.status_code}")


def check_sqlite(uri: str) -> None:
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    if path in ("", ":memory:"):
        raise ConfigError("--tracking-uri", f"{uri}: an in-memory sqlite store loses every run; name a file")
    try:
        with open(path, "ab"):  # sqlite needs the file and, for its journal, the folder writable
            pass
        if not os.access(Path(path).resolve().parent, os.W_OK):
            raise PermissionError("folder not writable")
    except OSError as err:
        raise ConfigError("--tracking-uri", f"{uri}: sqlite store not writable ({first_line(err)})") from None
    db_log = logging.getLogger("mlflow.store.db.utils")
    level = db_log.level
    db_log.setLevel(logging.WARNING)  # its "Creating initial MLflow database tables" INFO would add stderr lines
    try:
        MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the store, here
    except Exception as err:  # sqlalchemy's OperationalError/DatabaseError for a file that is no sqlite store
        raise ConfigError("--tracking-uri", f"{uri}: cannot open the sqlite store ({first_line(err)})") from None
    finally:
        db_log.setLevel(level)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it if needed; a sqlite store keeps new artifacts in mlruns/ beside it."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None  # a server or database store: its own artifact root
    if urlparse(tracking_uri).scheme == "sqlite":  # MLflow's default would be ./mlruns of the current folder
        folder = Path(tracking_uri.split(":///", 1)[1]).resolve().parent
        location = (folder / "mlruns" / re.sub(r"[^\w.-]", "_", name)).as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str | None:
    """The checkout's commit, when gan_tune runs from a git checkout with git installed."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(gan_tune.__file__).parent,
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def start_search_run(tracking_uri: str, experiment: str, space_name: str, space_path: str | Path,
                     resolved_args: dict[str, Any], data_source: str, scheduler: str, search_alg: str,
                     experiment_path: str | Path | None = None) -> str:
    """Create the search's parent run (tags, the space YAML, the resolved CLI args); returns its id.

    `experiment_path` (Ray's study folder) lets a resumed search find its parent again (find_search_run).
    """
    client = MlflowClient(tracking_uri)
    space_text = Path(space_path).read_text()
    tags = {"space": space_name, "scheduler": scheduler, "search_alg": search_alg, "data_source": data_source,
            "gan_tune_version": gan_tune.__version__, "run_kind": "search",
            "mlflow.note.content": description(space_text)}
    if experiment_path is not None:
        tags[EXPERIMENT_PATH_TAG] = str(experiment_path)
    if commit := git_commit():
        tags[MLFLOW_GIT_COMMIT] = commit
    run = client.create_run(experiment_id(client, experiment, tracking_uri), tags=tags,
                            run_name=f"{space_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_id = run.info.run_id
    params = [Param(f"search.{k}", truncate(v if isinstance(v, str) else json.dumps(v, default=str)))
              for k, v in sorted(resolved_args.items())]
    for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])
    client.log_text(run_id, space_text, f"space/{Path(space_path).name}")
    client.log_dict(run_id, json.loads(json.dumps(resolved_args, default=str)), "search_args.json")
    return run_id


def find_search_run(tracking_uri: str, experiment: str, experiment_path: str | Path) -> str | None:
    """The parent run of the study at `experiment_path` (for --resume), or None."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.`{EXPERIMENT_PATH_TAG}` = '{experiment_path}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def description(space_text: str) -> str:
    import yaml

    data = yaml.safe_load(space_text)
    return str(data.get("description", "")).strip() if isinstance(data, dict) else ""


def truncate(text: str, limit: int = MAX_TAG_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finish_search_run(tracking_uri: str, run_id: str, best_result: Any | None, metric: str, mode: str,
                      status: str = "FINISHED") -> None:
    """Record the best trial on the parent run (tags, best.* params, metrics, generator model), then end it.

    `best_result` is a `ray.tune.Result` (`ResultGrid.get_best_result()`), or None when no trial scored.
    Its best kept checkpoint by `metric` (the playbook: pick the checkpoint in hindsight) supplies the
    generator and the metrics logged on the parent. The parent run is ended even if that logging fails.
    """
    client = MlflowClient(tracking_uri)
    try:
        if best_result is not None:
            log_best_trial(client, tracking_uri, run_id, best_result, metric, mode)
    except Exception as err:  # the study's results stand; the failure is printed and tagged on the run
        print(f"mlflow: could not record the best trial on run {run_id}: {type(err).__name__}: {err}",
              file=sys.stderr)
        client.set_tag(run_id, "tracking_error", truncate(f"{type(err).__name__}: {err}"))
    finally:
        client.set_terminated(run_id, status)


def log_best_trial(client: MlflowClient, tracking_uri: str, run_id: str, best_result: Any, metric: str,
                   mode: str) -> None:
    checkpoint, metrics = best_checkpoint(best_result, metric, mode)
    trial_id = str(best_result.metrics.get("trial_id", ""))
    tags = [RunTag("best.trial_id", trial_id), RunTag("best.path", str(best_result.path)),
            RunTag("best.epoch", str(metrics.get("epoch", "")))]
    if child := child_run_id(client, run_id, trial_id):
        tags.append(RunTag("best.run_id", child))
    params = [Param(f"best.{k}", truncate(str(v))) for k, v in sorted(flatten_dict(best_result.config).items())]
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in numeric_metrics(metrics).items()], tags=tags)
    for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])
    if checkpoint is not None:
        log_generator(tracking_uri, run_id, checkpoint)


def best_checkpoint(result: Any, metric: str, mode: str) -> tuple[tune.Checkpoint | None, dict]:
    """(checkpoint, the report it was saved with): the best kept one by `metric`, else the latest."""
    sign = 1 if mode == "min" else -1
    scored = [(ckpt, m) for ckpt, m in (result.best_checkpoints or [])
              if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    if scored:
        return min(scored, key=lambda pair: sign * pair[1][metric])
    return result.checkpoint, dict(result.metrics)


def child_run_id(client: MlflowClient, parent_run_id: str, trial_id: str) -> str | None:
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' "
                                            f"and tags.trial_id = '{trial_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def load_generator(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, int]:
    """The generator (eval mode, CPU) and latent size from a trial checkpoint written with train.state()."""
    path = Path(checkpoint_dir) / CHECKPOINT
    g, cfg = generator_from_state(read_checkpoint(path, torch.device("cpu")), where=str(path))
    return g.eval(), cfg.latent_dim


def log_generator(tracking_uri: str, run_id: str, checkpoint: tune.Checkpoint) -> None:
    """Log the checkpoint's generator as an MLflow model named `generator` (pt2: torch.export, no pickle)."""
    with checkpoint.as_directory() as directory:
        g, latent_dim = load_generator(directory)
    noise = torch.randn(MODEL_EXAMPLE_BATCH, latent_dim, generator=torch.Generator().manual_seed(0))
    signature = infer_signature(noise.numpy(), generate(g, noise).numpy())
    with using_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):  # the run's experiment gets the model
        mlflow.pytorch.log_model(g, name=MODEL_NAME, input_example=noise.numpy(), signature=signature,
                                 serialization_format="pt2", pip_requirements=model_requirements())


def model_requirements() -> list[str]:
    """A pt2 model needs only torch to load; stating it skips MLflow's ~10 s requirement inference."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The result's reported numbers (bools and Ray bookkeeping left out); NaN stays, MLflow stores it."""
    return {k: float(v) for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def string_tags(result: Mapping[str, Any]) -> dict[str, str]:
    """Reported strings (balance, node_id, data_source, restored_from) become tags holding the latest value."""
    return {k: truncate(v) for k, v in result.items() if k not in NOT_METRICS and isinstance(v, str) and v}


def hook(method: Callable) -> Callable:
    """Wrap a callback hook: time it per trial, and turn any tracking error into a counted warning.

    An exception escaping a Tune callback aborts the whole search; a tracking hiccup must not.
    """

    @functools.wraps(method)
    def run(self: "TrackingCallback", iteration: int, trials: list, trial: Any, **info: Any) -> None:
        start = time.perf_counter()
        try:
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
        self.run_ids: dict[str, str] = {}  # trial_id -> child run id
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
        parent = self.client.get_run(self.parent_run_id)
        self.experiment_id = parent.info.experiment_id
        if parent.info.status != "RUNNING":
            self.client.update_run(self.parent_run_id, status="RUNNING")
        for run in self.client.search_runs([self.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = "
                                           f"'{self.parent_run_id}'", max_results=SEARCH_PAGE):
            if "trial_id" in run.data.tags:
                self.run_ids.setdefault(run.data.tags["trial_id"], run.info.run_id)

    def warn(self, message: str) -> None:
        self.failures.append(message)
        log.warning("mlflow tracking: %s", message)

    @hook
    def on_trial_start(self, trial: Any, **info: Any) -> None:
        """Create the child run; a trial started again (PBT, HyperBand, a retry, --resume) keeps its run."""
        if trial.trial_id in self.run_ids:
            if trial.trial_id not in self.open_trials:  # finished in an earlier session of a resumed search
                self.client.update_run(self.run_ids[trial.trial_id], status="RUNNING")
                self.open_trials.add(trial.trial_id)
            return
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial_id": trial.trial_id, "run_kind": "trial",
                "ray.trial_path": trial.path}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=str(trial))
        self.run_ids[trial.trial_id] = run.info.run_id
        self.open_trials.add(trial.trial_id)
        params = [Param(k, truncate(str(v))) for k, v in sorted(flatten_dict(trial.config).items())]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])

    @hook
    def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
        step = int(result["epoch"]) if "epoch" in result else int(result["training_iteration"])
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        tags = [RunTag(k, v) for k, v in string_tags(result).items()]
        tags += self.exploit_tags(trial, result, step)
        self.client.log_batch(self.run_ids[trial.trial_id], metrics=metrics, tags=tags)
        if TIME_TOTAL_S in result:
            self.trial_time_s[trial.trial_id] = float(result[TIME_TOTAL_S])

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
        run_id = self.run_ids[trial.trial_id]
        self.outcomes[trial.trial_id] = reason
        tags = [RunTag("stop_reason", reason), RunTag("trial_status", tune_status)]
        if error:
            tags.append(RunTag("error", truncate(error)))
        try:
            self.upload_trial_files(trial)
        finally:
            overhead = Metric("mlflow_overhead_s", self.overhead_s[trial.trial_id], int(time.time() * 1000), 0)
            self.client.log_batch(run_id, metrics=[overhead], tags=tags)
            self.client.set_terminated(run_id, RunStatus.to_string(status))
            self.open_trials.discard(trial.trial_id)

    def upload_trial_files(self, trial: Any) -> None:
        """Upload trial files not uploaded yet (or grown since); the newest copy of each wins."""
        found = trial_files(trial)
        done = self.uploaded[trial.trial_id]
        todo = {rel: (fs, info) for rel, (fs, info) in found.items() if done.get(rel) != info.size}
        if not todo:
            return
        with tempfile.TemporaryDirectory(prefix="gan_tune_mlflow_") as staging:
            for rel, (fs, info) in todo.items():
                target = Path(staging, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(info.path) as src:  # s3:// etc. download through pyarrow
                    target.write_bytes(src.read())
            self.client.log_artifacts(self.run_ids[trial.trial_id], staging)
        done.update({rel: info.size for rel, (_, info) in todo.items()})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Close trials the search ended (time budget, Ctrl-C), upload late-synced files, summarise."""
        for trial in trials:
            if trial.trial_id not in self.run_ids:
                continue
            start = time.perf_counter()
            try:
                if trial.trial_id in self.open_trials:
                    self.finish_trial(trial, RunStatus.KILLED, "search ended", trial.status)
                elif trial.trial_id in self.uploaded:  # finished in this session: its final sync came after
                    self.upload_trial_files(trial)
            except Exception as err:  # counted and reported like every tracking failure
                self.warn(f"on_experiment_end for trial {trial}: {type(err).__name__}: {err}")
            self.overhead_s[trial.trial_id] += time.perf_counter() - start
        self.summarise()

    def summarise(self) -> None:
        counts = Counter(self.outcomes.values())
        try:
            self.client.set_tag(self.parent_run_id, "trial_outcomes", json.dumps(dict(counts)))
        except Exception as err:  # counted and reported like every tracking failure
            self.warn(f"summary tag: {type(err).__name__}: {err}")
        print(f"mlflow: {len(self.run_ids)} trial runs under parent {self.parent_run_id} at {self.tracking_uri}; "
              f"outcomes {dict(counts)}; {overhead_line(self.overhead_s, self.trial_time_s)}", file=sys.stderr)
        if self.failures:
            print(f"mlflow: {len(self.failures)} tracking failures (warnings above), first: {self.failures[0]}",
                  file=sys.stderr)


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


def trial_sources(trial: Any) -> list[tuple[pafs.FileSystem, str]]:
    """Where a trial's files may be: its storage-path folder, then driver-local working and staging folders."""
    local = pafs.LocalFileSystem()
    return [(trial.storage.storage_filesystem, trial.path),
            (local, trial.storage.trial_working_directory),
            (local, trial.local_path)]


def trial_files(trial: Any) -> dict[str, tuple[pafs.FileSystem, pafs.FileInfo]]:
    """{path relative to the trial folder: (filesystem, info)} for TRIAL_FILES, newest copy of each."""
    found: dict[str, tuple[pafs.FileSystem, pafs.FileInfo]] = {}
    for fs, root in trial_sources(trial):
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        for info in infos:
            rel = info.path[len(root.rstrip("/")) + 1:] if info.path.startswith(root.rstrip("/")) else info.base_name
            if info.type != pafs.FileType.File or not any(fnmatch.fnmatch(rel, p) for p in TRIAL_FILES):
                continue
            if rel not in found or newer(info, found[rel][1]):
                found[rel] = (fs, info)
    return found


def newer(a: pafs.FileInfo, b: pafs.FileInfo) -> bool:
    a_time, b_time = a.mtime_ns or 0, b.mtime_ns or 0
    return a_time > b_time or (a_time == b_time and (a.size or 0) > (b.size or 0))
