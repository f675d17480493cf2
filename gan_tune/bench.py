"""`python -m gan_tune.bench`: training throughput, FID time, packing and parity (`bench search`: strategies)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch

from gan_tune.benchmarks import gpu_check
from gan_tune.benchmarks.throughput import (
    balanced_plan,
    best_packing,
    cohort_throughput,
    fid_timing,
    packed_search,
    quality_parity,
    trial_costs,
    trial_table,
)
from gan_tune.cli import CliParser, count_arg, out_file, out_folder
from gan_tune.quality.scorer import GPU_FID_SAMPLES
from gan_tune.training.config import ConfigError, TrainConfig, from_dict
from gan_tune.training.data import BUNDLED, load_mnist
from gan_tune.training.models import MODELS
from gan_tune.tuning.cluster import mps_running
from gan_tune.tuning.spaces import MAX_COHORT

# (e) starts a Ray of os.cpu_count() CPUs and gives each packed trial at least one: more trials than CPUs would
# queue instead of sharing the device, and the row would name a packing it never ran
MAX_PACKED = os.cpu_count() or 1


def counts(flag: str, text: str, high: int, why: str = "") -> list[int]:
    """A comma-separated list of integers in [1, high] ('' = none); anything else is a ConfigError naming the flag."""
    try:
        values = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        values = [0]
    if any(not 1 <= n <= high for n in values):
        raise ConfigError(flag, f"{text!r} is not a comma-separated list of integers in [1, {high:,}]{why}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="balanced model at batch 128 only, fewer steps")
    parser.add_argument("--json", metavar="OUT", type=out_file(".json"), help="also write the numbers as JSON")
    parser.add_argument("--steps", type=count_arg(2), default=None, help="(a)-(d): timed steps of batch 128 per cell "
                        "(default 500 on CUDA, 200 with --quick; 20 on CPU; the first warms up); fewer: noisier")
    parser.add_argument("--models", default=None, help="(a)-(d): model families, comma-separated "
                        "(default balanced,dcgan,mlp; balanced with --quick; '' to skip the table)")
    parser.add_argument("--packed", default=None, help="(e): trials sharing the device, comma-separated, each at "
                        f"most this machine's CPU count ({MAX_PACKED}: every trial takes a CPU at least, so more would "
                        "queue, not share; default 1,2,4,8 on CUDA, 1,2 on CPU, counts above that left out; '' to skip)")
    # 0 skips each of these three parts (their help says so); 1 FID sample has no covariance
    parser.add_argument("--fid-samples", type=count_arg(2, off=True), default=GPU_FID_SAMPLES,
                        help=f"(f): samples scored (default {GPU_FID_SAMPLES}, the customary FID count; 0 skips)")
    parser.add_argument("--parity-epochs", type=count_arg(1, off=True), default=None, help="(h): epochs of the "
                        "eager-fp32 vs graph-bf16 FID comparison (default 20 on CUDA, 0 = skip on CPU)")
    # at least 2: the split leaves epoch 1 out (warm-up, graph capture), so one epoch would print nan
    parser.add_argument("--cost-epochs", type=count_arg(2, off=True), default=None, help="(i): epochs of one "
                        "balanced trial with this device's settings, split into train / score / files / report "
                        "(default 12 on CUDA, 3 on CPU; 0 = skip)")
    parser.add_argument("--cohort", default="", help=f"(j): cohort sizes K in [1, {MAX_COHORT}] (a space's limit), "
                        "comma-separated: aggregate images/s of K members fused into one model (balanced, width 0.25, "
                        "batch 64) vs one trial (default '': skip)")
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda requested but torch.cuda.is_available() is False")
    if args.models is None:
        args.models = "balanced" if args.quick else "balanced,dcgan,mlp"
    args.models = [m for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        raise ConfigError("--models", f"unknown {', '.join(sorted(unknown))} (known: {', '.join(MODELS)})")
    if args.packed is None:
        args.packed = ",".join(str(n) for n in ((1, 2, 4, 8) if on_gpu else (1, 2)) if n <= MAX_PACKED)
    args.packed = counts("--packed", args.packed, MAX_PACKED, f" (this machine's {MAX_PACKED} CPUs: each packed trial "
                         "takes one at least, so more would queue instead of sharing the device)")
    args.cohort = counts("--cohort", args.cohort, MAX_COHORT, " (a space's cohort limit)")
    if args.parity_epochs is None:
        args.parity_epochs = 20 if on_gpu else 0
    if args.cost_epochs is None:
        args.cost_epochs = 12 if on_gpu else 3
    if args.steps is None:
        args.steps = (200 if args.quick else 500) if on_gpu else 20
    return args


def measure(args: argparse.Namespace, save: Saver) -> None:
    """Each part in turn, handed to `save` as it ends: the per-trial table first, then FID time, packing,
    cohorts, the cost split and the eager/graph parity."""
    device, on_gpu = torch.device(args.device), args.device == "cuda"
    data = load_mnist(BUNDLED)
    batches = [128] if args.quick or not on_gpu else [128, 1024]
    steps = args.steps
    print(f"device: {torch.cuda.get_device_name(device) if on_gpu else 'cpu'} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, {steps * 128:,} timed images per cell", file=sys.stderr)
    table = trial_table(device, data, args.models, batches, steps)
    save(table)
    if args.fid_samples:
        save(**fid_timing(device, data, args.fid_samples))
    reference = table.loc[(table["model"] == "balanced") & (table["batch"] == 128), "a typical loop"] \
        if len(table) else pd.Series(dtype=float)
    aggregates = {}
    for trials in args.packed:
        # GPU trials start seconds apart and must overlap for several epochs: long ones; a CPU has
        # time for short ones only (2 trials x 1 thread at width 1 train ~60 images/s each)
        packed = packed_search(trials, device, data, steps * 3, epochs=4) if on_gpu else \
            packed_search(trials, device, data, steps=4, epochs=3)
        if len(reference):
            packed["x a"] = round(packed["aggregate_img_per_s"] / reference.item(), 1)
        packed["mps"] = mps_running()  # without MPS, processes sharing a GPU take turns on it
        aggregates[trials] = packed["aggregate_img_per_s"]
        save(**{f"packed {trials} trials": packed})
    if args.packed:
        save(**{"best packing (trials per device)": best_packing(aggregates)})
    if args.cohort:  # the balanced space's model on this device (width 1, batch 128 in a CUDA graph on a GPU)
        cfg = from_dict(balanced_plan(device).train_fields)
        width, batch = cfg.width, cfg.batch_size
        save(**{f"cohort (balanced, width {width:g}, batch {batch}{', cuda graph' if on_gpu else ''})":
                cohort_throughput(device, data, args.cohort, steps, width, batch, graph=on_gpu)})
    if args.cost_epochs:
        short = 8 if args.quick and not on_gpu else 0  # 8 steps: short CPU epochs
        save(**{"cost split per epoch (balanced, this device's settings)":
                trial_costs(device, data, args.cost_epochs, short)})
    if args.parity_epochs:
        base = TrainConfig(device=args.device, data_source=data.source, max_epochs=args.parity_epochs,
                           fid_samples=args.fid_samples or GPU_FID_SAMPLES)
        save(**{"quality parity": quality_parity(device, data, base)})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["search"]:  # python -m gan_tune.bench search: the search strategies' anytime curves
        from gan_tune import bench_search

        return bench_search.main(argv[1:])
    if argv[:1] == ["gpu-check"]:
        return gpu_check_main(argv[1:])
    try:
        args = parse_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    measure(args, Saver(args))
    return 0


class Saver:
    """Prints each part of the bench as it ends and rewrites --json with everything so far: a bench stopped at
    a time limit (a lent GPU's minutes) keeps what it measured."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.table, self.extra = args, pd.DataFrame(), {}

    def __call__(self, table: pd.DataFrame | None = None, **extra) -> None:
        if table is not None:
            self.table = table
            if len(table):
                print(table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"), flush=True)
        for key, value in extra.items():
            print(f"{key}: {value}", flush=True)
        self.extra.update(extra)
        if self.args.json:
            tmp = Path(f"{self.args.json}.tmp")
            tmp.write_text(json.dumps({"device": self.args.device, "trials": self.table.to_dict("records"),
                                       **self.extra}, indent=2, default=str))
            tmp.replace(self.args.json)


def gpu_check_main(argv: list[str]) -> int:
    """python -m gan_tune.bench gpu-check --out DIR [--dry-run]: benchmarks/gpu_check.py."""
    parser = CliParser(prog="python -m gan_tune.bench gpu-check",
                       description="The CUDA tests, the quick bench (1 and 4 packed trials), a 4-minute balanced "
                                   "search with MLflow and 5,000 samples of its best generator, in under 8 minutes")
    parser.add_argument("--out", required=True, type=out_folder, help="folder for the logs, bench.json, mlflow.db, "
                                                                "ray_results/, samples.npz and gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="print the parts and their limits, run nothing")
    parser.add_argument("--cohort", action="store_true", help="also the cohort row (issue 27: aggregate images/s of "
                        f"cohorts of {gpu_check.COHORT_SIZES} against one trial), {gpu_check.COHORT_LIMIT_S} s more")
    parser.add_argument("--parts", type=gpu_check.part_names, help="only these parts, comma-separated "
                        f"({', '.join(gpu_check.PART_NAMES)}): a lent GPU's minutes split over two calls, or one "
                        "part run again (samples needs search in the same call); quality, a "
                        f"{gpu_check.QUALITY_BUDGET} balanced search (issue 26's GPU target), runs only when named")
    args = parser.parse_args(argv)
    args.out = Path(args.out)
    named = args.parts or ()
    plan = gpu_check.parts(args.out.resolve(), cohort=args.cohort or "cohort" in named, quality="quality" in named)
    plan = [part for part in plan if args.parts is None or part.name in args.parts]
    if args.dry_run:
        print(gpu_check.describe(plan))
        return 0
    if not torch.cuda.is_available():
        print("error: gpu-check: this machine has no CUDA device (--dry-run shows the plan)", file=sys.stderr)
        return 2
    records = gpu_check.run_check(args.out.resolve(), plan)
    failed = [r["part"] for r in records if r.get("rc") != 0]
    print(f"gpu-check: {len(records) - len(failed)} of {len(records)} parts passed; "
          f"record in {args.out / gpu_check.RECORD}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
