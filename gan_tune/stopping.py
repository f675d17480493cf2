"""GAN-aware stopping: end one trial (never the study) whose run has failed in a way more epochs won't fix.

Reasons, checked on every report, first match wins:
- "diverged": a loss is NaN/inf, or train.diagnose_balance called the epoch diverged;
- "D dominates": D accuracy above D_DOMINATES_ACC for D_DOMINATES_EPOCHS reports in a row, so G's
  gradients vanish;
- "mode collapse": the samples cover at most COLLAPSE_MAX_CLASSES digit classes after
  COLLAPSE_AFTER_EPOCH epochs.

`GanStopper.reasons[trial_id]` keeps why, for the search summary and the tracker's tags.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Stopper

D_DOMINATES_ACC = 0.95
D_DOMINATES_EPOCHS = 3
COLLAPSE_MAX_CLASSES = 2
COLLAPSE_AFTER_EPOCH = 3  # early samples are blobs the classifier files under one or two classes


def diverged(result: dict[str, Any]) -> bool:
    losses_finite = all(math.isfinite(result[key]) for key in ("loss_d", "loss_g"))
    return result["balance"] == "diverged" or not losses_finite


def collapsed(result: dict[str, Any]) -> bool:
    """Coverage is the number of classes the samples cover (0..10); absent when scoring is off."""
    return (result["epoch"] > COLLAPSE_AFTER_EPOCH and "coverage" in result
            and result["coverage"] <= COLLAPSE_MAX_CLASSES)


class GanStopper(Stopper):
    """A Tune Stopper that stops single trials for GAN failure modes and records why."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.d_streak: dict[str, int] = {}  # consecutive reports with d_acc > D_DOMINATES_ACC

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        reason = self.reason(trial_id, result)
        if reason:
            self.reasons[trial_id] = reason
        return reason is not None

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
