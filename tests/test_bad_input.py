"""Issues 9 and 14, the complete table of bad inputs of `search` and `train` (the other commands:
test_bad_input_tools.py): each row runs the real CLI in a process of its own, which must exit 2 with exactly one
`error:` line on stderr naming the file or flag and the key, no traceback, no MLflow run left RUNNING (or made at all)
and no Ray process left behind. tests/bad_input.py runs the rows (forked from one preloaded server, two at a time).

Some rows repeat a case of test_search.py or test_train.py on purpose (those check them in-process); here the
table is the one place listing every bad input.
"""

import functools
from pathlib import Path

import pytest
import torch
import yaml
from bad_input import (
    DEAD_SERVER,
    ROW_LIMIT_S,
    TWENTY,
    check_fresh_rows,
    check_row,
    command,
    commands_of,
    fill,
    table_outcomes,
)
from mlflow import MlflowClient
from servers import SilentServer

from gan_tune import search
from gan_tune.tracking.store import SERVER_CHECK_TIMEOUT_S
from gan_tune.tuning import stopping

SMOKE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"
SMOKE_RAW = yaml.safe_load(SMOKE.read_text())
SMOKE_BASE = SMOKE_RAW["base"]
NO_GPU = torch.cuda.device_count() == 0
NOT_UTF8 = b"base:\n  model: \xff\xfe balanced\n"
PBT = {"type": "pbt", "perturbation_interval": 1, "hyperparam_mutations": {"lr_d": {"loguniform": [1.0e-4, 1.0e-3]}}}


def space_file(tmp_path, change):
    """The smoke space with top-level keys replaced (a dict), text appended (a str) or raw bytes, as bad.yaml."""
    path = tmp_path / "bad.yaml"
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, str):
        path.write_text(SMOKE.read_text() + change)
    else:
        path.write_text(yaml.safe_dump({**SMOKE_RAW, **change}, sort_keys=False))
    return path


def search_case(change=None, *flags):
    """A search of a broken smoke variant (change) or the shipped smoke space, plus flags (may name "{tmp}")."""
    def argv(tmp_path):
        space = space_file(tmp_path, change) if change is not None else "smoke"
        return "search", ["--space", str(space), "--storage-path", str(tmp_path / "rr"),
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *fill(tmp_path, flags)]
    return argv


def search_base(**values):
    return search_case({"base": {**SMOKE_BASE, **values}})


def search_search(**searched):
    return search_case({"search": searched})


def train_case(*flags):
    return command("train", "--set", "out_dir={tmp}/runs", *flags)


def train_config(text):
    """train --config of a file holding `text` (bytes: written as they are)."""
    def argv(tmp_path):
        path = tmp_path / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return "train", ["--config", str(path), "--dry-run"]
    return argv


@functools.cache
def silent_server() -> SilentServer:
    """One for the module, opened by the first row that names it and kept open while the tests run."""
    return SilentServer()


def search_silent_postgres(tmp_path):
    """A PostgreSQL URI whose host accepts the connection and never answers (port 1 refuses at once instead)."""
    uri = f"postgresql://u:p@127.0.0.1:{silent_server().port}/db"
    return search_case(None, "--tracking-uri", uri)(tmp_path)


def search_data_dir_a_file(tmp_path):
    """A space whose base data_dir (MNIST's cache) is a plain file."""
    (tmp_path / "plain").write_text("a file, not a folder\n")
    return search_base(data_dir=str(tmp_path / "plain"))(tmp_path)


def file_under_a_file(tmp_path):
    (tmp_path / "plain").write_text("a file, not a folder\n")
    return tmp_path / "plain" / "rr"


# id -> (argv builder, strings stderr must contain; "{tmp}" is the row's folder, "{space}" its broken space file)
CASES = {
    # search: the space file
    "malformed yaml": (search_case("metric: [fid\n"), ["{space}", "line 2"]),
    "space not utf-8": (search_case(NOT_UTF8), ["{space}", "UTF-8"]),
    "unknown key": (search_case({"colour": "red"}), ["{space}", "colour"]),
    "wrong type": (search_base(batch_size="big"), ["{space}", "base.batch_size"]),
    "metric is a list": (search_case({"metric": ["fid"]}), ["{space}", "metric"]),
    "scheduler type is a list": (search_case({"scheduler": {"type": ["asha"]}}), ["{space}", "scheduler.type"]),
    "search_alg is a list": (search_case({"search_alg": ["random"]}), ["{space}", "search_alg"]),
    "model is a list": (search_base(model=["mlp"]), ["{space}", "base.model"]),
    "lr <= 0 in a space": (search_search(lr_d={"loguniform": [0.0, 1.0e-3]}), ["{space}", "search.lr_d"]),
    "lr bounds reversed": (search_search(lr_d={"loguniform": [1.0e-3, 1.0e-5]}),
                           ["{space}", "search.lr_d", "low 0.001 > high 1e-05"]),
    "beta1 uniform past 1": (search_search(beta1={"uniform": [0.0, 1.5]}), ["{space}", "search.beta1", "[0, 1)"]),
    "beta2 choice of 1": (search_search(beta2={"choice": [0.9, 1.0]}), ["{space}", "search.beta2", "[0, 1)"]),
    "label smoothing past 0.5": (search_search(label_smoothing={"uniform": [0.0, 0.7]}),
                                 ["{space}", "search.label_smoothing"]),
    "g_ema decay uniform past 1": (search_search(g_ema={"uniform": [0.9, 1.2]}), ["{space}", "search.g_ema", "[0, 1)"]),
    "searched seed past numpy": (search_search(seed={"randint": [0, 2**40]}), ["{space}", "search.seed"]),
    "searched batch above subset": (search_case({"base": {k: v for k, v in SMOKE_BASE.items() if k != "batch_size"},
                                                 "search": {"batch_size": {"choice": [64, 4096]}}}),
                                    ["{space}", "search.batch_size", "subset"]),
    "lr_ratio negative": (search_search(lr_g={"loguniform": [1.0e-4, 1.0e-3]}, lr_ratio={"uniform": [-1.0, 2.0]}),
                          ["{space}", "search.lr_ratio", "> 0"]),
    "latent_dim not an integer": (search_base(latent_dim=1.5), ["{space}", "base.latent_dim"]),
    "unknown model": (search_base(model="stylegan"), ["{space}", "base.model"]),
    "device missing here": (search_base(device="cuda:7"), ["{space}", "base.device", "cuda:7"]),
    "unknown scheduler": (search_case({"scheduler": {"type": "bohb"}}), ["{space}", "scheduler.type"]),
    "pbt without mutations": (search_case({"scheduler": {"type": "pbt", "perturbation_interval": 1}}),
                              ["{space}", "scheduler.hyperparam_mutations"]),
    "pbt mutates beta1 uniformly": (search_case({"scheduler": {
        "type": "pbt", "perturbation_interval": 1, "hyperparam_mutations": {"beta1": {"uniform": [0.1, 0.9]}}}}),
        ["{space}", "scheduler.hyperparam_mutations.beta1", "choice"]),
    "pbt burn-in negative": (search_case({"scheduler": {
        "type": "pbt", "perturbation_interval": 1, "burn_in_period": -1,
        "hyperparam_mutations": {"lr_d": {"loguniform": [1.0e-4, 1.0e-3]}}}}), ["{space}", "scheduler.burn_in_period"]),
    "metric not reported": (search_case({"metric": "fid_score"}), ["{space}", "metric"]),
    "num_samples 0 in a space": (search_case({"num_samples": 0}), ["{space}", "num_samples"]),
    "resources gpu nan": (search_case({"resources": {"cpu": 1, "gpu": float("nan")}}), ["{space}", "resources.gpu"]),
    "resources cpu above the machine": (search_case({"resources": {"cpu": 1000, "gpu": 0}}),
                                        ["{space}", "resources.cpu", "1000"]),
    "unknown space": (command("search", "--space", "no-such-space", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"),
                      ["--space", "no-such-space", "smoke", "balanced", "pbt"]),
    "space path missing": (command("search", "--space", "{tmp}/gone/space.yaml"), ["--space", "{tmp}/gone/space.yaml"]),
    # search: flags
    "num_samples 0 flag": (search_case(None, "--num-samples", "0"), ["--num-samples", ">= 1"]),
    "num_samples not a number": (search_case(None, "--num-samples", "many"), ["--num-samples", "many"]),
    "unknown flag": (search_case(None, "--colour", "red"), ["unrecognized", "--colour"]),
    "time budget soon": (search_case(None, "--time-budget", "soon"), ["--time-budget", "soon"]),
    "seed negative": (search_case(None, "--seed", "-1"), ["--seed", "-1", "4294967295"]),
    "seed past numpy": (search_case(None, "--seed", str(2**40)), ["--seed", str(2**40)]),
    "cpus per trial above the machine": (search_case(None, "--cpus-per-trial", "1000"), ["--cpus-per-trial", "1000"]),
    "storage path under a file": (lambda tmp_path: search_case(None, "--storage-path",
                                                               str(file_under_a_file(tmp_path)))(tmp_path),
                                  ["--storage-path", "{tmp}/plain"]),
    "storage path under /proc": (search_case(None, "--storage-path", "/proc/gan_tune_rr"),
                                 ["--storage-path", "/proc/gan_tune_rr"]),
    "tracking uri sqlite under /proc": (search_case(None, "--tracking-uri", "sqlite:////proc/gan_tune.db"),
                                        ["--tracking-uri", "/proc/gan_tune.db", "not writable"]),
    "storage path read-only": (search_case(None, "--storage-path", "/sys/gan_tune_rr"),
                               ["--storage-path", "/sys/gan_tune_rr"]),
    "tracking uri ftp": (search_case(None, "--tracking-uri", "ftp://x"), ["--tracking-uri", "ftp://x"]),
    "tracking uri dead server": (search_case(None, "--tracking-uri", DEAD_SERVER), ["--tracking-uri", DEAD_SERVER]),
    "tracking uri without its driver": (search_case(None, "--tracking-uri", "postgresql://u@127.0.0.1:1/db"),
                                        [("--tracking-uri: postgresql://u@127.0.0.1:1/db: its driver psycopg is not "
                                          "installed: pip install 'gan_tune[postgres]'")]),
    "address dead": (search_case(None, "--address", "127.0.0.1:1"), ["--address", "127.0.0.1:1"]),
    "address not host:port": (search_case(None, "--address", "nowhere"), ["--address", "nowhere"]),
    "gpus on a cpu cluster": (search_case(None, "--gpus-per-trial", "0.5"), ["--gpus-per-trial", "no GPU"]),
    "resume of no search": (search_case(None, "--resume", "--name", "never-ran"),
                            ["--resume", "{tmp}/rr/never-ran", "no study"]),
    # train
    "lr <= 0 in train": (train_case("--set", "lr_d=-1.0e-4"), ["--set", "lr_d"]),
    "latent_dim 0": (train_case("--set", "latent_dim=0"), ["--set", "latent_dim"]),
    "set value broken yaml": (train_case("--set", "lr_d=[1.0e-4"), ["--set", "lr_d", "malformed YAML"]),
    "set without =": (train_case("--set", "lr_d"), ["--set", "key=value"]),
    "set beta1 1": (train_case("--set", "beta1=1.0"), ["--set", "beta1", "[0, 1)"]),
    "set g_ema decay 1": (train_case("--set", "g_ema=1.0"), ["--set", "g_ema", "[0, 1)"]),
    "set r1_every 0": (train_case("--set", "r1_every=0"), ["--set", "r1_every", ">= 1"]),
    "set seed negative": (train_case("--set", "seed=-1"), ["--set", "seed"]),
    "set data_dir a file": (train_case("--set", "data_dir={tmp}/plain"),
                            ["--set", "data_dir", "{tmp}/plain", "a file"]),
    "set subset below a batch": (train_case("--set", "subset=10"), ["--set", "subset", "batch"]),
    "set device missing here": (train_case("--set", "device=cuda:7"), ["device", "cuda:7"]),
    "out_dir not makeable": (command("train", "--set", "out_dir=/proc/gan_tune_runs", "--set", "max_epochs=1"),
                             ["out_dir", "/proc/gan_tune_runs"]),
    "train config missing": (train_case("--config", "/nonexistent/run.yaml"), ["/nonexistent/run.yaml", "not found"]),
    "train config not utf-8": (train_config(NOT_UTF8), ["{tmp}/run.yaml", "UTF-8"]),
    "train config list for a name": (train_config("model: [mlp]\n"), ["{tmp}/run.yaml", "model"]),
    "train config not a mapping": (train_config("- lr_d\n- lr_g\n"), ["{tmp}/run.yaml", "mapping"]),
    "train resume without checkpoint": (train_case("--resume", "{tmp}"), ["--resume", "checkpoint.pt", "not found"]),
    # round four (issue 25): absurd numbers, empty names, a database that is down, a text file named .pt
    "num_samples 20 digits": (search_case(None, "--num-samples", "9" * 20), ["--num-samples", "100,000"]),
    "max_epochs 20 digits": (search_case(None, "--max-epochs", "9" * 20), ["--max-epochs", "100,000"]),
    "max_epochs negative": (search_case(None, "--max-epochs", "-2"), ["--max-epochs", ">= 1"]),
    "num_samples 20 digits in a space": (search_case({"num_samples": 10**19}), ["{space}", "num_samples", "100,000"]),
    "time budget unknown unit": (search_case(None, "--time-budget", "5 weeks"), ["--time-budget", "5 weeks"]),
    "experiment empty": (search_case(None, "--experiment", ""), ["--experiment", "empty"]),
    "study name blank": (search_case(None, "--name", "  "), ["--name", "empty"]),
    "tracking uri postgresql down": (search_case(None, "--tracking-uri", "postgresql://gan:pw@127.0.0.1:1/mlflow"),
                                     ["--tracking-uri", "127.0.0.1:1", "did not accept a connection"]),
    # a host that takes the connection and never answers: the store check's connect timeout ends it (LIMITS)
    "tracking uri postgresql silent": (search_silent_postgres, ["--tracking-uri", "postgresql://u:***@127.0.0.1:",
                                       f"did not accept a connection within {SERVER_CHECK_TIMEOUT_S:g} s",
                                       "connection timeout expired"]),
    # round four, every numeric flag at 0, negative and 20 digits where invalid (0 is valid where the help says it
    # means "off" or "the default": bench --fid-samples/--parity-epochs/--cost-epochs, metrics score --n,
    # --gpus-per-trial); numbers as words or nan/inf where a float is read
    "num_samples negative": (search_case(None, "--num-samples", "-3"), ["--num-samples", ">= 1"]),
    "max_epochs 0": (search_case(None, "--max-epochs", "0"), ["--max-epochs", ">= 1"]),
    "gpus per trial negative": (search_case(None, "--gpus-per-trial", "-0.5"), ["--gpus-per-trial", "-0.5"]),
    "gpus per trial nan": (search_case(None, "--gpus-per-trial", "nan"), ["--gpus-per-trial", "nan"]),
    "gpus per trial inf": (search_case(None, "--gpus-per-trial", "inf"), ["--gpus-per-trial", "inf"]),
    "gpus per trial 20 digits": (search_case(None, "--gpus-per-trial", TWENTY), ["--gpus-per-trial"]),
    "cpus per trial 0": (search_case(None, "--cpus-per-trial", "0"), ["--cpus-per-trial", "> 0"]),
    "cpus per trial negative": (search_case(None, "--cpus-per-trial", "-2"), ["--cpus-per-trial", "> 0"]),
    "cpus per trial nan": (search_case(None, "--cpus-per-trial", "nan"), ["--cpus-per-trial", "nan"]),
    "cpus per trial inf": (search_case(None, "--cpus-per-trial", "inf"), ["--cpus-per-trial", "inf"]),
    "cpus per trial 20 digits": (search_case(None, "--cpus-per-trial", TWENTY), ["--cpus-per-trial"]),
    "set max_epochs 0": (train_case("--set", "max_epochs=0"), ["--set", "max_epochs", ">= 1"]),
    "set max_epochs 20 digits": (train_case("--set", f"max_epochs={TWENTY}"), ["--set", "max_epochs", "100,000"]),
    "set latent_dim 20 digits": (train_case("--set", f"latent_dim={TWENTY}"), ["--set", "latent_dim"]),
    "set batch_size 20 digits": (train_case("--set", f"batch_size={TWENTY}"), ["--set", "batch_size"]),
    "set width 1e20": (train_case("--set", "width=1.0e+20"), ["--set", "width"]),
    "set n_disc 20 digits": (train_case("--set", f"n_disc={TWENTY}"), ["--set", "n_disc"]),
    "set steps_per_epoch 20 digits": (train_case("--set", f"steps_per_epoch={TWENTY}"), ["--set", "steps_per_epoch"]),
    "set fid_samples 20 digits": (train_case("--set", f"fid_samples={TWENTY}"), ["--set", "fid_samples"]),
    "set gp_weight nan": (train_case("--set", "gp_weight=.nan"), ["--set", "gp_weight"]),
    # time budgets: unknown units, empty, zero, 20 digits (search --time-budget and bench search --budget)
    "time budget 5 parsecs": (search_case(None, "--time-budget", "5 parsecs"), ["--time-budget", "5 parsecs"]),
    "time budget 5x": (search_case(None, "--time-budget", "5x"), ["--time-budget", "5x"]),
    "time budget empty": (search_case(None, "--time-budget", ""), ["--time-budget", "''"]),
    "time budget 0s": (search_case(None, "--time-budget", "0s"), ["--time-budget", "> 0"]),
    "time budget negative": (search_case(None, "--time-budget=-5m"), ["--time-budget", "bad duration '-5m'"]),
    # without "=", argparse takes -5m for an option: still one line naming the flag
    "time budget negative as a word": (search_case(None, "--time-budget", "-5m"), ["--time-budget", "expected one"]),
    "time budget 20 digits": (search_case(None, "--time-budget", TWENTY + "h"), ["--time-budget", "a year"]),
    "time budget in a space unknown unit": (search_case({"time_budget": "5 parsecs"}), ["{space}", "time_budget"]),
    # --resume of a study that does not exist: a folder holding none, a file
    "resume an empty folder": (search_case(None, "--resume", "{tmp}"), ["--resume", "{tmp}", "no study"]),
    "resume a file": (search_case(None, "--resume", "{tmp}/plain"), ["--resume", "{tmp}/plain", "a file"]),
    # space files: empty, not a mapping at the top, unknown mode, every distribution reversed or empty
    "space empty": (search_case(b""), ["{space}", "empty"]),
    "space top level a list": (search_case(b"- metric\n- mode\n"), ["{space}", "top level", "mapping"]),
    "space top level a scalar": (search_case(b"42\n"), ["{space}", "top level", "mapping"]),
    "space is a folder": (command("search", "--space", "{tmp}"), ["--space", "{tmp}", "folder"]),
    # cohort trials (issue 27): a size that is no count, and a searcher that suggests one configuration per trial
    "cohort zero": (search_case({"cohort": 0}), ["{space}", "cohort", "[1, 256]"]),
    "cohort absurd": (search_case({"cohort": int(TWENTY)}), ["{space}", "cohort", "[1, 256]"]),
    "cohort with optuna": (search_case({"cohort": 4, "search_alg": "optuna"}), ["{space}", "cohort", "random"]),
    "mode unknown": (search_case({"mode": "maximum"}), ["{space}", "mode", "maximum"]),
    "mode is a list": (search_case({"mode": ["min"]}), ["{space}", "mode"]),
    "metric unknown in a list of names": (search_case({"metric": "accuracy"}), ["{space}", "metric", "accuracy"]),
    "uniform reversed": (search_search(beta1={"uniform": [0.9, 0.1]}), ["{space}", "search.beta1", "low 0.9 > high 0.1"]),
    "uniform empty range": (search_search(beta1={"uniform": [0.5, 0.5]}), ["{space}", "search.beta1", "low == high"]),
    "loguniform empty range": (search_search(lr_d={"loguniform": [1.0e-4, 1.0e-4]}), ["{space}", "search.lr_d", "low =="]),
    "randint reversed": (search_search(n_disc={"randint": [5, 1]}), ["{space}", "search.n_disc", "low 5 > high 1"]),
    "randint one value": (search_search(n_disc={"randint": [5, 5]}), ["{space}", "search.n_disc", "low == high"]),
    "randint float bounds": (search_search(n_disc={"randint": [1.5, 3.5]}), ["{space}", "search.n_disc", "integers"]),
    "uniform one bound": (search_search(beta1={"uniform": [0.5]}), ["{space}", "search.beta1", "[low, high]"]),
    "choice empty": (search_search(n_disc={"choice": []}), ["{space}", "search.n_disc", "non-empty"]),
    "choice not a list": (search_search(n_disc={"choice": 64}), ["{space}", "search.n_disc", "non-empty"]),
    "grid empty": (search_search(n_disc={"grid": []}), ["{space}", "search.n_disc", "non-empty"]),
    "grid_search is not a distribution": (search_search(n_disc={"grid_search": [32, 64]}),
                                          ["{space}", "search.n_disc", "grid_search"]),
    "pbt mutation range reversed": (search_case({"scheduler": {
        "type": "pbt", "perturbation_interval": 1, "hyperparam_mutations": {"lr_d": {"loguniform": [1.0e-3, 1.0e-4]}}}}),
        ["{space}", "scheduler.hyperparam_mutations.lr_d", "low"]),
    "pbt mutation uniform reversed": (search_case({"scheduler": {**PBT, "hyperparam_mutations": {
        "lr_d": {"uniform": [1.0e-3, 1.0e-4]}}}}),
        ["{space}", "scheduler.hyperparam_mutations.lr_d", "low 0.001 > high"]),
    "pbt mutation choice empty": (search_case({"scheduler": {
        **PBT, "hyperparam_mutations": {"beta1": {"choice": []}}}}),
        ["{space}", "scheduler.hyperparam_mutations.beta1", "non-empty"]),
    # incompatible settings (README, TrainConfig.__post_init__): through train --set, train --config, a space's base
    "set wgan-gp with batch norm": (train_case("--set", "loss=wgan-gp"), ["--set", "d_norm", "wgan-gp"]),
    "set hinge with label smoothing": (train_case("--set", "loss=hinge", "--set", "label_smoothing=0.1"),
                                       ["--set", "label_smoothing", "hinge"]),
    "set augment target without augment": (train_case("--set", "augment_target=0.6"), ["--set", "augment_target"]),
    "config wgan-gp with batch norm": (train_config("loss: wgan-gp\nd_norm: batch\n"), ["{tmp}/run.yaml", "d_norm"]),
    "base wgan-gp with batch norm": (search_base(loss="wgan-gp", d_norm="batch"), ["{space}", "base.d_norm", "wgan-gp"]),
    "base hinge with label smoothing": (search_base(loss="hinge", label_smoothing=0.1),
                                        ["{space}", "base.label_smoothing", "hinge"]),
    "base g_ema decay 1": (search_base(g_ema=1.0), ["{space}", "base.g_ema", "[0, 1)"]),
    "base r1_every past its bound": (search_base(r1_every=10**6), ["{space}", "base.r1_every", "absurdly large"]),
    "base augment target without augment": (search_base(augment_target=0.6), ["{space}", "base.augment_target"]),
    "base subset below a batch": (search_base(subset=100), ["{space}", "base.subset", "batch"]),
    "searched wgan-gp with base batch norm": (search_search(loss={"choice": ["ns", "wgan-gp"]}),
                                              ["{space}", "search.loss", "d_norm"]),
    "hyperband with checkpoint_every_s": (search_case({"base": {**SMOKE_BASE, "checkpoint_every_s": 30.0},
                                                       "scheduler": {"type": "hyperband"}}),
                                          ["{space}", "base.checkpoint_every_s", "hyperband"]),
    # the other pairs README and search_spaces/README.md name, each through a space (spaces.py, TrainConfig)
    "base wgan-gp with label smoothing": (search_base(loss="wgan-gp", d_norm="spectral", label_smoothing=0.1),
                                          ["{space}", "base.label_smoothing", "wgan-gp"]),
    "set wgan-gp with label smoothing": (train_case("--set", "loss=wgan-gp", "--set", "d_norm=spectral", "--set",
                                                    "label_smoothing=0.1"), ["--set", "label_smoothing", "wgan-gp"]),
    "base data_dir a file": (search_data_dir_a_file, ["{space}", "base.data_dir", "{tmp}/plain", "a file"]),
    "pbt with checkpoint_every_s": (search_case({"base": {**SMOKE_BASE, "checkpoint_every_s": 30.0}, "scheduler": PBT}),
                                    ["{space}", "base.checkpoint_every_s", "pbt"]),
    "pbt with optuna": (search_case({"search_alg": "optuna", "scheduler": PBT}),
                        ["{space}", "search_alg", "pbt samples its own population"]),
    "pbt with eval_every 2": (search_case({"base": {**SMOKE_BASE, "eval_every": 2}, "scheduler": PBT}),
                              ["{space}", "base.eval_every", "pbt needs a score on every report"]),
    "pbt interval not a multiple of checkpoint_every": (search_case({"base": {**SMOKE_BASE, "checkpoint_every": 2},
                                                                     "scheduler": {**PBT, "perturbation_interval": 3}}),
                                                        ["{space}", "scheduler.perturbation_interval", "multiple"]),
    "hyperband with checkpoint_every 2": (search_case({"base": {**SMOKE_BASE, "checkpoint_every": 2},
                                                       "scheduler": {"type": "hyperband"}}),
                                          ["{space}", "base.checkpoint_every", "hyperband"]),
    "hyperband with eval_every 2": (search_case({"base": {**SMOKE_BASE, "eval_every": 2},
                                                 "scheduler": {"type": "hyperband"}}),
                                    ["{space}", "base.eval_every", "hyperband needs a score on every report"]),
    "asha grace period below eval_every": (search_case({"base": {**SMOKE_BASE, "eval_every": 2}}),
                                           ["{space}", "scheduler.grace_period", "below eval_every 2"]),
    "grid with a random entry": (search_case({"search_alg": "grid"}), ["{space}", "search.lr_d", "only grid entries"]),
    "optuna with a grid entry": (search_case({"search_alg": "optuna", "search": {"lr_d": {"grid": [1.0e-4, 1.0e-3]}}}),
                                 ["{space}", "search.lr_d", "optuna cannot take grid entries"]),
    "cohort with grid": (search_case({"cohort": 4, "search_alg": "grid",
                                      "search": {"lr_d": {"grid": [1.0e-4, 1.0e-3]}}}),
                         ["{space}", "cohort", "random"]),
    "optuna not installed": (search_case({"search_alg": "optuna"}),
                             ["{space}", "search_alg", "pip install 'gan_tune[optuna]'"]),
    # output paths: a file for a folder, a folder for a file, under a file
    "storage path a file": (search_case(None, "--storage-path", "{tmp}/plain"), ["--storage-path", "{tmp}/plain"]),
    "tracking uri sqlite under a file": (search_case(None, "--tracking-uri", "sqlite:///{tmp}/plain/m.db"),
                                         ["--tracking-uri", "{tmp}/plain"]),
    "tracking uri sqlite a folder": (search_case(None, "--tracking-uri", "sqlite:///{tmp}"), ["--tracking-uri", "{tmp}"]),
    "train config a folder": (train_case("--config", "{tmp}"), ["{tmp}: path: a folder, not a file"]),
    "train config a scalar top level": (train_config("42\n"), ["{tmp}/run.yaml", "mapping"]),
    "out_dir a file": (command("train", "--set", "out_dir={tmp}/plain", "--set", "max_epochs=1"),
                       ["out_dir", "{tmp}/plain"]),
    "train resume a file": (train_case("--resume", "{tmp}/plain"), ["--resume", "{tmp}/plain"]),
}
SKIPS = {
    "gpus on a cpu cluster": (not NO_GPU, "this machine has a GPU"),
}
# The test extra installs PostgreSQL's driver and optuna: these rows run with one hidden (its import fails in their
# child)
HIDDEN = {"tracking uri without its driver": ("psycopg", "psycopg2"), "optuna not installed": ("optuna",)}
# The silent server costs the store check its whole connect timeout: the row must end soon after it
LIMITS = {"tracking uri postgresql silent": SERVER_CHECK_TIMEOUT_S + 10}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Every selected row of the table, run in forked children two at a time."""
    return table_outcomes(request, tmp_path_factory, CASES, SKIPS, HIDDEN)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(outcomes, case):
    skip, why = SKIPS.get(case, (False, ""))
    if skip:
        pytest.skip(why)
    tmp_path, row = outcomes[case]
    check_row(CASES, case, tmp_path, row, LIMITS.get(case, ROW_LIMIT_S))


FRESH = ["space not utf-8", "set value broken yaml"]


def test_one_row_per_command_in_a_fresh_interpreter(tmp_path):
    """A real `python -m` per command: the table's verdicts hold without the preloaded imports."""
    check_fresh_rows(CASES, FRESH, tmp_path)


def test_the_table_covers_search_and_train(tmp_path):
    assert commands_of(CASES, tmp_path) == {"search", "train"}
    assert len(CASES) >= 139


def failing_space(tmp_path):
    """A space every trial of which raises in its worker: a device the workers lack (mps on Linux)."""
    path = tmp_path / "mps.yaml"
    path.write_text(yaml.safe_dump({**SMOKE_RAW, "base": {**SMOKE_BASE, "device": "mps"}}, sort_keys=False))
    return path


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has mps")
def test_a_space_whose_trials_all_raise_stops_after_two_without_retries_with_one_line_per_error(ray_local, tmp_path, capsys):
    """Joining a cluster (--address auto: the session's Ray) whose workers lack the space's device: every trial
    raises before its first report; the search stops after two of them instead of retrying each trial twice."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = search.main(["--space", str(failing_space(tmp_path)), "--address", "auto", "--storage-path",
                        str(tmp_path / "rr"), "--tracking-uri", uri])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 1
    assert len(errors) == 1 and "mps" in errors[0] and "trials raised before any report" in errors[0], errors
    client = MlflowClient(uri)
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
    parent = [run for run in runs if run.data.tags.get("run_kind") == "search"]
    assert len(parent) == 1 and parent[0].info.status == "FAILED" and "mps" in parent[0].data.tags["failure_reason"]
    assert all(run.info.status != "RUNNING" for run in runs)
    # Tune appends a "Failure # N" entry to a trial's error.txt per failed attempt: two trials, once each, no retry
    failures = [path.read_text().count("Failure # ") for path in (tmp_path / "rr").glob("*/*/error.txt")]
    assert failures == [1] * stopping.FAIL_FAST_TRIALS, failures
