"""Checks of single values in a space file (ints, numbers, names, distributions and their bounds, durations); each error names the file and the key."""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from ray import tune

from gan_tune.training.config import (
    DERIVED_PARAMS,
    FIELD_TYPES,
    MAX_COUNT,
    ConfigError,
    coerce,
    from_dict,
)

DISTRIBUTIONS: dict[str, Callable[[list], Any]] = {
    "loguniform": lambda a: tune.loguniform(a[0], a[1]),  # [low, high)
    "uniform": lambda a: tune.uniform(a[0], a[1]),  # [low, high)
    "randint": lambda a: tune.randint(a[0], a[1] + 1),  # [low, high], both ends, unlike tune.randint
    "choice": tune.choice,
    "grid": tune.grid_search,
}


BOUNDED = ("loguniform", "uniform", "randint")


def check_int(value: Any, key: str, where: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(key, f"expected an integer {allowed}, got {value!r}", where=where)
    return value


# Beyond these a search never ends in any budget, and Tune would first try to build them (a 20-digit
# num_samples hung the search before its first trial)
MAX_COUNTS = {"num_samples": MAX_COUNT, "max_epochs": MAX_COUNT}


def check_open_int(raw: dict[str, Any], key: str, time_budget_s: float | None, where: str) -> int | None:
    """num_samples or max_epochs: a count in [1, MAX_COUNTS[key]], or absent (null) for "until the time budget
    ends"."""
    if raw.get(key) is not None:
        value = check_int(raw[key], key, where, low=1)
        if value > MAX_COUNTS[key]:
            raise ConfigError(key, f"{value} is more than {MAX_COUNTS[key]:,} (absurdly large)", where=where)
        return value
    if time_budget_s is None:
        raise ConfigError(key, "missing: give a number, or a time_budget to run until", where=where)
    return None


def check_number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, f"expected a finite number, got {type(value).__name__} {value!r}"
                          " (write floats with a dot: 1.0e-4)", where=where)
    return value


def check_name(value: Any, known: Any, key: str, what: str, where: str) -> str:
    """A name from `known` (a registry); a list or mapping in its place is named, not a TypeError."""
    if not isinstance(value, str) or value not in known:
        raise ConfigError(key, f"unknown {what} {value!r} (known: {', '.join(known)})", where=where)
    return value


def prefixed(check: Callable[[], Any], prefix: str, where: str) -> Any:
    """Run a config check, naming the key inside `prefix` (base.lr_d) and the file in any error."""
    try:
        return check()
    except ConfigError as err:
        raise ConfigError(f"{prefix}.{err.key}", err.msg, where=where) from None


def parse_distribution(spec: Any, field: str, key: str, base: dict[str, Any], where: str,
                       searched: set[str] = frozenset()) -> tuple[str, list]:
    """{loguniform|uniform|randint: [low, high]} or {choice|grid: [values]}, checked against the field's type."""
    if not isinstance(spec, dict) or len(spec) != 1:
        known = ", ".join(DISTRIBUTIONS)
        raise ConfigError(key, f"expected one {{distribution: arguments}} (distributions: {known})", where=where)
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(key, f"unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})", where=where)
    if not isinstance(args, list) or not args:
        raise ConfigError(key, f"{kind} takes a non-empty list", where=where)
    field_type = FIELD_TYPES.get(field, "float")  # derived params are floats
    if kind in BOUNDED:
        low, high = check_bounds(kind, args, field, field_type, key, where)
        # uniform and loguniform draw from [low, high): the largest value they can draw is the float below high
        top = high if kind == "randint" else math.nextafter(high, low)
        for value, bound in ((low, "low"), (top, "high")):
            check_value(field, value, base, key, where, f"{kind} {bound} {value if value == low else high}", searched)
        return kind, [low, high]
    values = [check_value(field, value, base, key, where, searched=searched) for value in args]
    return kind, values


def check_bounds(kind: str, args: list, field: str, field_type: str, key: str, where: str) -> tuple:
    if len(args) != 2:
        raise ConfigError(key, f"{kind} takes [low, high], got {args!r}", where=where)
    low, high = (check_number(value, key, where) for value in args)
    if kind == "randint" and not all(isinstance(v, int) for v in args):
        raise ConfigError(key, f"randint bounds must be integers, got {args!r}", where=where)
    if field_type not in ("int", "float"):
        raise ConfigError(key, f"{field} is {field_type}: use choice", where=where)
    if kind != "randint" and field_type != "float":
        raise ConfigError(key, f"{kind} samples floats but {field} is {field_type} (use randint or choice)",
                          where=where)
    if low > high:
        raise ConfigError(key, f"low {low} > high {high}", where=where)
    if low == high:  # randint includes both ends, but [5, 5] still draws one value
        raise ConfigError(key, f"low == high ({low}): put a fixed value in base", where=where)
    if kind == "loguniform" and low <= 0:
        raise ConfigError(key, f"loguniform needs low > 0, got {low}", where=where)
    return low, high


def check_value(field: str, value: Any, base: dict[str, Any], key: str, where: str, shown: str = "",
                searched: set[str] = frozenset()) -> Any:
    """A value a trial may get: the field's type, and a valid TrainConfig together with base. A clash with
    another searched field's default (loss wgan-gp, d_norm searched) is left to check_pairs."""
    if field in DERIVED_PARAMS:  # each scales its target field (lr_d = lr_g * lr_ratio), which must stay > 0
        if check_number(value, key, where) <= 0:
            raise ConfigError(key, f"{value}: must be > 0", where=where)
        return value
    try:
        value = coerce(field, value)
        from_dict({**base, field: value})
    except ConfigError as err:
        if err.key != field and err.key in searched:
            return value
        other = f"{err.key} " if err.key != field else ""  # a clash with base: batch_size 4096 vs subset 1000
        raise ConfigError(key, f"{shown or repr(value)}: {other}{err.msg}", where=where) from None
    return value


DURATION = re.compile(r"(\d+(?:\.\d+)?)([hms])")


SECONDS = {"h": 3600, "m": 60, "s": 1}
MAX_DURATION_S = 366 * 24 * 3600  # a budget past a year is a typo (20 digits of hours); Tune would take it


def parse_duration(text: Any, key: str, where: str) -> float:
    """'90s', '15m', '1h', '1h30m' -> seconds."""
    text = str(text).strip()
    if not text or not re.fullmatch(f"(?:{DURATION.pattern})+", text):
        raise ConfigError(key, f"bad duration {text!r} (use e.g. 90s, 15m, 1h, 1h30m)", where=where)
    seconds = sum(float(number) * SECONDS[unit] for number, unit in DURATION.findall(text))
    if seconds <= 0:
        raise ConfigError(key, f"bad duration {text!r}: must be > 0", where=where)
    if seconds > MAX_DURATION_S:
        raise ConfigError(key, f"bad duration {text!r}: more than a year", where=where)
    return seconds


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
