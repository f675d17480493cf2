"""What a finished search prints: the summary, the finalists, the best trial, how to resume."""

from __future__ import annotations

import math
import shlex
from typing import Any

from ray import tune
from ray.tune.result import TRAINING_ITERATION

from gan_tune.training.config import resolve_derived
from gan_tune.tuning import console, space_values
from gan_tune.tuning.finalists import Finalist
from gan_tune.tuning.space_values import BOUNDED
from gan_tune.tuning.spaces import Space
from gan_tune.tuning.stopping import GanStopper
from gan_tune.tuning.study_storage import study_mib

EDGE_SHARE = 0.10  # a best value in the outer 10 % of its searched range (on its scale) suggests a wider range


def edge_warnings(space: Space, config: dict[str, Any]) -> list[str]:
    """One line per searched range whose best value sits in its outer EDGE_SHARE (the tuning playbook's check).

    Measured on the range's own scale: log for loguniform, linear for uniform and randint; choices and grids
    have no inside to widen towards and are left out."""
    lines = []
    for key, (kind, args) in space.search.items():
        if kind not in BOUNDED or key not in config:
            continue
        low, high, value = float(args[0]), float(args[1]), float(config[key])
        scale = math.log if kind == "loguniform" else float
        share = (scale(value) - scale(low)) / (scale(high) - scale(low))
        if share <= EDGE_SHARE or share >= 1 - EDGE_SHARE:
            side = "low" if share <= EDGE_SHARE else "high"
            lines.append(f"{key} {value:.4g} is at the {side} edge of its range [{low:g}, {high:g}]: "
                         f"widen search.{key} past it in {space.where}")
    return lines


SUMMARY_METRICS = ("fid", "is", "coverage", "d_acc", "loss_d", "loss_g", "balance", "epoch")


def score_text(best: Finalist, metric: str) -> str:
    """"fid 9.8 on 10000 samples (12.3 on 1000 when reported)", or the reported score alone."""
    reported = f"{best.reported[metric]:.4g}"
    if not best.scores:
        return f"{metric} {reported}"
    return (f"{metric} {best.scores[metric]:.4g} on {best.scores['fid_samples']} samples "
            f"({reported} on {best.reported.get('fid_samples', '?')} when reported)")


def time_to(timestamp: float, started: float) -> str:
    """How long after `started` (this session's fit) a report with Tune's `timestamp` arrived: time to quality."""
    if timestamp < int(started):  # Tune's timestamp has whole seconds
        return "reported before this session resumed the study"
    minutes, seconds = divmod(round(timestamp - started), 60)
    return f"reported {minutes} min {seconds:02d} s into the search"


def summarise(results: tune.ResultGrid, space: Space, stopper: GanStopper, location: str,
              started: float, ended: float) -> None:
    """Print the trials' outcomes, the budget used and the stopped trials."""
    ran = sum(1 for result in results if TRAINING_ITERATION in result.metrics or result.error)
    queued = f" ({len(results) - ran} more never reported: queued, or cut by the budget)" if ran < len(results) else ""
    print(f"\n{ran} trials{queued}, {results.num_errors} errored; results in {location} "
          f"({study_mib(location):.1f} MiB written)")
    print(f"budget: {budget_line(space, ran, ended - started)}")
    for trial_id, reason in sorted(stopper.reasons.items()):
        print(f"  stopped {trial_id}: {reason}")
    diverged = sum(reason == "diverged" for reason in stopper.reasons.values())
    if diverged:
        print(f"  {diverged} of {len(results)} trials diverged (many: shrink the space's learning-rate range)")


def budget_line(space: Space, trials: int, used_s: float) -> str:
    """How much of the time budget the search used, and why it ended."""
    used = space_values.format_duration(used_s)
    if not space.time_budget_s:
        return f"{used} (no time budget)"
    share = f"{used} of {space_values.format_duration(space.time_budget_s)} ({used_s / space.time_budget_s:.0%})"
    if space.num_samples is not None and trials >= space.num_samples and used_s < space.time_budget_s:
        return f"{share}: all {space.num_samples} trial{'s' * (space.num_samples != 1)} (num_samples) ended first"
    return f"{share}, {trials} trial{'s' * (trials != 1)} ran"


def print_finalists(rescored: list[Finalist], space: Space, seconds: float) -> None:
    """The re-scored checkpoints, best first: the few-sample score they were reported with and the new one."""
    if not rescored:
        return
    metric, samples = space.metric, space.finalists["samples"]
    trials = len({f.trial_id for f in rescored})
    print(f"finalists: {len(rescored)} kept checkpoints of the top {trials} trials scored again on {samples} "
          f"samples ({seconds:.0f} s)")
    before = rescored[0].reported.get("fid_samples", "?")
    print(f"  {'trial':<14} {'epoch':>5} {f'{metric} ({before})':>14} {f'{metric} ({samples})':>14} {'coverage':>8}")
    for f in rescored:
        print(f"  {f.trial_id:<14} {f.epoch:>5} {f.reported[metric]:>14.4g} {f.scores[metric]:>14.4g} "
              f"{f.scores['coverage']:>8.0f}")


def print_best(best: Finalist, space: Space, started: float) -> None:
    print(f"best trial {best.trial_id}: {score_text(best, space.metric)} at epoch {best.epoch}, "
          f"{time_to(best.reported.get('timestamp', 0), started)}")
    shown = {key: best.searched[key] for key in (*space.search, "seed") if key in best.searched}
    print(f"  config:  {console.format_values({**shown, **resolve_derived(shown)})}")
    for line in edge_warnings(space, best.searched):
        print(f"  warning: {line}")
    print(f"  metrics: {console.format_values({k: best.reported[k] for k in SUMMARY_METRICS if k in best.reported})}")
    print(f"  folder:  {best.result.path}")


def print_resume_hint(results: tune.ResultGrid, outcomes: dict[str, str], space: Space, location: str) -> None:
    """After Ctrl-C (Tune stops gracefully and saves its state) or a spent time budget: how to go on.

    `outcomes` is the tracking callback's trial id -> stop reason; 'search ended' marks a trial the
    search stopped, and trials that never started have no entry. A space that trains until its budget
    (no num_samples, or a PBT population without max_epochs) always ends with trials cut off: that is the
    plan, not a failure, and the line says so."""
    cut = sum(reason == "search ended" for reason in outcomes.values())
    # drawn but never started: no report and no outcome (a resumed study's trials that ended in an earlier
    # session reported, though this session has no outcome for them)
    queued = sum(1 for result in results
                 if TRAINING_ITERATION not in result.metrics and result.metrics.get("trial_id") not in outcomes)
    if cut + queued <= 0:
        return
    command = f"python -m gan_tune.search --resume {shlex.quote(location)}"  # a URI query has ? and &
    if space.num_samples is None or space.epochs_until_budget:
        never = f" and {queued} never started" if queued else ""
        print(f"{cut} of {len(results)} trials were still training{never} when the search ended (this space "
              f"trains until its time budget); to train them on:\n  {command}", flush=True)
    else:
        print(f"{cut + queued} of {len(results)} trials did not finish (Ctrl-C or the time budget); "
              f"continue them with:\n  {command}", flush=True)
