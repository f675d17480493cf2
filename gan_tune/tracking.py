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

A store that goes away mid-search (a server restart, a locked sqlite file) never stops a trial. The
callback's writes go through `PendingWrites`: one the store refuses waits there, in order, and later hooks
retry it. The end of the search gives the store a last FINAL_PATIENCE_S; what it still refuses is saved as
JSON lines in the study folder (UNDELIVERED), which `python -m gan_tune.tracking replay FILE` delivers once
the store is back. Ray keeps every epoch's metrics in each trial's result.json and progress.csv regardless.
"""

from __future__ import annotations

import argparse
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
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import urlparse

import mlflow
import pyarrow.fs as pafs
import requests
import sqlalchemy
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS, TIME_THIS_ITER_S, TIME_TOTAL_S
from ray.tune.utils import flatten_dict

import gan_tune
from gan_tune.config import CliParser, ConfigError
from gan_tune import checkpoint
from gan_tune.train import generate

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "gan_tune"
SERVER_CHECK_TIMEOUT_S = 3.0  # a search should not wait on a dead tracking server before its first trial
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "databricks", "http", "https", "file", "")
SQL_SERVERS = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores whose Python driver is a separate package
DRIVER_EXTRAS = {"postgresql": "gan_tune[postgres]"}  # pyproject.toml's extra for the driver
# The files a trial writes (artifacts.py) that its child run gets; checkpoints stay in Ray's storage.
TRIAL_FILES = ("samples/epoch_*.png", "final_grid.png", "progress.gif", "history.png", "history.csv")
# Ray's bookkeeping keys are not metrics; its timings are.
NOT_METRICS = (set(DEBUG_METRICS) | set(AUTO_RESULT_KEYS) | {"done", "should_checkpoint", "epoch"}) \
    - {TIME_THIS_ITER_S, TIME_TOTAL_S}
MODEL_NAME = "generator"
STEP_METRIC = "loss_d"  # a metric in every trial report
TrialFiles = dict[str, tuple[pafs.FileSystem, pafs.FileInfo]]  # path in the trial folder -> where to read it
EXPERIMENT_PATH_TAG = "ray.experiment_path"
MODEL_EXAMPLE_BATCH = 4  # > 1 so torch.export keeps the batch dimension dynamic
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
SEARCH_PAGE = 10_000  # runs per search_runs call; a study has far fewer trials
MAX_TAG_CHARS = 5000  # MLflow caps tag values at 8000 characters
RETRY_FIRST_S = 5.0  # a refused write is first retried after this; each failed retry doubles the wait ...
RETRY_MAX_S = 60.0  # ... up to a minute, as a black-holed server costs a full request timeout per retry
FINAL_PATIENCE_S = 30.0  # how long a search's end waits for the store: a server restarts in ~15-30 s
UNDELIVERED = "mlflow_undelivered.jsonl"  # in the study folder: the writes the store never took
UNDELIVERED_KEYS = {"trial_id", "run_id", "kind", "payload"}  # one PendingWrites entry per line
FAILURE_TAG = "failure_reason"  # on a search's parent run that ended FAILED
# MLflow's HTTP client retries a request 7 times over ~4 minutes by default, reading these variables on every
# request (mlflow/environment_variables.py). In the driver that would stall Tune's event loop, and with it
# every trial waiting in tune.report, for each write to a dead server; the driver fails fast instead and
# PendingWrites does the long-term retrying. A variable the user set wins.
FAIL_FAST_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # a keep-alive connection the restarted server dropped is retried
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",  # at once: a refused connection then costs milliseconds
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",  # (the default adds up to 1 s, meant for many clients)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",  # s; a write PendingWrites repeats after a lost reply is idempotent
}


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


@contextlib.contextmanager
def fail_fast_http() -> Iterator[None]:
    """MLflow HTTP requests in this block give up within seconds (FAIL_FAST_HTTP); variables already set stay."""
    unset = [name for name in FAIL_FAST_HTTP if name not in os.environ]
    os.environ.update({name: FAIL_FAST_HTTP[name] for name in unset})
    try:
        yield
    finally:
        for name in unset:
            os.environ.pop(name, None)


def is_outage(err: BaseException) -> bool:
    """A write the store may take later: no answer, a timeout, a 5xx reply, a locked sqlite file.

    MLflow wraps connection errors and exhausted retries in an MlflowException with INTERNAL_ERROR (500), and a
    locked sqlite file in one with TEMPORARILY_UNAVAILABLE (503); a 4xx (a bad value, a deleted run) fails the
    same way every time.
    """
    if isinstance(err, (requests.ConnectionError, requests.Timeout, sqlalchemy.exc.OperationalError)):
        return True
    return isinstance(err, MlflowException) and err.get_http_status_code() >= 500


def resolve_tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def open_client(uri: str) -> MlflowClient:
    """A client on an existing store, for readers (report, sample): never creates an empty sqlite file, and a
    server that does not answer fails within seconds (check_server) instead of after MLflow's retries."""
    scheme = check_scheme(uri)
    if uri.startswith("sqlite:///") and not Path(uri.split(":///", 1)[1]).is_file():
        raise ConfigError("--tracking-uri", f"{uri}: no such sqlite store")
    if scheme in ("http", "https"):
        check_server(uri)
    elif scheme in SQL_SERVERS:
        check_driver(uri, scheme)
    return MlflowClient(uri)


def check_scheme(uri: str) -> str:
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in DB_SCHEMES or (scheme == "" and "://" in uri):
        raise ConfigError("--tracking-uri", f"{uri}: unknown scheme {scheme!r} (use sqlite:///mlflow.db, "
                                            "http(s)://host:port, postgresql://, mysql:// or mssql://)")
    return scheme


def check_driver(uri: str, scheme: str) -> None:
    """A database store needs its Python driver (SQLAlchemy's choice for the URI), which MLflow imports only
    when it first connects, failing there with a ModuleNotFoundError traceback."""
    try:
        sqlalchemy.engine.make_url(uri).get_dialect().import_dbapi()
    except ImportError as err:
        package = DRIVER_EXTRAS.get(scheme, err.name)
        raise ConfigError("--tracking-uri", f"{uri}: its driver {err.name} is not installed: "
                                            f"pip install '{package}'") from None
    except sqlalchemy.exc.ArgumentError as err:  # an unparsable URL or an unknown +driver
        raise ConfigError("--tracking-uri", f"{uri}: {first_line(err)}") from None


def check_tracking(uri: str) -> None:
    """Fail fast, before any trial starts, with a one-line ConfigError naming --tracking-uri.

    An http(s) server must answer GET /health within 3 s; a sqlite file must be writable, and its
    store is created here, in the driver, so trials never race on the schema migration.
    """
    scheme = check_scheme(uri)
    if scheme in ("http", "https"):
        check_server(uri)
    elif scheme in SQL_SERVERS:
        check_driver(uri, scheme)
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
    with fail_fast_http():  # a server that went away must not hold up the end of the search for minutes
        try:
            if best_result is not None:
                log_best_trial(client, tracking_uri, run_id, best_result, metric, mode)
        except Exception as err:  # the study's results stand; the failure is printed and tagged on the run
            print(f"mlflow: could not record the best trial on run {run_id}: {type(err).__name__}: {err}",
                  file=sys.stderr)
            if not is_outage(err):  # an unreachable store takes no tag either
                client.set_tag(run_id, "tracking_error", truncate(f"{type(err).__name__}: {err}"))
        finally:
            end_search_run(client, run_id, status)


def fail_search_run(tracking_uri: str, run_id: str, reason: str) -> None:
    """End a search's parent run as FAILED with why (tag FAILURE_TAG): no search leaves its run RUNNING."""
    client = MlflowClient(tracking_uri)
    with fail_fast_http():
        try:
            client.set_tag(run_id, FAILURE_TAG, truncate(reason))
        except Exception as err:
            if not is_outage(err):
                raise
        end_search_run(client, run_id, "FAILED")


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """For commands that read the store: MLflow gives up within seconds, and a store that fails mid-command
    (a server that went away, a database that refuses) is one ConfigError naming --tracking-uri."""
    with fail_fast_http():
        try:
            yield
        except (MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError) as err:
            raise ConfigError("--tracking-uri", f"{uri}: the store failed ({first_line(err)})") from None


def end_search_run(client: MlflowClient, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception as err:
        if not is_outage(err):
            raise
        print(f"mlflow: the store is unreachable, the parent run {run_id} stays RUNNING: {first_line(err)}",
              file=sys.stderr)


def log_best_trial(client: MlflowClient, tracking_uri: str, run_id: str, best_result: Any, metric: str,
                   mode: str) -> None:
    best, metrics = best_checkpoint(best_result, metric, mode)
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
    if best is not None:
        log_generator(tracking_uri, run_id, best)


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


def log_generator(tracking_uri: str, run_id: str, best: tune.Checkpoint) -> None:
    """Log the checkpoint's generator as an MLflow model named `generator` (pt2: torch.export, no pickle)."""
    with best.as_directory() as directory:
        g, cfg, _ = checkpoint.load_generator(directory)
    noise = torch.randn(MODEL_EXAMPLE_BATCH, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
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


def last_step(client: MlflowClient, run_id: str) -> int:
    """The last epoch a run has metrics for (every report carries STEP_METRIC); 0 for none."""
    return max((m.step for m in client.get_metric_history(run_id, STEP_METRIC)), default=0)


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


def now_ms() -> int:
    return int(time.time() * 1000)


def batch(metrics: Iterable[Metric] = (), params: Iterable[Param] = (),
          tags: Iterable[RunTag] = ()) -> dict[str, list[dict[str, Any]]]:
    """A log_batch payload as plain JSON values, so an undelivered one can be saved and replayed."""
    return {"metrics": [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                        for m in metrics],
            "params": [{"key": p.key, "value": p.value} for p in params],
            "tags": [{"key": t.key, "value": t.value} for t in tags]}


def find_or_create_run(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str],
                       start_time: int) -> str:
    """The trial's child run; found, not made twice, when a create whose reply was lost (or a --resume before
    a replay) already made it."""
    found = child_run_id(client, tags[MLFLOW_PARENT_RUN_ID], tags["trial_id"])
    return found or client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name).info.run_id


# What a queued write does once its run id is known: kind -> (client, run id, payload).
WRITES: dict[str, Callable[[MlflowClient, str, dict], Any]] = {
    "log_batch": lambda client, run_id, p: client.log_batch(
        run_id, [Metric(**m) for m in p["metrics"]], [Param(**x) for x in p["params"]],
        [RunTag(**x) for x in p["tags"]]),
    "update_run": lambda client, run_id, p: client.update_run(run_id, status=p["status"]),
    "set_terminated": lambda client, run_id, p: client.set_terminated(run_id, p["status"], p["end_time"]),
    "upload_files": lambda client, run_id, p: upload_folder(client, run_id, p["folder"]),
}


def deliver(client: MlflowClient, entry: dict[str, Any], run_ids: dict[str, str]) -> None:
    """One queued write; a create_run entry records the run id that the trial's later entries resolve."""
    if entry["kind"] == "create_run":
        run_ids[entry["trial_id"]] = find_or_create_run(client, **entry["payload"])
        return
    run_id = entry["run_id"] or run_ids[entry["trial_id"]]  # KeyError: the store refused its create_run
    WRITES[entry["kind"]](client, run_id, entry["payload"])


class PendingWrites:
    """MLflow writes delivered in order. One the store refuses for now (is_outage) waits here with every write
    after it, and each later write first retries the queue, but no sooner than a growing delay (RETRY_FIRST_S
    up to RETRY_MAX_S): a dead server costs Tune's event loop one fast-failing request per retry, not per write.

    An entry is {"trial_id", "run_id", "kind", "payload"} of plain JSON values. A child run's entries carry only
    the trial id; the run id comes from the trial's create_run entry, itself queued, when they are delivered.
    """

    def __init__(self, client: MlflowClient, run_ids: dict[str, str], warn: Callable[[str], None]):
        self.client, self.run_ids, self.warn = client, run_ids, warn
        self.queue: deque[dict[str, Any]] = deque()
        self.down_since: float | None = None  # time.monotonic() of this outage's first refused write
        self.retry_s, self.next_try = RETRY_FIRST_S, 0.0
        self.late = 0  # writes delivered since this outage began (reset when it begins)
        self.refused = 0  # writes dropped: the store answered with an error a retry would repeat

    def add(self, trial_id: str | None, kind: str, payload: dict[str, Any], run_id: str | None = None) -> None:
        self.queue.append({"trial_id": trial_id, "run_id": run_id, "kind": kind, "payload": payload})
        self.flush()

    def flush(self) -> None:
        """Deliver up to the first write the store refuses; while it is down, only once a retry is due."""
        if self.down_since is not None and time.monotonic() < self.next_try:
            return
        while self.queue:
            entry = self.queue[0]
            try:
                deliver(self.client, entry, self.run_ids)
            except Exception as err:  # an outage keeps the entry; any other refusal would recur, so it is dropped
                if is_outage(err):
                    return self.went_down(err)
                self.refused += 1
                self.warn(f"{entry['kind']} for trial {entry['trial_id']}: {type(err).__name__}: {err}")
            else:
                self.late += 1
            self.queue.popleft()
        self.came_back()

    def went_down(self, err: BaseException) -> None:
        now = time.monotonic()
        if self.down_since is None:  # once per outage, not once per write
            self.down_since, self.late = now, 0
            self.warn(f"store unreachable, writes wait in order and are retried: {first_line(err)}")
        self.next_try = now + self.retry_s
        self.retry_s = min(2 * self.retry_s, RETRY_MAX_S)

    def came_back(self) -> None:
        if self.down_since is not None:
            log.warning("mlflow tracking: store back, delivered %d queued writes after %.0f s", self.late,
                        time.monotonic() - self.down_since)
        self.down_since, self.retry_s = None, RETRY_FIRST_S

    def drain(self, patience_s: float) -> None:
        """Retry now, then as retries fall due, until the queue is empty or `patience_s` has passed."""
        deadline = time.monotonic() + patience_s
        self.retry_s, self.next_try = RETRY_FIRST_S, 0.0
        self.flush()
        while self.queue and self.next_try <= deadline:
            time.sleep(max(0.0, self.next_try - time.monotonic()))
            self.flush()


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

    def warn(self, message: str) -> None:
        self.failures.append(message)
        log.warning("mlflow tracking: %s", message)

    @hook
    def on_trial_start(self, trial: Any, **info: Any) -> None:
        """Create the child run; a trial started again (PBT, HyperBand, a retry, --resume) keeps its run."""
        if trial.trial_id in self.open_trials:
            return
        self.open_trials.add(trial.trial_id)
        if trial.trial_id in self.run_ids:  # finished in an earlier session of a resumed search
            self.writes.add(trial.trial_id, "update_run", {"status": "RUNNING"})
            return
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial_id": trial.trial_id, "run_kind": "trial",
                "ray.trial_path": trial.path}
        self.writes.add(trial.trial_id, "create_run", {"experiment_id": self.experiment_id, "run_name": str(trial),
                                                       "tags": tags, "start_time": now_ms()})
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
        """Append the writes the store never took to UNDELIVERED in the study folder: (its path, how many).

        Trial files not uploaded become one upload_files entry per trial, and a last entry ends the parent
        run, which search.finish_search_run cannot reach either (its best-trial record is not replayed).
        """
        files = [{"trial_id": t.trial_id, "run_id": None, "kind": "upload_files", "payload": {"folder": t.path}}
                 for t in trials if t.trial_id in self.outcomes and self.files_to_upload(t)]
        left = [*self.writes.queue, *files]
        if not left or not trials:
            return None
        left.append({"trial_id": None, "run_id": self.parent_run_id, "kind": "set_terminated",
                     "payload": {"status": "FINISHED", "end_time": now_ms()}})
        lines = [json.dumps({**entry, "run_id": entry["run_id"] or self.run_ids.get(entry["trial_id"])})
                 for entry in left]
        storage = trials[0].storage  # the study folder on its filesystem: local, NFS or s3://
        fs, path = storage.storage_filesystem, f"{storage.experiment_fs_path}/{UNDELIVERED}"
        earlier = b""  # an earlier session of a resumed search may have left some
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as src:
                earlier = src.read()
        with fs.open_output_stream(path) as out:
            out.write(earlier + "".join(line + "\n" for line in lines).encode())
        return path, len(lines)

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


def trial_files(trial: Any) -> TrialFiles:
    return find_trial_files(trial_sources(trial))


def find_trial_files(sources: list[tuple[pafs.FileSystem, str]]) -> TrialFiles:
    """{path relative to the trial folder: (filesystem, info)} for TRIAL_FILES, newest copy of each."""
    found: TrialFiles = {}
    for fs, root in sources:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        for info in infos:
            rel = info.path[len(root.rstrip("/")) + 1:] if info.path.startswith(root.rstrip("/")) else info.base_name
            if info.type != pafs.FileType.File or not any(fnmatch.fnmatch(rel, p) for p in TRIAL_FILES):
                continue
            if rel not in found or newer(info, found[rel][1]):
                found[rel] = (fs, info)
    return found


def upload_files(client: MlflowClient, run_id: str, files: TrialFiles) -> None:
    """Log `files` (find_trial_files) as the run's artifacts, at their paths relative to the trial folder."""
    with tempfile.TemporaryDirectory(prefix="gan_tune_mlflow_") as staging:
        for rel, (fs, info) in files.items():
            target = Path(staging, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src:  # s3:// etc. download through pyarrow
                target.write_bytes(src.read())
        client.log_artifacts(run_id, staging)


def upload_folder(client: MlflowClient, run_id: str, folder: str) -> None:
    """A replayed upload_files entry: the trial files in a trial folder this machine can read."""
    if not Path(folder).is_dir():  # remote storage (s3://) is not read here: copy the folder over first
        raise FileNotFoundError(f"no trial folder {folder} on this machine")
    upload_files(client, run_id, find_trial_files([(pafs.LocalFileSystem(), folder)]))


def newer(a: pafs.FileInfo, b: pafs.FileInfo) -> bool:
    a_time, b_time = a.mtime_ns or 0, b.mtime_ns or 0
    return a_time > b_time or (a_time == b_time and (a.size or 0) > (b.size or 0))


def replay(path: Path, tracking_uri: str) -> int:
    """Deliver the writes a search saved in `path` (UNDELIVERED); 0 when the store took them all.

    The file is removed then; otherwise it stays, and replaying it again is safe: a run is found before it is
    created, and MLflow keeps one copy of a metric logged twice with the same step and timestamp.
    """
    def warn(message: str) -> None:
        print(f"mlflow: {message}", file=sys.stderr)

    entries = read_undelivered(path)
    writes = PendingWrites(MlflowClient(tracking_uri), {}, warn)
    writes.queue.extend(entries)
    with fail_fast_http():
        writes.drain(FINAL_PATIENCE_S)
    waiting, refused = len(writes.queue), writes.refused
    print(f"mlflow: delivered {len(entries) - waiting - refused} of {len(entries)} writes from {path} to "
          f"{tracking_uri}; {refused} refused (warnings above), {waiting} still wait for the store",
          file=sys.stderr)
    if waiting or refused:
        return 1
    path.unlink()
    return 0


def read_undelivered(path: Path) -> list[dict[str, Any]]:
    """The entries of an UNDELIVERED file; a damaged one (not JSON lines, cut short, another file) names the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(f"byte {err.start}", f"not UTF-8 text; expected a study's {UNDELIVERED}",
                          where=str(path)) from None
    except OSError as err:
        raise ConfigError("file", f"unreadable ({err.strerror or type(err).__name__})", where=str(path)) from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"line {number}", f"not a JSON line ({first_line(err)}); expected a study's "
                                                f"{UNDELIVERED}", where=str(path)) from None
        if not (isinstance(entry, dict) and entry.keys() == UNDELIVERED_KEYS and isinstance(entry["payload"], dict)
                and entry["kind"] in (*WRITES, "create_run")):
            raise ConfigError(f"line {number}", f"not a saved MLflow write (keys {', '.join(sorted(UNDELIVERED_KEYS))}"
                                                f"; kind one of create_run, {', '.join(WRITES)})", where=str(path))
        entries.append(entry)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m gan_tune.tracking",
                                     description="Deliver MLflow writes a search saved while its store was away")
    parser.add_argument("command", choices=["replay"])
    parser.add_argument("file", type=Path, help=f"a study folder's {UNDELIVERED}")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///mlflow.db in the working directory)")
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        if not args.file.is_file():
            raise ConfigError("file", f"{args.file}: no such file")
        read_undelivered(args.file)  # a damaged file fails before the store is touched
        check_tracking(uri)
        return replay(args.file, uri)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
