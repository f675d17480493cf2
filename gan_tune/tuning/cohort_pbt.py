"""Population-based training inside a cohort trial (issue 27): exploit and explore between members on the device.

Tune's PopulationBasedTraining exploits by cloning another trial's checkpoint; inside a cohort the population is
the members, so an exploit is `cohort.copy_member` (weights, buffers, the average, Adam's moments: no files)
and explore changes the copy's own settings, as Tune's PBT does (Ray's `_explore`): a continuous value is
redrawn from its distribution with `resample_probability`, else multiplied by 1.2 or 0.8 and kept in its
range; a choice steps to a neighbouring value. Every `perturbation_interval` epochs after `burn_in_period`,
each member in the bottom `quantile_fraction` copies a random member of the top one with the same latent size
(a copy of another latent size would not fit its weights).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch

from gan_tune.training.cohort import Cohort, copy_member

PERTURBATION_FACTORS = (1.2, 0.8)  # Ray Tune's PBT default


@dataclass(frozen=True)
class CohortPbt:
    """The space's pbt settings (spaces.SCHEDULER_SETTINGS["pbt"]); mutations: key -> (distribution, args)."""

    perturbation_interval: int
    burn_in_period: int
    quantile_fraction: float
    resample_probability: float
    mutations: dict[str, tuple[str, list]]


def explore(value: float, kind: str, args: list, pbt: CohortPbt, rng: random.Random) -> float:
    """A new value near `value`: Tune's PBT explore for one key."""
    if kind == "choice":
        index = args.index(value) if value in args else 0
        return args[min(max(index + rng.choice((-1, 1)), 0), len(args) - 1)]
    low, high = float(args[0]), float(args[1])
    if rng.random() < pbt.resample_probability:
        return math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "loguniform" else rng.uniform(low, high)
    return min(max(value * rng.choice(PERTURBATION_FACTORS), low), high)


def set_member(cohort: Cohort, k: int, values: dict[str, float]) -> None:
    """Member k's config and its Adam settings on the device (the optimisers read them every step)."""
    cohort.cfgs[k] = replace(cohort.cfgs[k], **values)
    for key, opt in (("lr_d", cohort.opt_d), ("lr_g", cohort.opt_g)):
        if key in values:
            opt.lr[k] = values[key]
    if "beta1" in values:
        for opt in (cohort.opt_d, cohort.opt_g):
            opt.beta1[k] = values["beta1"]


def due(pbt: CohortPbt, epoch: int) -> bool:
    return epoch > pbt.burn_in_period and epoch % pbt.perturbation_interval == 0


@torch.no_grad()
def exploit_and_explore(cohort: Cohort, ranked: list[int], pbt: CohortPbt, rng: random.Random) -> dict[int, int]:
    """`ranked`: the indices of the members still training, best first. Returns {member: donor} for each copy."""
    share = max(1, math.floor(len(ranked) * pbt.quantile_fraction)) if len(ranked) > 1 else 0
    top, bottom = ranked[:share], ranked[len(ranked) - share:] if share else []
    copies = {}
    for k in bottom:
        donors = [j for j in top if j != k and cohort.cfgs[j].latent_dim == cohort.cfgs[k].latent_dim]
        if not donors:
            continue
        donor = rng.choice(donors)
        copy_member(cohort, donor, k)
        values = {key: explore(getattr(cohort.cfgs[donor], key), kind, args, pbt, rng)
                  for key, (kind, args) in pbt.mutations.items()}
        set_member(cohort, k, values)
        copies[k] = donor
    return copies
