"""The MLflow writes a store refuses for now: queued in order and retried, saved at the end, replayed later.

A store that goes away mid-search (a server restart, a locked sqlite file) never stops a trial. The
callback's writes go through `PendingWrites`: one the store refuses waits there, in order, and later hooks
retry it. The end of the search gives the store a last FINAL_PATIENCE_S; what it still refuses is saved as
JSON lines in the study folder (UNDELIVERED), which `python -m gan_tune.tracking replay FILE` delivers once
the store is back. Ray keeps every epoch's metrics in each trial's result.json and progress.csv regardless.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow.fs as pafs
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from gan_tune.tracking.parent_run import child_run_id
from gan_tune.tracking.store import fail_fast_http, is_outage
from gan_tune.tracking.trial_files import upload_folder
from gan_tune.training.config import ConfigError, first_line

log = logging.getLogger(__name__)

RETRY_FIRST_S = 5.0  # a refused write is first retried after this; each failed retry doubles the wait ...
RETRY_MAX_S = 60.0  # ... up to a minute, as a black-holed server costs a full request timeout per retry
FINAL_PATIENCE_S = 30.0  # how long a search's end waits for the store: a server restarts in ~15-30 s
UNDELIVERED = "mlflow_undelivered.jsonl"  # in the study folder: the writes the store never took
UNDELIVERED_KEYS = {"trial_id", "run_id", "kind", "payload"}  # one PendingWrites entry per line


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


def deliver(client: MlflowClient, entry: dict[str, Any], run_ids: dict[str, str]) -> None:
    """One queued write; a create_run entry records the run id that the trial's later entries resolve."""
    if entry["kind"] == "create_run":
        run_ids[entry["trial_id"]] = find_or_create_run(client, **entry["payload"])
        return
    run_id = entry["run_id"] or run_ids[entry["trial_id"]]  # KeyError: the store refused its create_run
    WRITES[entry["kind"]](client, run_id, entry["payload"])


# What a queued write does once its run id is known: kind -> (client, run id, payload).
WRITES: dict[str, Callable[[MlflowClient, str, dict], Any]] = {
    "log_batch": lambda client, run_id, p: client.log_batch(
        run_id, [Metric(**m) for m in p["metrics"]], [Param(**x) for x in p["params"]],
        [RunTag(**x) for x in p["tags"]]),
    "update_run": lambda client, run_id, p: client.update_run(run_id, status=p["status"]),
    "set_terminated": lambda client, run_id, p: client.set_terminated(run_id, p["status"], p["end_time"]),
    "upload_files": lambda client, run_id, p: upload_folder(client, run_id, p["folder"]),
}


def find_or_create_run(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str],
                       start_time: int) -> str:
    """The trial's child run; found, not made twice, when a create whose reply was lost (or a --resume before
    a replay) already made it."""
    found = child_run_id(client, tags[MLFLOW_PARENT_RUN_ID], tags["trial_id"])
    return found or client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name).info.run_id


def batch(metrics: Iterable[Metric] = (), params: Iterable[Param] = (),
          tags: Iterable[RunTag] = ()) -> dict[str, list[dict[str, Any]]]:
    """A log_batch payload as plain JSON values, so an undelivered one can be saved and replayed."""
    return {"metrics": [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                        for m in metrics],
            "params": [{"key": p.key, "value": p.value} for p in params],
            "tags": [{"key": t.key, "value": t.value} for t in tags]}


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


def write_undelivered(storage: Any, entries: list[dict[str, Any]]) -> str:
    """Append `entries` to UNDELIVERED in the study folder of `storage` (a trial's Ray StorageContext: the
    study folder on its filesystem, local, NFS or s3://); returns the file's path."""
    fs, path = storage.storage_filesystem, f"{storage.experiment_fs_path}/{UNDELIVERED}"
    earlier = b""  # an earlier session of a resumed search may have left some
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as src:
            earlier = src.read()
    with fs.open_output_stream(path) as out:
        out.write(earlier + "".join(json.dumps(entry) + "\n" for entry in entries).encode())
    return path


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
