"""`python -m gan_tune.bench search`: which search strategy finds a good generator fastest."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml

from gan_tune.benchmarks.strategies import (
    DEFAULT_STRATEGIES,
    RUN_OVERHEAD_S,
    STRATEGIES,
    run_one,
    strategy_raw,
    write_report,
)
from gan_tune.cli import CliParser, count_arg, duration_arg, out_folder
from gan_tune.training.config import ConfigError, read_yaml
from gan_tune.tuning import space_values, spaces
from gan_tune.tuning.space_files import resolve_space


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.bench search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="balanced", help="space name or file the strategies vary (default balanced)")
    parser.add_argument("--budget", default="5m", type=duration_arg,
                        help="time budget of every search, e.g. 90s, 5m (default 5m)")
    parser.add_argument("--seeds", type=count_arg(1), default=3, help="seeds per strategy (default 3)")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help=f"comma-separated: {', '.join(STRATEGIES)}, or space files (default: all but cohort-asha, "
                             "which the README compares with random-asha on its own)")
    parser.add_argument("--out", default="bench_search", type=out_folder, help="output folder (default ./bench_search)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: draw curves.png, table.txt and the verdict again from OUT/curves.json")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace, gpu: bool) -> tuple[dict, float, list[str]]:
    budget_s = space_values.parse_duration(args.budget, "--budget", "command line")  # checked by the parser
    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    for name in strategies:
        if name not in STRATEGIES and not Path(name).is_file():
            known = ", ".join(STRATEGIES)
            raise ConfigError("--strategies", f"unknown strategy {name!r} (known: {known}, or a space file)")
    if not strategies:
        raise ConfigError("--strategies", "empty")
    raw = read_yaml(resolve_space(args.space))
    for name in strategies:  # every variant must load before the first search starts
        path = Path(name) if name not in STRATEGIES else None
        spaces.load_space(path) if path else spaces.parse_space(strategy_raw(raw, name, gpu), f"strategy {name}", name)
    return raw, budget_s, strategies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report_again(Path(args.out))
    gpu = torch.cuda.is_available()
    try:
        raw, budget_s, strategies = check_args(args, gpu)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "spaces").mkdir(parents=True, exist_ok=True)
    total = len(strategies) * args.seeds
    print(f"{total} searches of {space_values.format_duration(budget_s)} each, one after another: about "
          f"{space_values.format_duration(total * (budget_s + RUN_OVERHEAD_S))} in all; results in {out}", flush=True)
    runs = []
    for strategy in strategies:
        space_file = out / "spaces" / f"{Path(strategy).stem}.yaml"
        space_file.write_text(yaml.safe_dump(strategy_raw(raw, strategy, gpu), sort_keys=False))
        for seed in range(args.seeds):
            run = run_one(space_file, strategy, seed, budget_s, out)
            runs.append(run)
            last = run["curve"]["best"][-1] if run["curve"]["best"] else math.nan
            print(f"[{len(runs)}/{total}] {strategy} seed {seed}: exit {run['exit']}, {run['wall_s']:.0f} s, "
                  f"best reported fid {last:.4g}, kept generator re-scored {run['final_fid']:.4g}", flush=True)
    (out / "curves.json").write_text(json.dumps({"budget_s": budget_s, "space": args.space, "runs": runs}, indent=1))
    write_report(runs, budget_s, out)
    return 0 if all(run["exit"] == 0 for run in runs) else 1


def report_again(out: Path) -> int:
    """--report: the outputs of an earlier run drawn again from its curves.json."""
    path = out / "curves.json"
    if not path.is_file():
        print(f"error: --report: {path}: no such file (run the benchmark first)", file=sys.stderr)
        return 2
    saved = json.loads(path.read_text())
    write_report(saved["runs"], saved["budget_s"], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
