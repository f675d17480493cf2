"""The search's last step: its top trials' kept checkpoints scored again with many samples, best first.

During the search a trial is scored on few samples (1,000 on a CPU), and FID at 1,000 samples moves by
several points between neighbouring epochs: the best report is partly the luckiest one. So, once Tune is
done, the driver scores every kept checkpoint (each trial's best by the metric; its latest under PBT) of
the space's `finalists.trials` best trials with `finalists.samples` samples (10,000, the customary FID
count) on the same fixed latents, and the search keeps the generator that is best by that score.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
from ray import tune

from gan_tune.quality.measures import METRICS
from gan_tune.quality.scorer import make_scorer
from gan_tune.tracking.parent_run import finite, kept_checkpoints
from gan_tune.training import checkpoint
from gan_tune.training.data import DataError, Mnist


@dataclass(frozen=True)
class Finalist:
    """One kept checkpoint of a top trial and its scores."""

    result: tune.Result  # the trial's result (its folder, last metrics, config)
    checkpoint: tune.Checkpoint
    reported: dict[str, Any]  # the report the checkpoint was saved with (its few-sample scores)
    scores: dict[str, float]  # every metric on `scores["fid_samples"]` samples
    config: dict[str, Any]  # the TrainConfig the checkpoint was trained with (PBT changes it mid-trial)

    @property
    def searched(self) -> dict[str, Any]:
        """The values the search chose, as the checkpoint was trained with them (derived keys included)."""
        return {**(self.result.config or {}), **self.config}

    @property
    def trial_id(self) -> str:
        """The trial, or for a cohort trial the member the checkpoint holds (cohort_trainable reports it)."""
        return str(self.reported.get("member") or self.reported.get("trial_id", ""))

    @property
    def epoch(self) -> int:
        return int(self.reported["epoch"])


def candidates(results: tune.ResultGrid, metric: str, mode: str, trials: int
               ) -> list[tuple[tune.Result, tune.Checkpoint, dict]]:
    """Every kept, scored checkpoint of the `trials` trials whose best kept checkpoint scores best."""
    sign = 1 if mode == "min" else -1
    ranked = []
    for result in results:
        kept = kept_checkpoints(result, metric)  # an errored trial's kept checkpoints count too
        if kept:
            ranked.append((min(sign * reported[metric] for _, reported in kept), result, kept))
    ranked.sort(key=lambda entry: entry[0])
    return [(result, ckpt, reported) for _, result, kept in ranked[:trials] for ckpt, reported in kept]


def rescore(results: tune.ResultGrid, metric: str, mode: str, data: Mnist, trials: int, samples: int,
            device: torch.device | str = "cpu") -> list[Finalist]:
    """The candidates scored on `samples` samples, best first by `metric`; [] when the metric is not a sample
    score (d_acc, losses) or no trial kept a scored checkpoint. An unreadable checkpoint is skipped, with a line."""
    if metric not in METRICS or trials < 1:
        return []
    found = candidates(results, metric, mode, trials)
    if not found:
        return []
    score = make_scorer(data, torch.device(device), samples)
    finalists = []
    for result, ckpt, reported in found:
        try:
            with ckpt.as_directory() as folder:
                g, cfg, _ = checkpoint.load_generator(folder)
        except DataError as err:
            print(f"finalists: skipped a checkpoint of trial {reported.get('trial_id')}: {err}", file=sys.stderr)
            continue
        scores = score(g.to(device), cfg.latent_dim)
        finalists.append(Finalist(result, ckpt, reported, scores, cfg.to_dict()))
    sign = 1 if mode == "min" else -1
    return sorted(finalists, key=lambda f: sign * f.scores[metric] if finite(f.scores[metric]) else math.inf)
