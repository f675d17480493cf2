"""How the bad-input tables (test_bad_input.py: search and train; test_bad_input_tools.py: the other commands) run
their rows. Each row runs a real CLI (`python -m gan_tune.X`) in a process of its own, which must exit 2 with exactly
one `error:` line on stderr naming the file or flag and the key, no traceback, no MLflow run left RUNNING (or made at
all) and no Ray process left behind.

A fresh interpreter spends 3-5 s (far more on a loaded machine) importing torch, Ray and MLflow, which made the
table take minutes. So the rows run, two at a time, in children forked from one server process that imported
gan_tune's CLI modules once (FORK_SERVER, the preloading model of gunicorn or multiprocessing's forkserver): each
child runs the module as `__main__` with runpy, as `python -m` does, in its own working directory and environment.
Each table's `test_one_row_per_command_in_a_fresh_interpreter` runs a row of every command through a real
`python -m`, so nothing the preloading hides (an import-time failure, a stray line at start-up) goes unseen.

A table is {case: (argv builder, strings the error line must contain)}: the builder takes the row's folder and
returns (module, argv); in the strings "{tmp}" is the row's folder and "{space}" its broken space file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow import MlflowClient

DEAD_SERVER = "http://127.0.0.1:1"  # nothing listens on port 1
TWENTY = "9" * 20  # an absurdly large number
TABLE_TEST = "test_bad_input_exits_2_with_one_line_and_leaves_nothing"  # each table module's parametrized test
# A hang guard, not a speed claim: a row is refused within seconds (most in well under one on an idle machine; a
# dead server costs its 3 s check), so one past ROW_LIMIT_S waits on something that may never answer. Its child is
# killed at twice that, so a hang fails its own row instead of the whole table's server timing out.
ROW_LIMIT_S = 30
# A fresh interpreter first imports torch, Ray and MLflow: 3-5 s idle, far more on a loaded machine
FRESH_LIMIT_S = 2 * ROW_LIMIT_S


def fill(tmp_path, args):
    """Arguments with "{tmp}" replaced by the row's folder; "{tmp}/plain" is made first, an existing plain file."""
    if any("{tmp}/plain" in arg for arg in args):
        (tmp_path / "plain").write_text("a file, not a folder\n")
    return [arg.format(tmp=tmp_path) for arg in args]


def command(module, *args):
    """Any CLI with fixed arguments ("{tmp}" becomes the row's folder, "{tmp}/plain" an existing file)."""
    return lambda tmp_path: (module, fill(tmp_path, args))


def mlflow_runs(tmp_path):
    """(runs, runs left RUNNING) in the row's store; (0, 0) when the file was never created."""
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return 0, 0
    client = MlflowClient(f"sqlite:///{db}")
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
    return len(runs), sum(run.info.status == "RUNNING" for run in runs)


def processes_naming(folder):
    """Live processes whose command line names `folder`: a Ray left behind has it in its session path."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder) in cmdline.read_bytes().decode(errors="replace"):
                found.append(cmdline.parent.name)
        except OSError:  # the process ended meanwhile
            pass
    return found


# Reads one JSON request per line ({id, module, argv, cwd, env, err, hide, kill_after_s}), runs at most two at once,
# each in a forked child that behaves like `python -m gan_tune.MODULE ARGV`, and prints {id, code, wall_s} per finished
# child (wall_s: fork to exit, measured by the server, so a child it killed has one too).
FORK_SERVER = r"""
import json, os, runpy, signal, sys, tempfile, time, traceback, warnings
import gan_tune.ablation, gan_tune.bench, gan_tune.bench_search, gan_tune.classifier, gan_tune.metrics
import gan_tune.report, gan_tune.sample, gan_tune.search, gan_tune.tracking, gan_tune.train

def child(request):
    os.setpgid(0, 0)  # a group of its own, so the server can end what it started (training workers, Ray)
    signal.alarm(request["kill_after_s"])  # SIGALRM's default action ends the child: the hang guard
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # read TMPDIR again
    for fd, path in ((1, os.devnull), (2, request["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [request["module"], *request["argv"]]
    for module in request["hide"]:  # None in sys.modules: `import module` raises ImportError, as when not installed
        sys.modules[module] = None
    # runpy warns that the preloaded module is already imported: true here, and `python -m` never prints it
    warnings.filterwarnings("ignore", "'gan_tune.*' found in sys.modules", RuntimeWarning)
    try:
        runpy.run_module(f"gan_tune.{request['module']}", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:  # what the interpreter does with it
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if not isinstance(done.code, (int, type(None))):
            print(done.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

running = {}
def reap():
    pid, status = os.wait()
    case, start = running.pop(pid)
    if os.WIFSIGNALED(status):  # killed by the hang guard (or crashed): its processes would train on, orphaned
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(json.dumps({"id": case, "code": os.waitstatus_to_exitcode(status), "wall_s": time.monotonic() - start}),
          flush=True)

for line in sys.stdin:
    request = json.loads(line)
    if len(running) == 2:
        reap()
    pid = os.fork()
    if pid == 0:
        child(request)
    running[pid] = request["id"], time.monotonic()
while running:
    reap()
"""


def row_env(tmp_path):
    """The row's environment: Ray's and Python's temporary files in its own folder, no tracking URI inherited."""
    ray_tmp = tmp_path / "tmp"
    ray_tmp.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(ray_tmp), TMPDIR=str(ray_tmp))
    return env


def row_result(tmp_path, code, err, runs_before, wall_s):
    ray_tmp = tmp_path / "tmp"
    return {"code": code, "err": err, "runs": mlflow_runs(tmp_path), "runs_before": runs_before, "wall_s": wall_s,
            "ray": [*ray_tmp.glob("ray*"), *processes_naming(ray_tmp)]}


def run_forked(table, rows, hidden):
    """{case: result} for rows {case: tmp_path} of `table`, each row in a child of one FORK_SERVER process;
    hidden: {case: modules its child cannot import}."""
    requests, before = [], {}
    for case, tmp_path in rows.items():
        module, argv = table[case][0](tmp_path)
        before[case] = mlflow_runs(tmp_path)[0]  # the sample rows make one empty run first
        requests.append({"id": case, "module": module, "argv": argv, "cwd": str(tmp_path), "env": row_env(tmp_path),
                         "err": str(tmp_path / "stderr.txt"), "hide": hidden.get(case, ()),
                         "kill_after_s": 2 * ROW_LIMIT_S})
    server = subprocess.run([sys.executable, "-c", FORK_SERVER], capture_output=True, text=True, timeout=900,
                            input="".join(json.dumps(request) + "\n" for request in requests),
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert server.returncode == 0, server.stderr
    ended = {done["id"]: done for done in map(json.loads, server.stdout.splitlines())}
    return {case: row_result(tmp_path, ended[case]["code"], (tmp_path / "stderr.txt").read_text(), before[case],
                             ended[case]["wall_s"]) for case, tmp_path in rows.items()}


def run_fresh(table, case, tmp_path):
    """One row through a real `python -m gan_tune.X` in a fresh interpreter."""
    module, argv = table[case][0](tmp_path)
    runs_before = mlflow_runs(tmp_path)[0]
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", f"gan_tune.{module}", *argv], capture_output=True, text=True,
                              timeout=2 * FRESH_LIMIT_S, cwd=tmp_path, env=row_env(tmp_path))
    except subprocess.TimeoutExpired as hung:  # killed by the hang guard: check_row says how long it ran
        err = hung.stderr.decode(errors="replace") if isinstance(hung.stderr, bytes) else hung.stderr or ""
        return row_result(tmp_path, None, err, runs_before, time.monotonic() - start)
    return row_result(tmp_path, done.returncode, done.stderr, runs_before, time.monotonic() - start)


def check_fresh_rows(table, cases, tmp_path):
    """`cases` through real `python -m` runs, two at a time: the table's verdicts hold without the fork server's
    preloaded imports."""
    folders = [tmp_path / f"row{i}" for i in range(len(cases))]
    for folder in folders:
        folder.mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case, folder: run_fresh(table, case, folder), cases, folders))
    for case, folder, row in zip(cases, folders, results):
        check_row(table, case, folder, row, FRESH_LIMIT_S)


def table_outcomes(request, tmp_path_factory, table, skips, hidden):
    """Every row of the calling module's table this session selected, run in forked children two at a time:
    {case: (row folder, result)}."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and getattr(item, "originalname", "") == TABLE_TEST
                and not skips.get(item.callspec.params["case"], (False,))[0]]
    rows = {case: tmp_path_factory.mktemp("row") for case in selected}
    return {case: (rows[case], result) for case, result in run_forked(table, rows, hidden).items()} if rows else {}


def check_row(table, case, tmp_path, row, limit_s=ROW_LIMIT_S):
    err = row["err"]
    lines = err.strip().splitlines()
    assert row["wall_s"] < limit_s, f"{case} took {row['wall_s']:.1f} s, the hang guard allows {limit_s} s: {err}"
    assert row["code"] == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in table[case][1]:
        assert text.format(tmp=tmp_path, space=tmp_path / "bad.yaml") in lines[0], lines[0]
    assert row["runs"] == (row["runs_before"], 0), "a run was made or left RUNNING"
    assert row["ray"] == [], "Ray was started or left behind"


def commands_of(table, tmp_path, skip=()):
    """The CLI modules a table's rows run (rows in `skip` are left out: they make a store first, seconds each)."""
    builds = [build for case, (build, _) in table.items() if case not in skip]
    folders = [tmp_path / f"row{i}" for i in range(len(builds))]
    return {build(folder)[0] for build, folder in zip(builds, folders) if folder.mkdir() is None}
