"""Real servers on loopback for the storage and tracking tests (tests/test_s3.py, tests/test_postgres.py): an S3 API
(moto's ThreadedMotoServer over HTTP), PostgreSQL (initdb + postgres, PostgreSQL's own binaries) and `mlflow server`.
Nothing is mocked: each speaks its real protocol over TCP, as MinIO, a managed PostgreSQL and the head node's MLflow
server do on a cluster. The fixtures that start them live in conftest.py; a test stops and restarts them to inject
faults.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

SERVER_START_S = 120  # a cold `mlflow server` takes ~15-30 s on a busy 2-core machine, more migrating PostgreSQL
# moto accepts any key until auth is switched on; these only keep boto3/pyarrow from asking the EC2 metadata service
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SilentServer:
    """A TCP port on 127.0.0.1 that accepts connections and never answers: the kernel completes each client's
    handshake into the listen backlog, and nothing reads or writes, as with a database host whose server process
    hangs. A client that connects without a timeout waits on it forever."""

    def __init__(self, backlog: int = 16):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


class S3Server:
    """moto's S3 API on 127.0.0.1:PORT, in this process. Its buckets live in moto's in-process backend, so they
    survive stop() and start() on the same port, as a restarted MinIO keeps its disk."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def env(self) -> dict[str, str]:
        """What a MinIO/Ceph user exports: keys, and the endpoint for pyarrow/boto3 (AWS_ENDPOINT_URL) and for
        MLflow's S3 artifact store (MLFLOW_S3_ENDPOINT_URL)."""
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def query_uri(self, bucket: str, path: str) -> str:
        """pyarrow's own form: the endpoint in the URI, no AWS_ENDPOINT_URL needed."""
        return f"s3://{bucket}/{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                            region_name=AWS_ENV["AWS_DEFAULT_REGION"])

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, listed through the S3 API."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    @contextlib.contextmanager
    def refusing_keys(self):
        """Every key refused (moto's IAM check on, no IAM user): what a wrong access key meets on AWS or MinIO."""
        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
        try:
            yield
        finally:
            requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"inf", timeout=5).raise_for_status()


class Postgres:
    """A throw-away PostgreSQL cluster in a temp folder on a free port, stopped by its PID. PostgreSQL refuses to
    run as root, so as root it runs as the `postgres` user, in a folder that user owns."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="gan_tune_pg_"))  # short: the socket path must fit 107 bytes
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        self.data, self.port = self.folder / "data", free_port()
        self.process: subprocess.Popen | None = None

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def command(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)

    def init(self) -> None:
        subprocess.run(self.command("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                                    "--no-sync"), check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        """postgres in the foreground of its own process (runuser's child as root); until it takes connections."""
        with open(self.folder / "postgres.log", "a") as log:
            self.process = subprocess.Popen(
                self.command("postgres", "-D", str(self.data), "-p", str(self.port), "-k", str(self.folder),
                             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.query("SELECT 1")
                return
            time.sleep(0.2)
        raise RuntimeError(f"postgres did not start: {(self.folder / 'postgres.log').read_text()[-2000:]}")

    def pid(self) -> int | None:
        """The postmaster's PID, from its postmaster.pid (the Popen PID is runuser's when run as root)."""
        pid_file = self.data / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open connections are cut, as a database going away cuts them)."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        if self.process is not None:
            self.process.wait(timeout=60)
            self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def query(self, sql: str, database: str = "postgres") -> list[tuple]:
        import psycopg

        with psycopg.connect(self.uri(database), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []


class MlflowServer:
    """`mlflow server` with the given stores, on its own port; its whole process group is killed at stop()."""

    def __init__(self, folder: Path, backend_store_uri: str, artifacts_destination: str, env: dict[str, str]):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                        "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination,
                        "--workers", "1"]
        self.env = {**os.environ, **env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: faster
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.launch()
        self.wait()

    def launch(self) -> None:
        """Start the process and return at once (a test that lets a search run on meanwhile waits later)."""
        with open(self.folder / "server.log", "a") as log:  # its own group: stop() reaches the uvicorn child too
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def wait(self) -> None:
        """Until GET /health answers."""
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {self.log()[-3000:]}")

    def log(self) -> str:
        return (self.folder / "server.log").read_text()

    def stop(self) -> None:
        """SIGKILL the whole group, as a crash would: no graceful shutdown, no reply to a request in flight."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None
