"""The Ray Tune function trainable of a cohort trial (issue 27): the K configurations of one trial's config
(training.cohort.MEMBERS_KEY) trained as one fused model, each scored, stopped and reported on its own.

Per epoch: one fused epoch (training.cohort_step, one host sync), then per member what `trainable.train_gan`
does per trial: its scores (every `eval_every` epochs, carried between), its grid and files (in
members/<member id>/ of the trial folder, written before the report), its stop reason. A member stops when
it diverges (the step masks it), when the GAN stopper's rules say so (its own streaks), at the space's rungs
(successive halving inside the cohort: the best 1/reduction_factor go on) or at max_epochs. Stopped members
leave the fused model after the epoch's report, so their compute goes to the survivors.

The report Tune sees is the best surviving member's (so ASHA and HyperBand compare cohorts by their best),
plus `member`, `members_alive` and MEMBERS_KEY: every member's own report with its stop_reason, from which
tracking makes one MLflow run per member. Checkpoints (cohort_checkpoint) hold the whole cohort for
resumes and retries, and the reported member as an ordinary checkpoint for the finalists and the model.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from gan_tune.quality import scorer
from gan_tune.training import artifacts, cohort_checkpoint, loop, step
from gan_tune.training.cohort import (
    MEMBERS_KEY,
    Cohort,
    make_cohort,
    member_configs,
    member_id,
    remove_members,
)
from gan_tune.training.cohort_step import make_generators, train_cohort_epoch
from gan_tune.training.data import Mnist
from gan_tune.tuning import cohort_pbt
from gan_tune.tuning.cohort_pbt import CohortPbt
from gan_tune.tuning.stopping import GanStopper
from gan_tune.tuning.trainable import (
    CHECKPOINT_LOGGER,
    epoch_metrics,
    fault_gate,
    last_scores,
    newest_readable,
    trial_config,
    trial_cpus,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Halving:
    """Successive halving inside a cohort: at each rung epoch the best 1/reduction_factor of the members still
    training go on (at least one). No rungs: members stop only by the GAN stopper's rules or at max_epochs."""

    metric: str
    mode: str
    rungs: tuple[int, ...] = ()
    reduction_factor: int = 3
    pbt: CohortPbt | None = None  # a pbt space: exploit and explore between members instead of halving


@dataclass
class CohortRun:
    """A cohort trial's state between epochs: the fused cohort and, per member id, what a trial keeps."""

    cohort: Cohort
    generators: list[torch.Generator]
    built: list[dict]  # every member's config as make_cohort got it (the checkpoint rebuilds from these)
    kept: list[int]  # indices into `built` of the members in `cohort`, in its order
    ids: list[str]  # member ids, in the cohort's order
    histories: dict[str, list[dict]]
    stopped: dict[str, str] = field(default_factory=dict)  # member id -> stop reason
    epoch: int = 0
    context: dict[str, Any] = field(default_factory=dict)  # restored_epoch etc., as a trial reports them
    # member id -> whose state it trains on: "" from its own start, itself after a restore, a donor after an
    # exploit (reported as restored_from, which tracking tags as a PBT exploit when it names another member)
    sources: dict[str, str] = field(default_factory=dict)
    last: dict[str, dict] = field(default_factory=dict)  # the latest epoch's member reports
    gans: dict[int, step.Gan] = field(default_factory=dict)  # this epoch's members as Gans (member_gan), by index

    def gan(self, k: int) -> step.Gan:
        """Member k as an ordinary Gan, built once per epoch: scoring, its grid and the checkpoint share it (and its
        averaged G's recomputed BatchNorm statistics)."""
        if k not in self.gans:
            self.gans[k] = cohort_checkpoint.member_gan(self.cohort, k)
        return self.gans[k]

    def bookkeeping(self) -> dict:
        return {"ids": self.ids, "histories": self.histories, "stopped": self.stopped, "sources": self.sources}


def start(config: dict[str, Any], trial_id: str, device: torch.device) -> CohortRun:
    built = [trial_config(values).to_dict() for values in member_configs(config)]
    cohort = make_cohort([trial_config(values) for values in built], device)
    ids = [member_id(trial_id, k) for k in range(len(built))]
    return CohortRun(cohort, make_generators(cohort), built, list(range(len(built))), ids, {i: [] for i in ids},
                     context={"restored_from": "", "restored_epoch": 0, "restore_note": ""})


def start_or_restore(config: dict[str, Any], trial_id: str, device: torch.device,
                     latest: tune.Checkpoint | None) -> CohortRun:
    """The cohort from the newest readable of `latest` and the checkpoints saved before it
    (trainable.newest_readable), or started fresh, with the restore note saying why when none was readable (as
    trainable.restore_readable reports it for an ordinary trial)."""
    def load(candidate: tune.Checkpoint) -> dict:
        with candidate.as_directory() as folder:
            return cohort_checkpoint.read(folder, device)

    saved, note = newest_readable(latest, load) if latest else (None, "")
    if saved is not None:
        return from_saved(saved, device, note)
    run = start(config, trial_id, device)
    run.context["restore_note"] = note
    return run


def from_saved(saved: dict, device: torch.device, note: str = "") -> CohortRun:
    """The CohortRun a cohort checkpoint holds, without the members that stopped in its epoch's report."""
    cohort, generators = cohort_checkpoint.restore(saved, device)
    books = saved["members"]
    run = CohortRun(cohort, generators, saved["built"], saved["kept"], books["ids"], books["histories"],
                    books["stopped"], saved["epoch"], context={"restored_epoch": saved["epoch"], "restore_note": note},
                    sources={mid: mid for mid in books["ids"]})
    drop_stopped(run)
    return run


def save(run: CohortRun) -> dict:
    return cohort_checkpoint.cohort_state(run.cohort, run.built, run.kept, run.epoch, run.generators, run.bookkeeping())


def member_reports(run: CohortRun, records: list[dict], epoch: int, seconds: float,
                   score: scorer.Scorer | None) -> dict[str, dict]:
    """Each member's epoch record as an ordinary trial's (balance, rates, its scores when due)."""
    reports = {}
    for k, (mid, record) in enumerate(zip(run.ids, records)):
        cfg = run.cohort.cfgs[k]
        rec = {key: value for key, value in record.items() if key != "alive"}
        rec.update(epoch=epoch, img_per_s=record["cohort_img_per_s"] / run.cohort.members, epoch_time_s=seconds,
                   step_mode=f"cohort of {run.cohort.members} ({run.cohort.step_mode})", score_s=0.0,
                   augment_p=float(cfg.augment != "none") if run.cohort.augment_p is None
                   else float(run.cohort.augment_p[k]))
        rec["balance"] = "diverged" if record["alive"] == 0 else loop.diagnose_balance(rec, cfg.loss)
        if score is not None and loop.due(cfg, epoch, rec["balance"] == "diverged").score:
            started = time.perf_counter()
            rec.update(score(run.gan(k).eval_generator(), cfg.latent_dim))
            rec["score_s"] = time.perf_counter() - started
        context = {**run.context, "lr_d": cfg.lr_d, "lr_g": cfg.lr_g, "restored_from": run.sources.get(mid, "")}
        reports[mid] = epoch_metrics(rec, last_scores(run.histories[mid]), context)
    return reports


def ranked(reports: dict[str, dict], ids: list[str], halving: Halving) -> list[str]:
    """`ids` best first by the metric; non-finite (diverged, unscored) last."""
    sign = 1 if halving.mode == "min" else -1

    def key(mid: str) -> float:
        value = reports[mid].get(halving.metric, math.nan)
        return sign * value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf

    return sorted(ids, key=key)


def stop_reasons(reports: dict[str, dict], stopper: GanStopper, halving: Halving, max_epochs: int) -> dict[str, str]:
    """Why each member stops after this epoch ("" for those that go on)."""
    reasons = {mid: stopper.reason(mid, report) or "" for mid, report in reports.items()}
    epoch = next(iter(reports.values()))["epoch"]
    if epoch >= max_epochs:
        return {mid: reason or "completed" for mid, reason in reasons.items()}
    going = [mid for mid, reason in reasons.items() if not reason]
    if epoch in halving.rungs and going:
        keep = max(1, math.ceil(len(going) / halving.reduction_factor))
        reasons.update({mid: f"cohort halving at epoch {epoch}" for mid in ranked(reports, going, halving)[keep:]})
    return reasons


def write_member_files(run: CohortRun, k: int, stopping: bool, trial_dir: Path) -> None:
    """The member's grid and summary in members/<id>/ on its sampling epochs and its last (as write_trial_files)."""
    mid, cfg = run.ids[k], run.cohort.cfgs[k]
    history = run.histories[mid]
    if not (stopping or loop.due(cfg, run.epoch, history[-1]["balance"] == "diverged").sample):
        return
    images = loop.generate(run.gan(k).eval_generator(), loop.fixed_noise(
        cfg, run.cohort.device))
    folder = trial_dir / MEMBERS_KEY / mid
    artifacts.save_grid(images, folder / artifacts.SAMPLES / artifacts.grid_name(run.epoch))
    artifacts.write_summary(folder, images, history)


def cohort_result(reports: dict[str, dict], reasons: dict[str, str], halving: Halving) -> dict:
    """The best surviving member's report (the best of all when none survives) with every member's."""
    going = [mid for mid in reports if not reasons[mid]]
    best = ranked(reports, going or list(reports), halving)[0]
    members = {mid: {**report, "stop_reason": reasons[mid]} for mid, report in reports.items()}
    return {**reports[best], "member": best, "members_alive": len(going), MEMBERS_KEY: members}


def report(run: CohortRun, result: dict, since_checkpoint_s: float) -> bool:
    """tune.report, with a checkpoint when loop.due says so (as trainable.report); whether it checkpointed."""
    cfg = run.cohort.cfg
    if not loop.due(cfg, run.epoch, result["balance"] == "diverged", since_checkpoint_s).checkpoint:
        tune.report(result)
        return False
    k, member = run.ids.index(result["member"]), result["member"]
    saved = save(run)
    noise = loop.fixed_noise(run.cohort.cfgs[k], run.cohort.device)
    with tempfile.TemporaryDirectory() as folder:
        cohort_checkpoint.write(saved, folder)
        cohort_checkpoint.write_best_member(run.gan(k), run.epoch, noise,
                                            run.generators[k], run.histories[member], member, folder)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
    return True


def drop_stopped(run: CohortRun) -> None:
    """The members with a stop reason leave the fused model (their compute goes to the survivors)."""
    keep = [k for k, mid in enumerate(run.ids) if mid not in run.stopped]
    if len(keep) == len(run.ids) or not keep:
        run.ids = [run.ids[k] for k in keep]
        return
    remove_members(run.cohort, keep)
    run.generators = [run.generators[k] for k in keep]
    run.kept = [run.kept[k] for k in keep]
    run.ids = [run.ids[k] for k in keep]


def train_epoch(run: CohortRun, images: torch.Tensor, score: scorer.Scorer | None, stopper: GanStopper,
                halving: Halving, trial_dir: Path) -> dict:
    """One epoch of every member still training: trained, scored, judged, files written; the cohort's report."""
    run.epoch += 1
    started = time.perf_counter()
    run.gans.clear()  # last epoch's copies: the weights move now
    records = train_cohort_epoch(run.cohort, images, run.generators)
    reports = member_reports(run, records, run.epoch, time.perf_counter() - started, score)
    reasons = stop_reasons(reports, stopper, halving, run.cohort.cfg.max_epochs)
    for k, mid in enumerate(run.ids):
        run.histories[mid].append(reports[mid])
        write_member_files(run, k, bool(reasons[mid]), trial_dir)
    run.stopped.update({mid: reason for mid, reason in reasons.items() if reason})
    run.last = reports
    return cohort_result(reports, reasons, halving)


def perturb(run: CohortRun, halving: Halving, rng: random.Random) -> None:
    """PBT inside the cohort (cohort_pbt) when its interval is due, on the members still training."""
    if halving.pbt is None or not cohort_pbt.due(halving.pbt, run.epoch) or not run.ids:
        return
    order = {mid: k for k, mid in enumerate(ranked(run.last, run.ids, halving))}
    best_first = sorted(range(len(run.ids)), key=lambda k: order[run.ids[k]])
    for k, donor in cohort_pbt.exploit_and_explore(run.cohort, best_first, halving.pbt, rng).items():
        run.sources[run.ids[k]] = run.ids[donor]
        log.info("member %s copies %s at epoch %d", run.ids[k], run.ids[donor], run.epoch)


def train_cohort(config: dict[str, Any], data: Mnist, halving: Halving, quiet: bool = False) -> None:
    """Ray Tune function trainable: `tune.with_parameters(train_cohort, data=data, halving=..., quiet=...)`."""
    if quiet:
        logging.getLogger(CHECKPOINT_LOGGER).setLevel(logging.WARNING)
    torch.set_num_threads(trial_cpus())
    device = step.resolve_device(trial_config(member_configs(config)[0]).device)
    data = data.to(device)
    trial_id = tune.get_context().get_trial_id()
    run = start_or_restore(config, trial_id, device, tune.get_checkpoint())
    run.context.update(node_id=ray.get_runtime_context().get_node_id(), data_source=data.source)
    score, stopper = scorer.build_scorer(run.cohort.cfg, data, device), GanStopper()
    last_checkpoint, rng = time.monotonic(), random.Random(f"{trial_id}:{run.epoch}")
    while run.ids and run.epoch < run.cohort.cfg.max_epochs:
        result = train_epoch(run, data.images, score, stopper, halving, Path.cwd())  # cwd: the trial folder
        if report(run, result, time.monotonic() - last_checkpoint):
            last_checkpoint = time.monotonic()
        fault_gate(run.epoch)
        drop_stopped(run)
        perturb(run, halving, rng)
