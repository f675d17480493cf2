"""GAN-aware stopping: end one trial (never the study) whose run has failed in a way more epochs won't fix.

Reasons, checked on every report, first match wins:
- "diverged": a loss is NaN/inf, or loop.diagnose_balance called the epoch diverged;
- "D dominates": D accuracy above D_DOMINATES_ACC for D_DOMINATES_EPOCHS reports in a row, so G's
  gradients vanish;
- "mode collapse": the samples cover at most COLLAPSE_MAX_CLASSES digit classes after
  COLLAPSE_AFTER_EPOCH epochs.

`GanStopper.reasons[trial_id]` keeps why, for the search summary and the tracker's tags.

`FailingTrials` is the one study-wide stop: trials that all raise before anything reported.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import cloudpickle
from ray.exceptions import RayActorError
from ray.tune import Callback, Stopper

D_DOMINATES_ACC = 0.95
D_DOMINATES_EPOCHS = 3
COLLAPSE_MAX_CLASSES = 2
COLLAPSE_AFTER_EPOCH = 3  # early samples are blobs the classifier files under one or two classes
FAIL_FAST_TRIALS = 2  # trials raising before any report that end the study (fewer if the study has fewer)


def diverged(result: dict[str, Any]) -> bool:
    losses_finite = all(math.isfinite(result[key]) for key in ("loss_d", "loss_g"))
    return result["balance"] == "diverged" or not losses_finite


def collapsed(result: dict[str, Any]) -> bool:
    """Coverage is the number of classes the samples cover (0..10); absent when scoring is off."""
    return (result["epoch"] > COLLAPSE_AFTER_EPOCH and "coverage" in result
            and result["coverage"] <= COLLAPSE_MAX_CLASSES)


class GanStopper(Stopper):
    """A Tune Stopper that stops single trials for GAN failure modes and records why.

    max_epochs: a trial's last report ends it here, with no reason recorded (it completed). Without this,
    HyperBand answers the last report of a bracket's first finisher with PAUSE; when the bracket's other
    trial finishes while that pause is still saving, Ray's bracket clean-up (which stops PAUSED trials only)
    misses it and the paused trial holds the search until its time budget (seen in CI: 28 idle minutes).
    A trial Tune stops itself is removed from its bracket instead, and nothing is left paused.
    """

    def __init__(self, max_epochs: int | None = None) -> None:
        self.max_epochs = max_epochs
        self.reasons: dict[str, str] = {}
        self.d_streak: dict[str, int] = {}  # consecutive reports with d_acc > D_DOMINATES_ACC

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        reason = self.reason(trial_id, result)
        if reason:
            self.reasons[trial_id] = reason
        return reason is not None or (self.max_epochs is not None and result["epoch"] >= self.max_epochs)

    def reason(self, trial_id: str, result: dict[str, Any]) -> str | None:
        dominant = result["d_acc"] > D_DOMINATES_ACC  # False for NaN
        self.d_streak[trial_id] = self.d_streak.get(trial_id, 0) + 1 if dominant else 0
        if diverged(result):
            return "diverged"
        if self.d_streak[trial_id] >= D_DOMINATES_EPOCHS:
            return "D dominates"
        if collapsed(result):
            return "mode collapse"
        return None

    def stop_all(self) -> bool:
        return False  # one failed trial says nothing about the others


class FailingTrials(Callback, Stopper):
    """Ends the study when its first trials raise before any trial has reported: a bad space or a bug that
    every retry of every trial would repeat (FailureConfig's retries would take minutes to say so).

    A worker that died (RayActorError: killed, out of memory) is not counted, as Tune's restart from the
    last checkpoint is the cure there. `errors` keeps each failed trial's exception as one line.
    """

    def __init__(self, num_samples: int | None):
        self.needed = min(FAIL_FAST_TRIALS, num_samples or FAIL_FAST_TRIALS)  # None: trials until the budget
        self.errors: dict[str, str] = {}  # trial_id -> "ValueError: ..."
        self.reported = False

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.reported = True

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial)

    def record(self, trial: Any) -> None:
        err = trial_exception(trial)
        if err is not None and not isinstance(err, RayActorError):
            cause = getattr(err, "cause", None) or err  # a RayTaskError wraps what the trainable raised
            text = str(cause).strip()
            self.errors[trial.trial_id] = f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"

    @property
    def space_fails(self) -> bool:
        return not self.reported and len(self.errors) >= self.needed

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.space_fails

    def summary(self) -> list[str]:
        """One line per distinct error, with how many trials raised it."""
        return [f"{count} trial{'s' * (count > 1)} raised before any report: {error}"
                for error, count in Counter(self.errors.values()).most_common()]


def trial_exception(trial: Any) -> BaseException | None:
    """The trial's last error as Tune pickled it beside the trial (read locally: the storage copy syncs later)."""
    path = trial.pickled_error_file
    if not path or not Path(path).is_file():
        return None
    with open(path, "rb") as src:
        return cloudpickle.load(src)
