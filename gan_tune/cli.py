"""The parser every gan_tune command shares and its argument types."""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

from gan_tune.training.config import SEED_MAX, device_available


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
