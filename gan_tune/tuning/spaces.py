"""search_spaces/*.yaml -> a validated Space -> Tune's param_space, scheduler and search algorithm.

Every error in a space file is a ConfigError naming the file and the key
("search_spaces/x.yaml: search.lr_d: low 0.001 > high 1e-05"), raised by `load_space` before Ray starts.
The `cpu:` block is a partial space merged over the file when the cluster has no GPU; it is validated
at load time too, so a GPU machine still catches its mistakes. search_spaces/README.md documents the format.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gan_tune.quality.measures import OBJECTIVES
from gan_tune.training.cohort import FUSED_FIELDS
from gan_tune.training.config import (
    DERIVED_PARAMS,
    FIELD_TYPES,
    ConfigError,
    TrainConfig,
    coerce,
    from_dict,
    read_yaml,
)
from gan_tune.tuning.space_values import (
    check_int,
    check_name,
    check_number,
    check_open_int,
    parse_distribution,
    parse_duration,
    prefixed,
)

TOP_LEVEL = ("description", "base", "search", "metric", "mode", "num_samples", "max_epochs", "search_alg",
             "scheduler", "resources", "time_budget", "finalists", "cohort", "cpu")
REQUIRED = ("metric", "mode", "search_alg", "scheduler")
# A space with a time_budget may leave these out: trials start (num_samples), or a PBT population trains
# (max_epochs), until the budget ends. The trainable still needs a number, so such trials get this ceiling.
UNTIL_BUDGET_EPOCHS = 100_000
RESUMING_SCHEDULERS = ("pbt", "hyperband")  # resume trials from their last checkpoint, rank them from epoch 1
# Loaded once by the driver and shared by all trials, or chosen by Ray: a study cannot search these.
FIXED_FIELDS = ("data_source", "data_dir", "subset", "device", "max_epochs", "out_dir", "name")
PBT_MUTABLE = ("lr_d", "lr_g", "beta1")  # values that keep weight shapes, so a checkpoint still loads
# Bounded above ([0, 1)): PBT multiplies a continuous value by 1.2 again and again, a choice steps between values.
PBT_CHOICE_ONLY = ("beta1",)
# the searchers tuning.searchers makes (SEARCH_ALGS); this module checks names only
SEARCH_ALG_NAMES = ("random", "grid", "optuna")
TIME_ATTR = "training_iteration"  # one report per epoch, restored with the checkpoint
MAX_SEED = 2**31 - 1
DEFAULT_RESOURCES = {"cpu": 1, "gpu": 0}
# After the search, the kept checkpoints of the best `trials` trials are scored again on `samples` samples
# (finalists.py): FID at 1,000 samples moves by several points between neighbouring epochs. trials 0: off.
DEFAULT_FINALISTS = {"trials": 3, "samples": 10_000}
MAX_COHORT = 256  # members of one fused model; far past what fits a GPU at width 1
# A cohort (issue 27) needs independent random draws per member: optuna and grid suggest one configuration per trial.
COHORT_SEARCH_ALGS = ("random",)

# Settings each scheduler accepts, with their defaults (None: required).
SCHEDULER_SETTINGS: dict[str, dict[str, Any]] = {
    "asha": {"grace_period": 1, "reduction_factor": 3, "brackets": 1},
    "hyperband": {"reduction_factor": 3},
    "pbt": {"perturbation_interval": None, "hyperparam_mutations": None, "burn_in_period": 0,
            "quantile_fraction": 0.25, "resample_probability": 0.25},
    "fifo": {},
}


@dataclass(frozen=True)
class Space:
    """One parsed, validated search-space file. `raw` is the mapping it was parsed from."""

    name: str
    where: str
    description: str
    base: dict[str, Any]
    search: dict[str, tuple[str, list]]  # key -> (distribution, arguments)
    metric: str
    mode: str
    num_samples: int | None  # an upper bound on trials; None: until the time budget ends
    max_epochs: int  # UNTIL_BUDGET_EPOCHS when epochs_until_budget
    search_alg: str
    scheduler: dict[str, Any]  # "type" plus every setting of that type, defaults filled in
    resources: dict[str, float]
    time_budget_s: float | None
    raw: dict[str, Any]
    epochs_until_budget: bool = False  # a PBT population without max_epochs: it trains until the budget
    finalists: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_FINALISTS))
    cohort: int = 1  # configurations per trial, trained as one fused model (1: ordinary trials)

    @property
    def tune_num_samples(self) -> int:
        """TuneConfig.num_samples: -1 is Tune's "keep sampling until a stop condition" (here the time budget).
        num_samples counts configurations: with cohorts, Tune runs enough trials of `cohort` members for them."""
        return -1 if self.num_samples is None else math.ceil(self.num_samples / self.cohort)

    @property
    def member_keys(self) -> list[str]:
        """The searched keys drawn per cohort member (those that fuse, or a derived param that sets one); the
        others are drawn once per trial and shared by its members."""
        target = {key: DERIVED_PARAMS[key].target if key in DERIVED_PARAMS else key for key in self.search}
        return [key for key in self.search if self.cohort > 1 and target[key] in FUSED_FIELDS]

    @property
    def train_fields(self) -> dict[str, Any]:
        """The fixed TrainConfig values every trial shares (base plus max_epochs)."""
        return {**self.base, "max_epochs": self.max_epochs}


def load_space(path: str | Path) -> Space:
    """Read and validate a space file, its `cpu:` variant included."""
    raw = read_yaml(path)
    if not raw:  # read_yaml gives {} for an empty file: say so, not "metric: missing"
        raise ConfigError("top level", f"empty file (a space needs {', '.join(REQUIRED)})", where=str(path))
    space = parse_space(raw, where=str(path), name=Path(path).stem)
    for_cpu(space)  # validate the cpu block now, whatever the cluster turns out to be
    return space


def for_cpu(space: Space) -> Space:
    """The space with its `cpu:` block merged in: dict blocks key by key, other values replaced."""
    overrides = space.raw.get("cpu") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("cpu", "expected a mapping of top-level keys", where=space.where)
    if not overrides:
        return space
    for key in overrides:
        if key not in TOP_LEVEL or key in ("cpu", "description"):
            raise ConfigError(f"cpu.{key}", "not a key the cpu block can override", where=space.where)
    merged = {key: value for key, value in space.raw.items() if key != "cpu"}
    for key, value in overrides.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_dicts else value
    return parse_space(merged, where=f"{space.where} (cpu block applied)", name=space.name)


def with_values(space: Space, values: dict[str, Any], where: str) -> Space:
    """The space with top-level values replaced (command-line flags), validated again: an error names `where`,
    the result still names the space's file (the summary's "widen search.lr_d in FILE")."""
    return replace(parse_space({**space.raw, **values}, where=where, name=space.name), where=space.where)


def parse_space(raw: dict[str, Any], where: str, name: str) -> Space:
    check_top_level(raw, where)
    budget = raw.get("time_budget")
    time_budget_s = None if budget is None else parse_duration(budget, "time_budget", where)
    num_samples = check_open_int(raw, "num_samples", time_budget_s, where)
    max_epochs = check_open_int(raw, "max_epochs", time_budget_s, where)
    epochs_until_budget = max_epochs is None
    max_epochs = UNTIL_BUDGET_EPOCHS if epochs_until_budget else max_epochs
    base = parse_base(raw.get("base") or {}, max_epochs, where)
    fixed = from_dict({**base, "max_epochs": max_epochs})  # what every trial shares, defaults included
    search = parse_search(raw.get("search") or {}, base, where)
    metric, mode = check_metric(raw["metric"], raw["mode"], fixed, where)
    search_alg = check_search_alg(raw["search_alg"], search, where)
    scheduler = parse_scheduler(raw["scheduler"], fixed, search_alg, where)
    if epochs_until_budget and scheduler["type"] != "pbt":
        raise ConfigError("max_epochs", f"missing: only a pbt population may train until the time budget "
                          f"({scheduler['type']} needs an epoch limit)", where=where)
    if scheduler["type"] in RESUMING_SCHEDULERS:
        check_resuming(fixed, scheduler["type"], where)
    resources = parse_resources(raw.get("resources") or {}, where)
    description = str(raw.get("description") or "").strip()
    finalists = parse_finalists(raw.get("finalists") or {}, where)
    cohort = parse_cohort(raw.get("cohort", 1), search_alg, scheduler["type"], where)
    return Space(name, where, description, base, search, metric, mode, num_samples, max_epochs, search_alg,
                 scheduler, resources, time_budget_s, raw, epochs_until_budget, finalists, cohort)


def parse_cohort(raw: Any, search_alg: str, scheduler: str, where: str) -> int:
    cohort = check_int(raw, "cohort", where, low=1, high=MAX_COHORT)
    if cohort > 1 and search_alg not in COHORT_SEARCH_ALGS:
        raise ConfigError("cohort", f"{cohort} needs search_alg {' or '.join(COHORT_SEARCH_ALGS)} (each member is "
                                    f"an independent draw; {search_alg} suggests one configuration per trial)", where=where)
    return cohort


def check_top_level(raw: dict[str, Any], where: str) -> None:
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(str(key), f"unknown top-level key (known: {', '.join(TOP_LEVEL)})", where=where)
    for key in REQUIRED:
        if key not in raw:
            raise ConfigError(key, "missing (required)", where=where)


def parse_base(base: Any, max_epochs: int, where: str) -> dict[str, Any]:
    """Fixed TrainConfig values; the whole config is built once so every field is checked."""
    if not isinstance(base, dict):
        raise ConfigError("base", "expected a mapping of TrainConfig fields", where=where)
    if "max_epochs" in base:
        raise ConfigError("base.max_epochs", "set max_epochs at the top level", where=where)
    values = {}
    for key, value in base.items():
        values[key] = prefixed(lambda: coerce(key, value), "base", where)
    prefixed(lambda: from_dict({**values, "max_epochs": max_epochs}), "base", where)
    return values


def parse_search(search: Any, base: dict[str, Any], where: str) -> dict[str, tuple[str, list]]:
    if not isinstance(search, dict):
        raise ConfigError("search", "expected a mapping of field: {distribution: arguments}", where=where)
    parsed = {}
    for key, spec in search.items():
        if key not in FIELD_TYPES and key not in DERIVED_PARAMS:
            known = ", ".join([*FIELD_TYPES, *DERIVED_PARAMS])
            raise ConfigError(f"search.{key}", f"not a TrainConfig field or derived param (known: {known})",
                              where=where)
        if key in FIXED_FIELDS or key in base:
            why = "is also set in base" if key in base else "is fixed for a whole study"
            raise ConfigError(f"search.{key}", f"cannot be searched: {key} {why}", where=where)
        parsed[key] = parse_distribution(spec, key, f"search.{key}", base, where, searched=set(search))
    check_derived(parsed, base, where)
    check_pairs(parsed, base, where)
    return parsed


def check_pairs(search: dict[str, tuple[str, list]], base: dict[str, Any], where: str) -> None:
    """Every pair of values two searched choices can draw together must make a valid config: loss wgan-gp with
    d_norm batch would fail in the trial that drew it, not here."""
    listed = [(key, args) for key, (kind, args) in search.items() if kind in ("choice", "grid") and key in FIELD_TYPES]
    for i, (key_a, values_a) in enumerate(listed):
        for key_b, values_b in listed[i + 1:]:
            for a, b in itertools.product(values_a, values_b):
                try:
                    from_dict({**base, key_a: a, key_b: b})
                except ConfigError as err:
                    raise ConfigError(f"search.{key_b}", f"{key_a} {a!r} with {key_b} {b!r}: {err.key} {err.msg}",
                                      where=where) from None


def check_derived(search: dict[str, tuple[str, list]], base: dict[str, Any], where: str) -> None:
    """A derived param sets its target field, which nothing else may set; its inputs must be given."""
    for name in search.keys() & DERIVED_PARAMS.keys():
        derived = DERIVED_PARAMS[name]
        if derived.target in search or derived.target in base:
            raise ConfigError(f"search.{name}", f"sets {derived.target}, which the space also sets", where=where)
        for needed in derived.inputs:
            if needed not in search and needed not in base:
                raise ConfigError(f"search.{name}", f"needs {needed} in search or base", where=where)


def check_metric(metric: Any, mode: Any, fixed: TrainConfig, where: str) -> tuple[str, str]:
    if not isinstance(metric, str) or metric not in OBJECTIVES:
        raise ConfigError("metric", f"{metric!r} is not a quality score a study can optimise "
                                    f"(objectives: {', '.join(OBJECTIVES)})", where=where)
    if mode != OBJECTIVES[metric]:
        better = "lower" if OBJECTIVES[metric] == "min" else "higher"
        raise ConfigError("mode", f"{mode!r}: {metric} is better {better}, use mode: {OBJECTIVES[metric]}", where=where)
    if fixed.eval_every == 0:
        raise ConfigError("base.eval_every", f"0 never scores, so {metric} is never reported", where=where)
    return metric, mode


def check_search_alg(name: Any, search: dict[str, tuple[str, list]], where: str) -> str:
    check_name(name, SEARCH_ALG_NAMES, "search_alg", "search algorithm", where)
    for key, (kind, _) in search.items():
        if name == "grid" and kind != "grid":
            raise ConfigError(f"search.{key}", f"search_alg grid takes only grid entries, got {kind}", where=where)
        if name == "optuna" and kind == "grid":
            raise ConfigError(f"search.{key}", "search_alg optuna cannot take grid entries", where=where)
    if name == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("search_alg", "optuna is not installed: pip install 'gan_tune[optuna]'", where=where)
    return name


def parse_scheduler(raw: Any, fixed: TrainConfig, search_alg: str, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or "type" not in raw:
        raise ConfigError("scheduler", f"expected a mapping with type: ({', '.join(SCHEDULER_CHECKS)})", where=where)
    kind = check_name(raw["type"], SCHEDULER_CHECKS, "scheduler.type", "scheduler", where)
    defaults = SCHEDULER_SETTINGS[kind]
    for key in raw:
        if key != "type" and key not in defaults:
            known = ", ".join(defaults) or "none"
            raise ConfigError(f"scheduler.{key}", f"not a setting of {kind} (settings: {known})", where=where)
    settings = {"type": kind, **defaults, **{k: v for k, v in raw.items() if k != "type"}}
    for key, value in settings.items():
        if value is None:
            raise ConfigError(f"scheduler.{key}", f"required by {kind}", where=where)
    return SCHEDULER_CHECKS[kind](settings, fixed, search_alg, where)


def check_asha(settings: dict, fixed: TrainConfig, search_alg: str, where: str) -> dict:
    check_int(settings["grace_period"], "scheduler.grace_period", where, low=1)
    check_int(settings["brackets"], "scheduler.brackets", where, low=1)
    check_reduction_factor(settings, where)
    if settings["grace_period"] > fixed.max_epochs:
        raise ConfigError("scheduler.grace_period", f"{settings['grace_period']} > max_epochs {fixed.max_epochs}",
                          where=where)
    if settings["grace_period"] < fixed.eval_every:  # ASHA passes a trial that has no score yet
        raise ConfigError("scheduler.grace_period", f"below eval_every {fixed.eval_every}: the first rung "
                          "would judge trials before their first score", where=where)
    return settings


def check_hyperband(settings: dict, fixed: TrainConfig, search_alg: str, where: str) -> dict:
    check_reduction_factor(settings, where)
    if fixed.checkpoint_every != 1:  # HyperBand pauses trials at any epoch and resumes them from a checkpoint
        raise ConfigError("base.checkpoint_every", "hyperband resumes paused trials from checkpoints: use 1",
                          where=where)
    return settings


def check_resuming(fixed: TrainConfig, scheduler: str, where: str) -> None:
    """PBT and HyperBand restart a trial from its last checkpoint, so one taken by the clock would lose epochs,
    and rank trials by a score from their first epoch on (PBT raises on a report without the metric; HyperBand's
    smallest bracket judges after one epoch)."""
    if fixed.checkpoint_every_s:
        raise ConfigError("base.checkpoint_every_s", f"must be 0 with scheduler {scheduler}: it resumes trials "
                          "from their last checkpoint, so they checkpoint every checkpoint_every epochs", where=where)
    if fixed.eval_every != 1:
        raise ConfigError("base.eval_every", f"{scheduler} needs a score on every report: use 1", where=where)


def check_fifo(settings: dict, fixed: TrainConfig, search_alg: str, where: str) -> dict:
    return settings


def check_reduction_factor(settings: dict, where: str) -> None:
    if check_number(settings["reduction_factor"], "scheduler.reduction_factor", where) <= 1:
        raise ConfigError("scheduler.reduction_factor", "must be > 1", where=where)


def check_pbt(settings: dict, fixed: TrainConfig, search_alg: str, where: str) -> dict:
    interval = check_int(settings["perturbation_interval"], "scheduler.perturbation_interval", where, low=1)
    if interval % fixed.checkpoint_every:  # PBT clones the checkpoint reported at the perturbation epoch
        raise ConfigError("scheduler.perturbation_interval", "must be a multiple of base.checkpoint_every",
                          where=where)
    if search_alg == "optuna":
        raise ConfigError("search_alg", "pbt samples its own population: use random or grid", where=where)
    if not 0 < check_number(settings["quantile_fraction"], "scheduler.quantile_fraction", where) <= 0.5:
        raise ConfigError("scheduler.quantile_fraction", "must be in (0, 0.5]", where=where)
    if not 0 <= check_number(settings["resample_probability"], "scheduler.resample_probability", where) <= 1:
        raise ConfigError("scheduler.resample_probability", "must be in [0, 1]", where=where)
    if check_number(settings["burn_in_period"], "scheduler.burn_in_period", where) < 0:
        raise ConfigError("scheduler.burn_in_period", "must be >= 0 (epochs)", where=where)
    return {**settings, "hyperparam_mutations": parse_mutations(settings["hyperparam_mutations"], fixed, where)}


def parse_mutations(mutations: Any, fixed: TrainConfig, where: str) -> dict[str, tuple[str, list]]:
    if not isinstance(mutations, dict) or not mutations:
        raise ConfigError("scheduler.hyperparam_mutations", f"pbt needs mutable params ({', '.join(PBT_MUTABLE)})",
                          where=where)
    parsed = {}
    for field, spec in mutations.items():
        key = f"scheduler.hyperparam_mutations.{field}"
        if field not in PBT_MUTABLE:
            raise ConfigError(key, f"pbt may only mutate {', '.join(PBT_MUTABLE)} (values that keep weight shapes "
                              "and the study's meaning)", where=where)
        kind, args = parse_distribution(spec, field, key, fixed.to_dict(), where)
        if kind not in ("loguniform", "uniform", "choice"):
            raise ConfigError(key, f"pbt mutations take loguniform, uniform or choice, not {kind}", where=where)
        if field in PBT_CHOICE_ONLY and kind != "choice":
            raise ConfigError(key, f"pbt's x1.2 steps would take {field} past its range: use choice", where=where)
        parsed[field] = (kind, args)
    return parsed


def parse_finalists(raw: Any, where: str) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise ConfigError("finalists", "expected {trials: N, samples: N}", where=where)
    for key in raw:
        if key not in DEFAULT_FINALISTS:
            raise ConfigError(f"finalists.{key}", f"unknown key (known: {', '.join(DEFAULT_FINALISTS)})", where=where)
    return {"trials": check_int(raw.get("trials", DEFAULT_FINALISTS["trials"]), "finalists.trials", where, low=0),
            "samples": check_int(raw.get("samples", DEFAULT_FINALISTS["samples"]), "finalists.samples", where, low=2)}


def parse_resources(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ConfigError("resources", "expected {cpu: N, gpu: F}", where=where)
    resources = {**DEFAULT_RESOURCES, **raw}
    for key, value in resources.items():
        if key not in DEFAULT_RESOURCES:
            raise ConfigError(f"resources.{key}", "unknown resource (known: cpu, gpu)", where=where)
        check_number(value, f"resources.{key}", where)
    if resources["cpu"] <= 0:
        raise ConfigError("resources.cpu", "must be > 0", where=where)
    gpu = resources["gpu"]
    if gpu < 0 or (gpu > 1 and gpu != int(gpu)):
        raise ConfigError("resources.gpu", f"{gpu}: use a fraction <= 1 or a whole number", where=where)
    return resources


def describe_trials(space: Space) -> str:
    """The plan's trial count and length, "until the budget" where the space leaves one open."""
    trials = "new trials until the budget ends" if space.num_samples is None else str(space.num_samples)
    if space.cohort > 1:
        trials = f"{trials} (configurations, {space.cohort} per trial as one fused cohort)"
    epochs = "training until the budget ends" if space.epochs_until_budget else f"up to {space.max_epochs} epochs"
    return f"{trials}, each {epochs}" if space.num_samples is None else f"{trials} x {epochs}"


SCHEDULER_CHECKS = {
    "asha": check_asha, "hyperband": check_hyperband, "pbt": check_pbt, "fifo": check_fifo,
}
