"""Shared fixtures, and the order modules run in. Helpers live in the test module that uses them."""

import os

# Two xdist workers share two cores with the searches and trials they start. torch's default, one OpenMP thread
# per core, has each process's threads spin-waiting on cores the others are using: a capture case took 0.09 s
# alone and 3-6 s in the full run. One thread per process, set before torch loads and inherited by every search
# the tests start (trials set their own from their CPUs).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# The longest modules first (minutes each in CI): pytest-xdist hands whole modules (groups) to its two
# workers in collection order, so a long module collected last (they sort late: test_reliability, test_s3,
# test_search, test_tracking_outage) kept one worker busy while the other sat idle. Longest first, the short
# modules fill in at the end.
LONGEST_FIRST = ("test_reliability", "test_tracking_outage", "test_search", "test_s3", "test_cohort_search",
                 "test_bad_input", "test_bad_input_tools", "test_bench_search", "test_postgres", "test_multinode",
                 "test_tracking", "test_checkpoint_fallback")


def module_name(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(module_name(item), len(rank)))  # stable sort
    # One xdist group per module (--dist loadgroup, pyproject's addopts), as --dist loadfile would, except that
    # the modules using the session's smoke_study share one: split over two workers, each ran that search.
    smoke = {module_name(item) for item in items if "smoke_study" in getattr(item, "fixturenames", ())}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("smoke_study" if module_name(item) in smoke else module_name(item)))


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Searches track into a throwaway sqlite store, never ./mlflow.db of the checkout (tracking is always on)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:  # session scope: the monkeypatch fixture is per test
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="session", autouse=True)
def fid_cache(tmp_path_factory):
    """Real-data FID statistics go to a throwaway cache, never the user's ~/.cache/gan_tune."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GAN_TUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs ~10 s); shut down at the end."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def smoke_study(ray_local, tmp_path_factory):
    """The shipped smoke space run once through the CLI (ASHA); returns (exit code, study folder, stdout)."""
    import contextlib
    import io

    from gan_tune import search

    storage = tmp_path_factory.mktemp("ray_results")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = search.main(["--space", "smoke", "--storage-path", str(storage), "--name", "smoke-asha",
                            "--tracking-uri", f"sqlite:///{storage}/mlflow.db"])
    return code, storage / "smoke-asha", out.getvalue()


@pytest.fixture(scope="module")
def s3_server():
    """An S3 API on loopback (moto's ThreadedMotoServer over HTTP), one per test module; see tests/servers.py."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (the test extra has it)")
    pytest.importorskip("boto3", reason="boto3 is not installed (the test extra has it)")
    from servers import S3Server

    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's endpoint and keys in this process's environment (AWS_ENDPOINT_URL ...), as a user exports them."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.env()


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL cluster on a free loopback port, one per test module; see tests/servers.py."""
    import shutil

    if shutil.which("initdb") is None or shutil.which("postgres") is None:
        pytest.skip("PostgreSQL's initdb/postgres are not on the PATH")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("PostgreSQL refuses root, and runuser is missing to run it as the postgres user")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install '.[postgres]')")
    import pwd

    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL refuses root, and there is no postgres user to run it as")
    from servers import Postgres

    server = Postgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def tracking_server(postgres, s3_server, tmp_path_factory):
    """cluster.yaml's PostgreSQL head, one per test module: `mlflow server` on PostgreSQL database `mlflow`, its
    artifacts proxied to s3://mlflow-artifacts/mlflow; (server, bucket)."""
    from servers import MlflowServer

    bucket = s3_server.make_bucket("mlflow-artifacts")
    postgres.query("CREATE DATABASE mlflow")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), postgres.uri("mlflow"), f"s3://{bucket}/mlflow",
                          s3_server.env())
    server.start()
    yield server, bucket
    server.stop()
