"""The search's parent MLflow run: made with the space and the resolved CLI args, found again by --resume,
ended with the best trial (tags, best.* params, metrics, the generator as an MLflow model) or FAILED with why.

Like every MLflow write, these happen in the Ray driver: `start_search_run` creates the experiment and the
parent run before any trial starts, and the trials' child runs (child_runs) hang under it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_DEFAULT_PREDICTION_DEVICE
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.tune.result import (
    AUTO_RESULT_KEYS,
    DEBUG_METRICS,
    TIME_THIS_ITER_S,
    TIME_TOTAL_S,
)
from ray.tune.utils import flatten_dict

import gan_tune
from gan_tune.tracking.store import (
    fail_fast_http,
    is_outage,
    now_ms,
    using_tracking_uri,
)
from gan_tune.training import checkpoint
from gan_tune.training.cohort import config_of
from gan_tune.training.config import first_line
from gan_tune.training.loop import generate

MODEL_NAME = "generator"
EXPERIMENT_PATH_TAG = "ray.experiment_path"
FAILURE_TAG = "failure_reason"  # on a search's parent run that ended FAILED
MODEL_EXAMPLE_BATCH = 4  # > 1 so torch.export keeps the batch dimension dynamic
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_TAG_CHARS = 5000  # MLflow caps tag values at 8000 characters
# Ray's bookkeeping keys are not metrics; its timings are.
NOT_METRICS = (set(DEBUG_METRICS) | set(AUTO_RESULT_KEYS) | {"done", "should_checkpoint", "epoch"}) \
    - {TIME_THIS_ITER_S, TIME_TOTAL_S}


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


def description(space_text: str) -> str:
    import yaml

    data = yaml.safe_load(space_text)
    return str(data.get("description", "")).strip() if isinstance(data, dict) else ""


def find_search_run(tracking_uri: str, experiment: str, experiment_path: str | Path) -> str | None:
    """The parent run of the study at `experiment_path` (for --resume), or None."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.`{EXPERIMENT_PATH_TAG}` = '{experiment_path}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


EDGE_TAG = "best.edge_warning"  # the best values at the edge of their searched range (tuning.summary.edge_warnings)
RESCORED_TAG = "best.rescored_samples"  # the samples the kept generator was scored again on (tuning.finalists)


def finish_search_run(tracking_uri: str, run_id: str, best_result: Any | None, metric: str, mode: str,
                      status: str = "FINISHED", edge_warnings: list[str] = (),
                      chosen: tuple[tune.Checkpoint | None, dict] | None = None,
                      rescored: Mapping[str, float] | None = None) -> None:
    """Record the best trial on the parent run (tags, best.* params, metrics, generator model), then end it.

    `best_result` is a `ray.tune.Result` (`ResultGrid.get_best_result()`), or None when no trial scored;
    `edge_warnings` go into the EDGE_TAG tag, one per line, for the report.
    `chosen` is (checkpoint, the report it was saved with) of the generator the search keeps; by default the
    result's best kept checkpoint by `metric` (the playbook: pick the checkpoint in hindsight). It supplies
    the generator and the metrics logged on the parent. `rescored` (finalists.rescore's scores of that
    checkpoint) is logged beside them as fid_10k, is_10k, ... The parent run is ended even if logging fails.
    """
    client = MlflowClient(tracking_uri)
    with fail_fast_http():  # a server that went away must not hold up the end of the search for minutes
        try:
            if best_result is not None:
                log_best_trial(client, tracking_uri, run_id, best_result,
                               chosen or best_checkpoint(best_result, metric, mode), rescored or {})
            if edge_warnings:
                client.set_tag(run_id, EDGE_TAG, truncate("\n".join(edge_warnings)))
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


def end_search_run(client: MlflowClient, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception as err:
        if not is_outage(err):
            raise
        print(f"mlflow: the store is unreachable, the parent run {run_id} stays RUNNING: {first_line(err)}",
              file=sys.stderr)


def log_best_trial(client: MlflowClient, tracking_uri: str, run_id: str, best_result: Any,
                   chosen: tuple[tune.Checkpoint | None, dict], rescored: Mapping[str, float]) -> None:
    best, metrics = chosen
    trial_id = str(best_result.metrics.get("trial_id", ""))
    tags = [RunTag("best.trial_id", trial_id), RunTag("best.path", str(best_result.path)),
            RunTag("best.epoch", str(metrics.get("epoch", "")))]
    key, config = best_configuration(trial_id, best_result.config, metrics)
    if key != trial_id:
        tags.append(RunTag("best.member", key))
    if child := child_run_id(client, run_id, key):
        tags.append(RunTag("best.run_id", child))
    params = [Param(f"best.{k}", truncate(str(v))) for k, v in sorted(flatten_dict(config).items())]
    if rescored:
        tags.append(RunTag(RESCORED_TAG, str(rescored["fid_samples"])))
    logged = {**numeric_metrics(metrics), **rescored_metrics(rescored)}
    now = now_ms()
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in logged.items()], tags=tags)
    for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])
    if best is not None:
        log_generator(tracking_uri, run_id, best)


def best_configuration(trial_id: str, config: dict, report: Mapping[str, Any]) -> tuple[str, dict]:
    """(its run's trial_id tag, its config) of the configuration behind the chosen report: for a cohort trial,
    the member the report names as its best (a cohort trial has no run, its members do), else the trial."""
    member = report.get("member")
    return (member or trial_id), config_of(config, member)


def rescored_metrics(scores: Mapping[str, float]) -> dict[str, float]:
    """finalists.rescore's scores as metric names carrying the sample count: fid_10k, is_10k, ..."""
    if not scores:
        return {}
    n = int(scores["fid_samples"])
    return {rescored_name(key, n): float(value) for key, value in scores.items() if key != "fid_samples"}


def rescored_name(metric: str, samples: int) -> str:
    """fid on 10000 samples -> fid_10k; on 2500 -> fid_2500."""
    return f"{metric}_{samples // 1000}k" if samples % 1000 == 0 else f"{metric}_{samples}"


def best_checkpoint(result: Any, metric: str, mode: str) -> tuple[tune.Checkpoint | None, dict]:
    """(checkpoint, the report it was saved with): the best kept one by `metric`, else the latest."""
    sign = 1 if mode == "min" else -1
    scored = kept_checkpoints(result, metric)
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
    with using_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id), validated_on_the_cpu():
        mlflow.pytorch.log_model(g, name=MODEL_NAME, input_example=noise.numpy(), signature=signature,
                                 serialization_format="pt2", pip_requirements=model_requirements())


@contextlib.contextmanager
def validated_on_the_cpu() -> Iterator[None]:
    """log_model checks the input example through pyfunc, which loads the model on CUDA when a GPU is present;
    the pt2 program is exported on the CPU and cannot change device, so the check would fail on a GPU machine
    ("can't be loaded on 'cuda' device"). The model is for the CPU: check it there."""
    name = MLFLOW_DEFAULT_PREDICTION_DEVICE.name
    before = os.environ.get(name)
    os.environ[name] = "cpu"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def model_requirements() -> list[str]:
    """A pt2 model needs only torch to load; stating it skips MLflow's ~10 s requirement inference."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The result's reported numbers (bools and Ray bookkeeping left out); NaN stays, MLflow stores it."""
    return {k: float(v) for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def truncate(text: str, limit: int = MAX_TAG_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def kept_checkpoints(result: tune.Result, metric: str) -> list[tuple[tune.Checkpoint, dict]]:
    """The trial's kept checkpoints whose report has a finite score."""
    return [(ckpt, reported) for ckpt, reported in (result.best_checkpoints or []) if finite(reported.get(metric))]
