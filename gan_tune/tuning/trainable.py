"""The Ray Tune function trainable: one trial runs the `loop.fit` loop and reports every epoch to Tune.

`train_gan(config, data)` is passed to Tune as `tune.with_parameters(train_gan, data=data)`, so MNIST
goes through the object store once. Per epoch it reports REPORTED_METRICS; every `checkpoint_every`
epochs the report carries a checkpoint, which is what PBT exploits, HyperBand resumes paused trials
from and FailureConfig retries from.

Pictures and tables go into the trial's working directory: Tune makes it the actor's cwd, and
`SyncConfig(sync_artifacts=True)` (tuner.build_tuner) uploads it to the trial's folder under the storage path,
from any node. `tune.get_context().get_trial_dir()` would not do: in Ray 2.60 it is the driver's staging
folder, which exists only on the driver's node.

Restores: Tune hands over the trial's latest checkpoint (or, after a PBT exploit, the donor's). When its
file is unreadable (truncated by a full disk or a cut upload), the trial falls back to the checkpoints
saved before it in the same folder, newest first, and with none readable starts fresh from epoch 0;
each step is logged as a warning and reported in `restore_note`, next to `restored_from`/`restored_epoch`.

Scores: `fit` scores every `eval_every` epochs. Between scores the trainable reports the last known
score (`score_epoch` says when it was measured), because schedulers compare the metric on every report.
The shipped spaces use eval_every 1. A diverged epoch is not scored; it reports measures.DIVERGED_SCORES,
each metric's worst finite value, so NaN never reaches a scheduler's comparison or sort.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import pyarrow.fs as pafs
import ray
import torch
from ray import tune

from gan_tune.quality import measures, scorer
from gan_tune.training import artifacts, checkpoint, loop, step
from gan_tune.training.config import TrainConfig, from_dict, resolve_derived
from gan_tune.training.data import DataError, Mnist

T = TypeVar("T")
log = logging.getLogger(__name__)  # a worker's warnings reach the driver's console through Ray's log forwarding

CHECKPOINT_FOLDER = re.compile(r"checkpoint_\d{6}")  # Ray's name for the N-th checkpoint of a trial
# Seconds an epoch spent beside training (epoch_time_s) and scoring (score_s): writing its grid and files, and
# the previous epoch's report with its checkpoint (an epoch's own is known only after it is sent).
COST_KEYS = ("files_s", "report_s")
# Every key of a report (Tune adds time_total_s): the epoch record, the scores, and where they came from.
REPORTED_METRICS = (*loop.RECORD_KEYS, *measures.SCORE_KEYS, "score_epoch", "lr_d", "lr_g", *COST_KEYS,
                    "node_id", "data_source", "restored_from", "restored_epoch", "restore_note")
# Tests only: "EPOCH:FILE" makes the first trial that reports EPOCH write its pid to FILE and wait there
# (for FILE.release, or FAULT_GATE_TIMEOUT_S) so a fault test kills or breaks it at a known point, however
# fast the machine trains; FAULT_GATE_TRIAL_ENV, if set, limits it to trial ids ending so (e.g. "_00000"), or with
# "*" gives every trial a gate of its own (FILE-TRIAL_ID), all opened by FILE.release (trials held at once).
# Unset, it costs one dict lookup per epoch.
# Ray Train logs "Checkpoint successfully created" per checkpoint in every worker: one line per trial and
# epoch on the driver's console (search --verbose keeps it)
CHECKPOINT_LOGGER = "ray.train._internal.storage"
FAULT_GATE_ENV = "GAN_TUNE_FAULT_GATE"
FAULT_GATE_TRIAL_ENV = "GAN_TUNE_FAULT_GATE_TRIAL"
FAULT_GATE_TIMEOUT_S = 300.0


def trial_config(config: dict[str, Any]) -> TrainConfig:
    """The trial's TrainConfig, built once; a misspelled key fails here, at the trial's start."""
    return from_dict(resolve_derived(config), where="trial config")


def trial_cpus() -> int:
    """CPUs Ray reserved for this trial: torch uses that many threads, so packed trials don't oversubscribe."""
    resources = tune.get_context().get_trial_resources().required_resources
    return max(1, int(resources.get("CPU", 1)))


def restore(gan: step.Gan, generator: torch.Generator,
            tune_checkpoint: tune.Checkpoint) -> tuple[int, torch.Tensor, list, dict]:
    """Load a checkpoint (own, or another trial's after a PBT exploit); lr_d/lr_g come from this trial."""
    with tune_checkpoint.as_directory() as folder:
        saved = checkpoint.read(folder, gan.device)  # DataError naming a bad file
    epoch, noise, history = checkpoint.restore(gan, saved, generator)
    return epoch, noise, history, {"restored_from": saved["trial_id"], "restored_epoch": epoch}


def earlier_checkpoints(latest: tune.Checkpoint) -> list[tune.Checkpoint]:
    """The checkpoints saved before `latest` in its trial's folder, newest first.

    Listed through the checkpoint's own pyarrow filesystem, so local, NFS and s3:// storage all work.
    Tune keeps several per trial (tuner.CHECKPOINTS_KEPT); after a PBT exploit these are the donor's.
    """
    folder, name = posixpath.split(latest.path.rstrip("/"))
    found = latest.filesystem.get_file_info(pafs.FileSelector(folder))
    names = sorted((info.base_name for info in found if info.type == pafs.FileType.Directory
                    and CHECKPOINT_FOLDER.fullmatch(info.base_name) and info.base_name < name), reverse=True)
    return [tune.Checkpoint(posixpath.join(folder, older), filesystem=latest.filesystem) for older in names]


def newest_readable(latest: tune.Checkpoint, load: Callable[[tune.Checkpoint], T]) -> tuple[T | None, str]:
    """(`load` of the newest readable of `latest` and the checkpoints saved before it, the restore note); None
    when none is readable. `load` raises DataError on an unreadable file (a disk that filled during the upload)
    before any state reaches the run, so the next candidate needs nothing rebuilt. Each step is logged."""
    unreadable: list[str] = []  # folder names, oldest last
    for candidate in [latest, *earlier_checkpoints(latest)]:
        try:
            loaded = load(candidate)
        except DataError as err:
            log.warning("checkpoint %s not restored: %s", candidate.path, err)
            unreadable.append(posixpath.basename(candidate.path))
            continue
        if not unreadable:
            return loaded, ""
        log.warning("fell back to the previous checkpoint %s", candidate.path)
        return loaded, f"unreadable {', '.join(unreadable)}; restored {posixpath.basename(candidate.path)}"
    log.warning("no readable checkpoint left (%s): the trial starts fresh from epoch 0", ", ".join(unreadable))
    return None, f"unreadable {', '.join(unreadable)}; started fresh"


def restore_readable(gan: step.Gan, generator: torch.Generator, latest: tune.Checkpoint,
                     noise: torch.Tensor) -> tuple[int, torch.Tensor, list, dict]:
    """`restore` the newest readable of `latest` and the ones saved before it; none readable: epoch 0.
    `restore_note` tells the results what happened."""
    restored, note = newest_readable(latest, lambda candidate: restore(gan, generator, candidate))
    if restored is None:
        return 0, noise, [], {"restored_from": "", "restored_epoch": 0, "restore_note": note}
    epoch, noise, history, context = restored
    return epoch, noise, history, {**context, "restore_note": note}


def report(result: dict, gan: step.Gan, noise: torch.Tensor, generator: torch.Generator, history: list,
           since_checkpoint_s: float) -> bool:
    """tune.report, with a checkpoint when loop.due says so (every `checkpoint_every` epochs or
    `checkpoint_every_s` seconds, the last epoch, never a diverged one); whether it checkpointed."""
    if not loop.due(gan.cfg, result["epoch"], result["balance"] == "diverged", since_checkpoint_s).checkpoint:
        tune.report(result)
        return False
    saved = checkpoint.state(gan, result["epoch"], noise, generator, history, tune.get_context().get_trial_id())
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.write(saved, folder)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))  # copied to storage before return
    return True


def epoch_metrics(record: dict, scores: dict, context: dict) -> dict:
    """One report: the epoch record, the latest scores (carried between evaluations) and the context."""
    if record["balance"] == "diverged":
        scores.update(measures.DIVERGED_SCORES, score_epoch=record["epoch"])
    elif "fid" in record:
        scores.update({key: record[key] for key in measures.SCORE_KEYS}, score_epoch=record["epoch"])
    return {**record, **scores, **context}


def write_trial_files(trial_dir: Path, gan: step.Gan, noise: torch.Tensor, history: list) -> None:
    """On sampling epochs (loop.due; always the last and a diverged one): the grid and a finished run's files.

    Written before the epoch's report: a trial that Tune stops (ASHA, the GAN stopper, the time budget)
    runs no code after its last report, so its folder must be complete by then.
    """
    epoch = history[-1]["epoch"]
    if not loop.due(gan.cfg, epoch, history[-1]["balance"] == "diverged").sample:
        return
    images = loop.generate(gan.eval_generator(), noise)
    artifacts.save_grid(images, trial_dir / artifacts.SAMPLES / artifacts.grid_name(epoch))
    artifacts.write_summary(trial_dir, images, history)


def last_scores(history: list[dict]) -> dict:
    """The scores to carry forward after a restore: those of the checkpoint's last epoch, if any."""
    if not history or "score_epoch" not in history[-1]:
        return {}
    return {key: history[-1][key] for key in (*measures.SCORE_KEYS, "score_epoch")}


def fault_gate(epoch: int) -> None:
    """Wait at FAULT_GATE_ENV's epoch, once per study: a restarted trial that trains that epoch again runs on."""
    spec = os.environ.get(FAULT_GATE_ENV)
    if not spec or int(spec.split(":", 1)[0]) != epoch:
        return
    trials, trial_id = os.environ.get(FAULT_GATE_TRIAL_ENV, ""), tune.get_context().get_trial_id()
    if trials != "*" and not trial_id.endswith(trials):
        return
    path = spec.split(":", 1)[1]
    release, gate = Path(f"{path}.release"), Path(f"{path}-{trial_id}" if trials == "*" else path)
    try:  # O_EXCL: of several trials, and of one trial's restarts, only the first claims the gate
        os.close(os.open(f"{gate}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    gate.with_name(f"{gate.name}.tmp").write_text(str(os.getpid()))
    gate.with_name(f"{gate.name}.tmp").rename(gate)  # the test reads a whole pid or nothing
    deadline = time.monotonic() + FAULT_GATE_TIMEOUT_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def train_gan(config: dict[str, Any], data: Mnist, quiet: bool = False) -> None:
    """Ray Tune function trainable: `tune.with_parameters(train_gan, data=data, quiet=...)`.

    quiet: no per-checkpoint info line from Ray (warnings, e.g. a checkpoint fallback, still reach the console)."""
    if quiet:
        logging.getLogger(CHECKPOINT_LOGGER).setLevel(logging.WARNING)
    cfg = trial_config(config)
    torch.set_num_threads(trial_cpus())
    device = step.resolve_device(cfg.device)  # cuda only when Ray gave this trial a GPU
    data = data.to(device)
    gan, generator = step.make_gan(cfg, device), loop.make_generator(cfg, device)
    start_epoch, noise, history = 0, loop.fixed_noise(cfg, device), []
    context = {"node_id": ray.get_runtime_context().get_node_id(), "data_source": data.source,
               "restored_from": "", "restored_epoch": 0, "restore_note": ""}
    latest = tune.get_checkpoint()
    if latest:
        start_epoch, noise, history, restored = restore_readable(gan, generator, latest, noise)
        context.update(restored)
    # the rates the optimisers really use: after a PBT exploit, this trial's explored ones, not the donor's
    context.update(lr_d=gan.opt_d.param_groups[0]["lr"], lr_g=gan.opt_g.param_groups[0]["lr"])
    scores = last_scores(history)
    trial_dir = Path.cwd()  # the trial's working directory (see the module docstring)
    last_checkpoint, report_s = time.monotonic(), 0.0
    for record in loop.fit(gan, data.images, generator, start_epoch, scorer.build_scorer(cfg, data, device)):
        result = epoch_metrics(record, scores, context)
        history.append(result)
        started = time.perf_counter()
        write_trial_files(trial_dir, gan, noise, history)
        result.update(files_s=time.perf_counter() - started, report_s=report_s)
        started = time.perf_counter()
        if report(result, gan, noise, generator, history, time.monotonic() - last_checkpoint):
            last_checkpoint = time.monotonic()
        report_s = time.perf_counter() - started
        fault_gate(record["epoch"])

