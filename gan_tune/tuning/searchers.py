"""What a search tries, made from a Space: Tune's param space (fixed fields, one domain per searched key, a
seed per trial or per cohort member) and the search algorithm that draws from it (random, grid, optuna)."""

from __future__ import annotations

from typing import Any, Callable

from ray import tune
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher

from gan_tune.training.cohort import MEMBERS_KEY
from gan_tune.tuning.space_values import DISTRIBUTIONS
from gan_tune.tuning.spaces import MAX_SEED, Space


def param_space(space: Space, seed: int) -> dict[str, Any]:
    """Tune's param_space: fixed fields, one domain per searched key, and a per-trial seed.

    Without a seed in the space, random and grid searches draw one per trial from the search
    algorithm's seeded generator (reproducible for a given --seed); optuna gives every trial the
    study seed, so its model of the objective is not fitted to seed noise.
    """
    params: dict[str, Any] = dict(space.train_fields)
    params.update({key: DISTRIBUTIONS[kind](args) for key, (kind, args) in space.search.items()
                   if key not in space.member_keys})
    if "seed" not in params and space.cohort == 1:
        params["seed"] = seed if space.search_alg == "optuna" else tune.randint(0, MAX_SEED)
    if space.cohort > 1:  # Tune's random search resolves the domains inside the list: K independent draws
        params[MEMBERS_KEY] = [member_domains(space) for _ in range(space.cohort)]
    return params


def member_domains(space: Space) -> dict[str, Any]:
    """One cohort member's own draws (new domain objects, so no two members share one); a seed each when the
    space does not fix one."""
    domains = {key: DISTRIBUTIONS[kind](args) for key, (kind, args) in space.search.items() if key in space.member_keys}
    if "seed" not in space.base:
        domains["seed"] = tune.randint(0, MAX_SEED)
    return domains


def make_basic_variant(space: Space, seed: int) -> SearchAlgorithm:
    return BasicVariantGenerator(random_state=seed)


def make_optuna(space: Space, seed: int) -> Searcher:
    from ray.tune.search.optuna import OptunaSearch  # late: optuna is an optional extra

    return OptunaSearch(seed=seed)


SEARCH_ALGS: dict[str, Callable[[Space, int], SearchAlgorithm | Searcher]] = {
    "random": make_basic_variant, "grid": make_basic_variant, "optuna": make_optuna,
}


def make_search_alg(space: Space, seed: int) -> SearchAlgorithm | Searcher:
    return SEARCH_ALGS[space.search_alg](space, seed)
