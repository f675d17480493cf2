"""Ray Tune schedulers made from a Space: which trials to stop, pause or perturb, and a cohort trial's halving
rungs and PBT plan. What the trials try (param space, search algorithm) is in searchers."""

from __future__ import annotations

from typing import Callable

from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    PopulationBasedTraining,
    TrialScheduler,
)

from gan_tune.tuning.cohort_pbt import CohortPbt
from gan_tune.tuning.space_values import DISTRIBUTIONS
from gan_tune.tuning.spaces import TIME_ATTR, Space


def cohort_rungs(space: Space) -> tuple[int, ...]:
    """The epochs at which a cohort halves its members: ASHA's rungs (grace_period x reduction_factor^i), or
    HyperBand's most aggressive bracket's (1, rf, rf^2, ...); none under FIFO."""
    s = space.scheduler
    if s["type"] not in ("asha", "hyperband"):
        return ()
    rung, rungs = s.get("grace_period", 1), []
    while rung < space.max_epochs:
        rungs.append(rung)
        rung *= s["reduction_factor"]
    return tuple(rungs)


def make_asha(space: Space) -> TrialScheduler:
    s = space.scheduler
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=space.max_epochs, grace_period=s["grace_period"],
                         reduction_factor=s["reduction_factor"], brackets=s["brackets"])


def make_hyperband(space: Space) -> TrialScheduler:
    return HyperBandScheduler(time_attr=TIME_ATTR, max_t=space.max_epochs,
                              reduction_factor=space.scheduler["reduction_factor"])


def make_pbt(space: Space) -> TrialScheduler:
    s = space.scheduler
    # choice becomes a plain list: PBT then steps to a neighbouring value instead of scaling a number
    mutations = {key: args if kind == "choice" else DISTRIBUTIONS[kind](args)
                 for key, (kind, args) in s["hyperparam_mutations"].items()}
    return PopulationBasedTraining(
        time_attr=TIME_ATTR, perturbation_interval=s["perturbation_interval"], burn_in_period=s["burn_in_period"],
        hyperparam_mutations=mutations, quantile_fraction=s["quantile_fraction"],
        resample_probability=s["resample_probability"])


def make_fifo(space: Space) -> TrialScheduler:
    return FIFOScheduler()


SCHEDULERS: dict[str, Callable[[Space], TrialScheduler]] = {
    "asha": make_asha, "hyperband": make_hyperband, "pbt": make_pbt, "fifo": make_fifo,
}


def make_scheduler(space: Space) -> TrialScheduler:
    """The space's scheduler; PBT over cohorts runs inside each cohort trial (cohort_pbt), Tune's is FIFO."""
    if space.cohort > 1 and space.scheduler["type"] == "pbt":
        return FIFOScheduler()
    return SCHEDULERS[space.scheduler["type"]](space)


def cohort_pbt_plan(space: Space) -> CohortPbt | None:
    """A pbt space's settings for PBT between the members of each cohort trial; None for other schedulers."""
    s = space.scheduler
    if s["type"] != "pbt":
        return None
    return CohortPbt(s["perturbation_interval"], s["burn_in_period"], s["quantile_fraction"],
                     s["resample_probability"], dict(s["hyperparam_mutations"]))


def describe_scheduler(space: Space) -> str:
    settings = {k: v for k, v in space.scheduler.items() if k not in ("type", "hyperparam_mutations")}
    mutated = space.scheduler.get("hyperparam_mutations")
    if mutated:
        settings["mutates"] = "+".join(mutated)
    return f"{space.scheduler['type']}({', '.join(f'{k}={v}' for k, v in settings.items())})"
