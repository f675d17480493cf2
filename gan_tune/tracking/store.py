"""The MLflow tracking store: which URI, whether it can be used, and how its failures look.

A search checks its store before any trial starts (`check_tracking`): an http(s) server must answer, a
database store needs its Python driver, and a sqlite store is created here, in the driver, because several
processes creating a fresh store at once race on its schema migration. Readers (report, sample) open an
existing store with `open_client`. In the driver, MLflow's HTTP client fails within seconds (`fail_fast_http`);
`is_outage` tells a write the store may take later from one it refuses for good, and `store_errors` turns a
store that fails mid-command into one ConfigError naming --tracking-uri.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import mlflow
import requests
import sqlalchemy
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gan_tune.training.config import ConfigError, first_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "gan_tune"
SERVER_CHECK_TIMEOUT_S = 3.0  # a search should not wait on a dead tracking server before its first trial
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "databricks", "http", "https", "file", "")
SQL_SERVERS = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores whose Python driver is a separate package
DRIVER_EXTRAS = {"postgresql": "gan_tune[postgres]"}  # pyproject.toml's extra for the driver
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


def resolve_tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


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
        check_database(uri, scheme)
    elif scheme == "sqlite":
        check_sqlite(uri)
    elif scheme in ("file", "") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise ConfigError("--tracking-uri", f"{uri}: MLflow 3 refuses the file store unless "
                                            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlflow.db")


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


def check_database(uri: str, scheme: str) -> None:
    """A database server must accept a connection within SERVER_CHECK_TIMEOUT_S: MLflow's own engine retries a
    refused or silent one for minutes before its first error (a search of a stopped PostgreSQL hung > 60 s)."""
    timeout = int(SERVER_CHECK_TIMEOUT_S)
    connect_args = {"mssql": {"timeout": timeout}}.get(scheme, {"connect_timeout": timeout})
    engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.SQLAlchemyError as err:
        shown = sqlalchemy.engine.make_url(uri).render_as_string(hide_password=True)
        reason = first_line(getattr(err, "orig", None) or err)
        raise ConfigError("--tracking-uri", f"{shown}: the database did not accept a connection within "
                                            f"{timeout} s ({reason})") from None
    finally:
        engine.dispose()


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
        check_database(uri, scheme)
    return MlflowClient(uri)


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


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """For commands that read the store: MLflow gives up within seconds, and a store that fails mid-command
    (a server that went away, a database that refuses) is one ConfigError naming --tracking-uri."""
    with fail_fast_http():
        try:
            yield
        except (MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError) as err:
            raise ConfigError("--tracking-uri", f"{uri}: the store failed ({first_line(err)})") from None


def now_ms() -> int:
    """Now as MLflow stores times: milliseconds since the epoch."""
    return int(time.time() * 1000)
