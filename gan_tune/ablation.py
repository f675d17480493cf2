"""`python -m gan_tune.ablation`: the quality table (what each setting buys at equal wall time)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from gan_tune.benchmarks.quality_table import (
    ABLATIONS,
    AUGMENT,
    CAPACITY,
    LAZY_R1,
    LONG,
    LONG_MARKS,
    SAMPLES,
    SEED_RECIPE,
    before_space,
    format_rows,
    search_row,
    side_by_side,
    training_row,
)
from gan_tune.cli import CliParser, out_file, out_folder, positive_float
from gan_tune.tuning.space_files import packaged_spaces

BLOCKS = ("ablations", "seed-alone", "search-before", "search-now", "long", "augment", "capacity", "lazy-r1")
MAX_MINUTES = 7 * 24 * 60  # a row past a week is a typo (20 digits), not a measurement


def minutes(text: str) -> float:
    """argparse type of --minutes / --ablation-minutes: a wall time > 0 and at most a week."""
    value = positive_float(text)
    if value > MAX_MINUTES:
        raise argparse.ArgumentTypeError(f"{value:g} minutes is more than a week ({MAX_MINUTES:,})")
    return value


def row_blocks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BLOCKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or '(none)'} (known: {', '.join(BLOCKS)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=minutes, default=14.0, help="budget of each search and the seed row")
    parser.add_argument("--ablation-minutes", type=minutes, default=5.0, help="wall time of each ablation row")
    parser.add_argument("--rows", type=row_blocks, default="ablations,seed-alone,search-before,search-now",
                        help="which blocks to run, comma-separated (also: long, augment, capacity, lazy-r1: configs trained "
                             "for --minutes each, scored along the way)")
    parser.add_argument("--json", type=out_file(".json"), help="also write the rows as JSON")
    parser.add_argument("--keep", type=out_folder, help="keep the searches' logs, studies and MLflow store in this "
                        "folder (default: a temporary folder, removed at the end)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    blocks, rows = args.rows, []
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if "ablations" in blocks:
            rows += side_by_side(ABLATIONS, "", args.ablation_minutes * 60, cpus)
            print(format_rows(rows[-len(ABLATIONS):]), flush=True)
        marks = tuple(args.minutes * 60 * share for share in LONG_MARKS)
        for block, configs in (("long", LONG), ("augment", AUGMENT), ("capacity", CAPACITY), ("lazy-r1", LAZY_R1)):
            if block in blocks:
                rows += side_by_side(configs, f"{block}: ", args.minutes * 60, cpus, marks)
                print(format_rows(rows[-len(configs):]), flush=True)
        if "seed-alone" in blocks:
            rows.append(training_row("seed recipe alone", SEED_RECIPE, args.minutes * 60, cpus))
            print(format_rows(rows[-1:]), flush=True)
        searches = (("search-before", before_space(folder)), ("search-now", packaged_spaces() / "balanced.yaml"))
        for block, space in searches:
            if block in blocks:
                rows.append(search_row(block, space, args.minutes * 60, folder))
                print(format_rows(rows[-1:]), flush=True)
    print(f"\n{SAMPLES} samples per score, {cpus} CPUs\n{format_rows(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
