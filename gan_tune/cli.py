"""The parser every gan_tune command shares and its argument types."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn

from gan_tune.training.config import MAX_COUNT, SEED_MAX, ConfigError, check_writable, device_available


class CliParser(argparse.ArgumentParser):
    """The parser of every gan_tune command: a bad flag is one `error: FLAG: why` line and exit 2, like every
    other input mistake, instead of argparse's usage block (sub-commands inherit the class)."""

    def error(self, message: str) -> NoReturn:
        flag_first = re.sub(r"^argument ([^:]+): ", r"\1: ", message)  # "argument --seed: ..." -> "--seed: ..."
        print(f"error: {flag_first}", file=sys.stderr)
        raise SystemExit(2)


def device_arg(text: str) -> str:
    """argparse type of a --device flag: cpu, cuda[:N] or mps, present on this machine."""
    if re.fullmatch(r"cpu|mps|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda[:N] or mps")
    if not device_available(text):
        raise argparse.ArgumentTypeError(f"{text}: this machine has no such device")
    return text


def seed_arg(text: str) -> int:
    """argparse type of a --seed flag: an integer numpy accepts as a seed."""
    value = int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is out of range [0, {SEED_MAX}]")
    return value


def name_arg(text: str) -> str:
    """argparse type of a name flag (--experiment, --name): not empty, not only spaces."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def count_arg(low: int, high: int = MAX_COUNT, off: bool = False) -> Callable[[str], int]:
    """argparse type of a count flag: an integer in [low, high]; with `off`, 0 too (the help says what 0 means).
    A 20-digit count is refused here, not after minutes of trying to run it."""
    def int_(text: str) -> int:
        value = int(text)  # ValueError: argparse's "invalid int value: 'many'"
        if value < low and not (off and value == 0):
            allowed = ">= 0" if off and low == 1 else f"0 or >= {low}" if off else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value}: must be {allowed}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{value} is more than {high:,} (absurdly large)")
        return value
    int_.__name__ = "int"
    return int_


def finite_float(text: str) -> float:
    """argparse type of a float flag: nan and inf are refused (every comparison with nan is False)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: expected a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g}: must be > 0")
    return value


def duration_arg(text: str) -> str:
    """argparse type of a time budget (90s, 15m, 1h30m): checked here, kept as text for the space's time_budget."""
    from gan_tune.tuning.space_values import parse_duration  # late: only search and bench search take budgets (Ray)

    try:
        parse_duration(text, "", "")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(err.msg) from None
    return text


def out_folder(text: str) -> str:
    """argparse type of a folder a command writes into (made later if missing): not a file, not under one, and
    writable now, not after the minutes (or the hour) of work whose results it is for."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file, not a folder")
    writable_arg(path, text)
    return text


def data_folder(text: str) -> str:
    """argparse type of a folder data is read from and downloaded into: an existing one may be read-only (a cache
    filled before); a missing one is made later, so it must be possible to make it now."""
    return text if Path(text).expanduser().is_dir() else out_folder(text)


def out_file(*suffixes: str) -> Callable[[str], str]:
    """argparse type of a file a command writes: a known suffix, not a folder, not under a file, writable now."""
    def out_file(text: str) -> str:
        path = Path(text).expanduser()
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: unknown format {path.suffix or '(none)'} "
                                             f"(use {', '.join(suffixes)})")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: is a folder, not a file")
        if path.is_file() and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: cannot write it (read-only)")
        writable_arg(path.absolute().parent, text)
        return text
    return out_file


def writable_arg(folder: Path, text: str) -> None:
    """`folder` (where the flag's file or files go) is not under a file and can take a file: else an argparse
    error naming the flag's value."""
    for nearest in (folder, *folder.absolute().parents):  # the nearest existing path: a file, nothing goes under it
        if nearest.exists():
            if not nearest.is_dir():
                raise argparse.ArgumentTypeError(f"{text}: {nearest} is a file, not a folder")
            break
    try:
        check_writable(folder)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text}: cannot write there ({err.strerror or type(err).__name__})") from None
