"""Issues 9 and 14, the complete table of bad inputs of the commands around a search: report, sample, metrics,
tracking replay, bench (bench search, bench gpu-check), classifier and ablation (search and train:
test_bad_input.py, which says what every row must show; tests/bad_input.py runs the rows).
"""

import json
import os

import pytest
from bad_input import DEAD_SERVER, TWENTY, check_fresh_rows, check_row, command, commands_of, table_outcomes
from mlflow import MlflowClient


def sample_empty_run(tmp_path):
    """A run that exists but holds no generator (a trial's child run looks like this)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("empty"))
    client.set_terminated(run.info.run_id)
    return "sample", ["--run-id", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "g.png")]


def existing_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # an existing, empty store
    return uri


def replay_case(text, uri="sqlite:///{tmp}/mlflow.db"):
    """tracking replay of a file holding `text` (bytes as they are)."""
    def argv(tmp_path):
        path = tmp_path / "mlflow_undelivered.jsonl"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return "tracking", ["replay", str(path), "--tracking-uri", uri.format(tmp=tmp_path)]
    return argv


def text_checkpoint(tmp_path):
    (tmp_path / "text.pt").write_text("hello, not a checkpoint\n")
    return "metrics", ["--device", "cpu", "score", str(tmp_path / "text.pt")]


CPUS = os.cpu_count()
WRITE = {"trial_id": None, "run_id": "abc", "kind": "set_terminated", "payload": {"status": "FINISHED", "end_time": 1}}

# id -> (argv builder, strings stderr must contain; "{tmp}" is the row's folder)
CASES = {
    # report
    "report dead server": (command("report", "--tracking-uri", DEAD_SERVER), ["--tracking-uri", DEAD_SERVER]),
    "report without a driver": (command("report", "--tracking-uri", "postgresql://u@127.0.0.1:1/db"),
                                ["--tracking-uri", "pip install 'gan_tune[postgres]'"]),
    "report store missing": (command("report", "--tracking-uri", "sqlite:///{tmp}/none.db"),
                             ["--tracking-uri", "{tmp}/none.db", "no such sqlite store"]),
    "report unknown run": (lambda tmp_path: ("report", ["--parent-run", "0123456789abcdef", "--tracking-uri",
                                                        existing_store(tmp_path)]), ["--parent-run", "no such run"]),
    "report unknown experiment": (lambda tmp_path: ("report", ["--experiment", "nope", "--tracking-uri",
                                                               existing_store(tmp_path)]), ["--experiment", "nope"]),
    # sample
    "sample run without a model": (sample_empty_run, ["--run-id", "no logged generator"]),
    "sample unknown run": (lambda tmp_path: ("sample", ["--run-id", "0123456789abcdef", "--tracking-uri",
                                                        existing_store(tmp_path), "--out", str(tmp_path / "g.png")]),
                           ["--run-id", "0123456789abcdef", "no such run"]),
    "sample store missing": (command("sample", "--run-id", "0123456789abcdef", "--tracking-uri",
                                     "sqlite:///{tmp}/none.db"), ["--tracking-uri", "{tmp}/none.db", "no such sqlite"]),
    "sample dead server": (command("sample", "--run-id", "0123456789abcdef", "--tracking-uri", DEAD_SERVER),
                           ["--tracking-uri", DEAD_SERVER]),
    "sample seed negative": (command("sample", "--run-id", "x", "--seed", "-1"), ["--seed"]),
    "sample n 0": (command("sample", "--run-id", "x", "-n", "0"), ["-n", ">= 1"]),
    "sample seed 20 digits": (command("sample", "--run-id", "x", "--seed", TWENTY), ["--seed", "4294967295"]),
    "sample without a run": (command("sample"), ["--run-id", "required"]),
    # tracking replay
    "replay not json": (replay_case("this is not json\n"), ["{tmp}/mlflow_undelivered.jsonl", "line 1", "JSON"]),
    "replay truncated": (replay_case(json.dumps(WRITE) + "\n" + json.dumps(WRITE)[:30]),
                         ["{tmp}/mlflow_undelivered.jsonl", "line 2"]),
    "replay not utf-8": (replay_case(b"\xff\xfe{}\n"), ["{tmp}/mlflow_undelivered.jsonl", "UTF-8"]),
    "replay foreign json": (replay_case('{"hello": 1}\n'), ["{tmp}/mlflow_undelivered.jsonl", "line 1", "kind"]),
    "replay missing file": (command("tracking", "replay", "{tmp}/none.jsonl"), ["{tmp}/none.jsonl", "no such file"]),
    "replay dead server": (replay_case(json.dumps(WRITE) + "\n", DEAD_SERVER), ["--tracking-uri", DEAD_SERVER]),
    "tracking unknown command": (command("tracking", "deliver", "x"), ["command", "replay"]),
    # metrics, bench, classifier
    "metrics unknown device": (command("metrics", "--device", "gpu0", "baselines"), ["--device", "gpu0"]),
    "metrics checkpoint missing": (command("metrics", "--device", "cpu", "score", "{tmp}/none.pt"), ["{tmp}/none.pt"]),
    "metrics one sample": (command("metrics", "--device", "cpu", "score", "{tmp}", "--n", "1"), ["--n"]),
    "metrics without a command": (command("metrics"), ["required", "command"]),
    "bench packed 0": (command("bench", "--device", "cpu", "--packed", "0"), ["--packed"]),
    "bench one fid sample": (command("bench", "--device", "cpu", "--fid-samples", "1"), ["--fid-samples"]),
    "bench json unwritable": (command("bench", "--device", "cpu", "--json", "/proc/gan_tune.json"), ["--json"]),
    "classifier epochs 0": (command("classifier", "train", "--epochs", "0"), ["--epochs"]),
    "classifier seed past numpy": (command("classifier", "train", "--seed", str(2**40)), ["--seed"]),
    "classifier seed negative": (command("classifier", "train", "--seed", "-1"), ["--seed", "-1", "[0, 4294967295]"]),
    "classifier device missing here": (command("classifier", "train", "--device", "cuda:7"), ["--device", "cuda:7"]),
    # round four (issue 25): absurd numbers, empty names, a database that is down, a text file named .pt
    "report postgresql down": (command("report", "--tracking-uri", "postgresql://gan@127.0.0.1:1/mlflow"),
                               ["--tracking-uri", "did not accept a connection"]),
    "report experiment empty": (command("report", "--experiment", "", "--tracking-uri", "sqlite:///{tmp}/m.db"),
                                ["--experiment", "empty"]),
    "metrics score a text file named .pt": (text_checkpoint, ["{tmp}/text.pt", "not a torch file"]),
    "bench cost epochs negative": (command("bench", "--device", "cpu", "--cost-epochs", "-1"), ["--cost-epochs"]),
    "bench cost epochs 1": (command("bench", "--device", "cpu", "--cost-epochs", "1"), ["--cost-epochs", "0 or >= 2"]),
    "bench gpu-check without a gpu": (command("bench", "gpu-check", "--out", "{tmp}/gc"), ["gpu-check", "CUDA"]),
    "bench gpu-check unknown part": (command("bench", "gpu-check", "--out", "{tmp}/gc", "--parts", "bench,fid"),
                                     ["--parts", "unknown part fid"]),
    # round four, every numeric flag at 0, negative and 20 digits where invalid (0 is valid where the help says it
    # means "off" or "the default": bench --fid-samples/--parity-epochs/--cost-epochs, metrics score --n,
    # --gpus-per-trial); numbers as words or nan/inf where a float is read
    "sample n negative": (command("sample", "--run-id", "x", "-n", "-5"), ["-n", ">= 1"]),
    "sample n 20 digits": (command("sample", "--run-id", "x", "-n", TWENTY), ["-n", "100,000"]),
    "metrics score n negative": (command("metrics", "--device", "cpu", "score", "{tmp}", "--n", "-2"), ["--n"]),
    "metrics score n 20 digits": (command("metrics", "--device", "cpu", "score", "{tmp}", "--n", TWENTY),
                                  ["--n", "100,000"]),
    "metrics baselines n 0": (command("metrics", "--device", "cpu", "baselines", "--n", "0"), ["--n"]),
    "metrics baselines n 20 digits": (command("metrics", "--device", "cpu", "baselines", "--n", TWENTY), ["--n"]),
    "metrics baselines n negative": (command("metrics", "--device", "cpu", "baselines", "--n", "-3"), ["--n", "-3"]),
    "bench packed negative": (command("bench", "--device", "cpu", "--packed", "-1"), ["--packed"]),
    "bench packed 20 digits": (command("bench", "--device", "cpu", "--packed", TWENTY), ["--packed", f"[1, {CPUS}]"]),
    # each packed trial takes a CPU of the bench's Ray at least: one more than the machine has would queue
    "bench packed past the cpus": (command("bench", "--device", "cpu", "--packed", f"1,{CPUS + 1}"),
                                   ["--packed", f"[1, {CPUS}]", f"{CPUS} CPUs"]),
    "bench steps 0": (command("bench", "--device", "cpu", "--steps", "0"), ["--steps", ">= 2"]),
    "bench steps negative": (command("bench", "--device", "cpu", "--steps", "-5"), ["--steps", ">= 2"]),
    "bench steps 20 digits": (command("bench", "--device", "cpu", "--steps", TWENTY), ["--steps", "100,000"]),
    # cohort sizes: a space caps a cohort at 256 members (spaces.MAX_COHORT), and so does the bench
    "bench cohort 0": (command("bench", "--device", "cpu", "--cohort", "0"), ["--cohort", "[1, 256]"]),
    "bench cohort negative": (command("bench", "--device", "cpu", "--cohort", "4,-1"), ["--cohort", "[1, 256]"]),
    "bench cohort 20 digits": (command("bench", "--device", "cpu", "--cohort", TWENTY), ["--cohort", "[1, 256]"]),
    "bench cohort past a space's limit": (command("bench", "--device", "cpu", "--cohort", "1,257"),
                                          ["--cohort", "[1, 256]"]),
    "bench fid samples negative": (command("bench", "--device", "cpu", "--fid-samples", "-5"), ["--fid-samples"]),
    "bench fid samples 20 digits": (command("bench", "--device", "cpu", "--fid-samples", TWENTY),
                                    ["--fid-samples", "100,000"]),
    "bench parity epochs negative": (command("bench", "--device", "cpu", "--parity-epochs", "-1"), ["--parity-epochs"]),
    "bench parity epochs 20 digits": (command("bench", "--device", "cpu", "--parity-epochs", TWENTY),
                                      ["--parity-epochs", "100,000"]),
    "bench cost epochs 20 digits": (command("bench", "--device", "cpu", "--cost-epochs", TWENTY),
                                    ["--cost-epochs", "100,000"]),
    "bench unknown model": (command("bench", "--device", "cpu", "--models", "stylegan"), ["--models", "stylegan"]),
    "classifier epochs negative": (command("classifier", "train", "--epochs", "-3"), ["--epochs"]),
    "classifier epochs 20 digits": (command("classifier", "train", "--epochs", TWENTY), ["--epochs", "100,000"]),
    "bench search seeds 0": (command("bench", "search", "--seeds", "0", "--out", "{tmp}/bs"), ["--seeds", ">= 1"]),
    "bench search seeds negative": (command("bench", "search", "--seeds", "-1", "--out", "{tmp}/bs"), ["--seeds"]),
    "bench search seeds 20 digits": (command("bench", "search", "--seeds", TWENTY, "--out", "{tmp}/bs"),
                                     ["--seeds", "100,000"]),
    "ablation minutes 0": (command("ablation", "--minutes", "0", "--keep", "{tmp}/keep"), ["--minutes", "> 0"]),
    "ablation minutes negative": (command("ablation", "--minutes", "-5", "--keep", "{tmp}/keep"), ["--minutes"]),
    "ablation minutes 20 digits": (command("ablation", "--minutes", TWENTY, "--keep", "{tmp}/keep"), ["--minutes"]),
    "ablation minutes nan": (command("ablation", "--minutes", "nan", "--keep", "{tmp}/keep"), ["--minutes", "nan"]),
    "ablation row minutes 0": (command("ablation", "--ablation-minutes", "0", "--keep", "{tmp}/keep"),
                               ["--ablation-minutes", "> 0"]),
    "ablation row minutes 20 digits": (command("ablation", "--ablation-minutes", TWENTY, "--keep", "{tmp}/keep"),
                                       ["--ablation-minutes"]),
    "ablation row minutes negative": (command("ablation", "--ablation-minutes", "-5", "--keep", "{tmp}/keep"),
                                      ["--ablation-minutes", "> 0"]),
    "ablation row minutes nan": (command("ablation", "--ablation-minutes", "nan", "--keep", "{tmp}/keep"),
                                 ["--ablation-minutes", "nan"]),
    "ablation unknown rows": (command("ablation", "--rows", "ablations,everything", "--keep", "{tmp}/keep"),
                              ["--rows", "everything"]),
    # time budgets: unknown units, empty, zero, 20 digits (search --time-budget and bench search --budget)
    "bench search budget unknown unit": (command("bench", "search", "--budget", "5x", "--out", "{tmp}/bs"),
                                         [("error: --budget: bad duration '5x'")]),
    "bench search budget empty": (command("bench", "search", "--budget", "", "--out", "{tmp}/bs"), ["--budget"]),
    "bench search budget 20 digits": (command("bench", "search", "--budget", TWENTY + "m", "--out", "{tmp}/bs"),
                                      ["--budget", "a year"]),
    "bench search budget 0s": (command("bench", "search", "--budget", "0s", "--out", "{tmp}/bs"), ["--budget", "> 0"]),
    "bench search budget negative": (command("bench", "search", "--budget=-5m", "--out", "{tmp}/bs"),
                                     ["--budget", "bad duration '-5m'"]),
    "bench search space a folder": (command("bench", "search", "--space", "{tmp}", "--out", "{tmp}/bs"),
                                    ["--space", "{tmp}", "a folder"]),
    # output paths: unknown extensions, under a file, a folder for a file and a file for a folder
    "sample out bmp": (command("sample", "--run-id", "x", "--out", "{tmp}/g.bmp"), ["--out", "g.bmp", ".png"]),
    "sample out under a file": (command("sample", "--run-id", "x", "--out", "{tmp}/plain/g.png"), ["--out", "{tmp}/plain"]),
    "sample out a folder": (command("sample", "--run-id", "x", "--out", "{tmp}"), ["--out", "{tmp}"]),
    "sample out a folder named png": (lambda tmp_path: (tmp_path / "g.png").mkdir() or command(
        "sample", "--run-id", "x", "--out", "{tmp}/g.png")(tmp_path), ["--out", "{tmp}/g.png", "folder"]),
    # report's --out is checked by its parser, before the store (none here) is opened
    "report out a file": (command("report", "--out", "{tmp}/plain", "--tracking-uri", "sqlite:///{tmp}/none.db"),
                          ["--out", "{tmp}/plain", "file"]),
    "report out under a file": (command("report", "--out", "{tmp}/plain/r", "--tracking-uri", "sqlite:///{tmp}/none.db"),
                                ["--out", "{tmp}/plain"]),
    "report out html": (command("report", "--out", "{tmp}/report.html", "--tracking-uri", "sqlite:///{tmp}/none.db"),
                        ["--out", "report.html", "folder"]),
    "bench json a folder": (command("bench", "--device", "cpu", "--json", "{tmp}"), ["--json", "{tmp}"]),
    "bench json under a file": (command("bench", "--device", "cpu", "--json", "{tmp}/plain/b.json"), ["--json"]),
    "bench json csv": (command("bench", "--device", "cpu", "--json", "{tmp}/b.csv"), ["--json", ".json"]),
    "bench gpu-check out a file": (command("bench", "gpu-check", "--out", "{tmp}/plain"), ["--out", "{tmp}/plain"]),
    "bench search out a file": (command("bench", "search", "--out", "{tmp}/plain"), ["--out", "{tmp}/plain"]),
    "bench search out under a file": (command("bench", "search", "--out", "{tmp}/plain/bs"), ["--out", "{tmp}/plain"]),
    "bench search report of nothing": (command("bench", "search", "--report", "--out", "{tmp}/bs"),
                                       ["--report", "curves.json"]),
    "bench search unknown space": (command("bench", "search", "--space", "nope", "--out", "{tmp}/bs"), ["--space", "nope"]),
    "bench search unknown strategy": (command("bench", "search", "--strategies", "anneal", "--out", "{tmp}/bs"),
                                      ["--strategies", "anneal"]),
    "ablation json under a file": (command("ablation", "--json", "{tmp}/plain/a.json", "--keep", "{tmp}/keep"),
                                   ["--json", "{tmp}/plain"]),
    "ablation json a folder": (command("ablation", "--json", "{tmp}", "--keep", "{tmp}/keep"), ["--json", "{tmp}"]),
    "ablation keep a file": (command("ablation", "--keep", "{tmp}/plain"), ["--keep", "{tmp}/plain"]),
    "classifier out a folder": (command("classifier", "train", "--out", "{tmp}"), ["--out", "{tmp}"]),
    "classifier out under a file": (command("classifier", "train", "--out", "{tmp}/plain/c.pt"), ["--out", "{tmp}/plain"]),
    "classifier out txt": (command("classifier", "train", "--out", "{tmp}/c.txt"), ["--out", ".pt"]),
    "classifier data dir a file": (command("classifier", "train", "--data-dir", "{tmp}/plain", "--out", "{tmp}/c.pt"),
                                   ["--data-dir", "{tmp}/plain"]),
    # every output path flag under /proc (no file can be made there, even by root, whatever os.access says) or under
    # a file, and --json of an unknown format: refused by the parser, before minutes (ablation: an hour) of work
    "bench search out under /proc": (command("bench", "search", "--out", "/proc/gan_tune_bs"),
                                     ["--out", "/proc/gan_tune_bs", "cannot write"]),
    "bench gpu-check out under /proc": (command("bench", "gpu-check", "--out", "/proc/gan_tune_gc"),
                                        ["--out", "/proc/gan_tune_gc", "cannot write"]),
    "bench gpu-check out under a file": (command("bench", "gpu-check", "--out", "{tmp}/plain/gc"),
                                         ["--out", "{tmp}/plain", "a file, not a folder"]),
    "ablation keep under /proc": (command("ablation", "--keep", "/proc/gan_tune_keep"),
                                  ["--keep", "/proc/gan_tune_keep", "cannot write"]),
    "ablation keep under a file": (command("ablation", "--keep", "{tmp}/plain/keep"), ["--keep", "{tmp}/plain"]),
    "ablation json under /proc": (command("ablation", "--json", "/proc/gan_tune_a.json", "--keep", "{tmp}/keep"),
                                  ["--json", "/proc/gan_tune_a.json", "cannot write"]),
    "ablation json csv": (command("ablation", "--json", "{tmp}/a.csv", "--keep", "{tmp}/keep"), ["--json", ".csv", ".json"]),
    "classifier out under /proc": (command("classifier", "train", "--out", "/proc/gan_tune_c.pt"),
                                   ["--out", "/proc/gan_tune_c.pt", "cannot write"]),
    "classifier data dir under /proc": (command("classifier", "train", "--data-dir", "/proc/gan_tune_data", "--out",
                                                "{tmp}/c.pt"), ["--data-dir", "/proc/gan_tune_data", "cannot write"]),
    "classifier data dir under a file": (command("classifier", "train", "--data-dir", "{tmp}/plain/data", "--out",
                                                 "{tmp}/c.pt"), ["--data-dir", "{tmp}/plain"]),
    "sample out under /proc": (command("sample", "--run-id", "x", "--out", "/proc/gan_tune_g.png"),
                               ["--out", "/proc/gan_tune_g.png", "cannot write"]),
    "report out under /proc": (command("report", "--out", "/proc/gan_tune_r", "--tracking-uri", "sqlite:///{tmp}/none.db"),
                               ["--out", "/proc/gan_tune_r", "cannot write"]),
    "metrics score a folder of no checkpoint": (command("metrics", "--device", "cpu", "score", "{tmp}"),
                                                ["{tmp}", "checkpoint.pt"]),
    "replay a folder": (command("tracking", "replay", "{tmp}"), ["{tmp}", "a folder without mlflow_undelivered.jsonl"]),
}
# The test extra installs PostgreSQL's driver: this row runs with it hidden (an import of it fails in its child)
HIDDEN = {"report without a driver": ("psycopg", "psycopg2")}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Every selected row of the table, run in forked children two at a time."""
    return table_outcomes(request, tmp_path_factory, CASES, {}, HIDDEN)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(outcomes, case):
    tmp_path, row = outcomes[case]
    check_row(CASES, case, tmp_path, row)


FRESH = ["report dead server", "sample dead server", "replay truncated", "metrics unknown device", "bench one fid sample",
         "classifier seed past numpy", "bench search seeds 0", "ablation minutes 0"]


def test_one_row_per_command_in_a_fresh_interpreter(tmp_path):
    """A real `python -m` per command: the table's verdicts hold without the preloaded imports."""
    check_fresh_rows(CASES, FRESH, tmp_path)


MAKES_A_STORE = ("sample run without a model", "sample unknown run", "report unknown run", "report unknown experiment")


def test_the_table_covers_every_other_command(tmp_path):
    commands = commands_of(CASES, tmp_path, skip=MAKES_A_STORE)
    assert commands == {"report", "sample", "metrics", "tracking", "bench", "classifier", "ablation"}
    assert any(build(tmp_path)[1][:1] == ["search"] for case, (build, _) in CASES.items() if case.startswith("bench search"))
    assert len(CASES) >= 90
