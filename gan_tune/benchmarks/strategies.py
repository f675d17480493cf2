"""`python -m gan_tune.bench search`: best-FID-over-time curves of search strategies at equal budget, over seeds.

Each strategy is a variant of one space (`--space`, default balanced, its CPU block on a machine without a
GPU), run through the real `python -m gan_tune.search` (Ray Tune, the GAN stopper, MLflow into a store of
its own) for `--budget` with each of `--seeds` seeds, one run after another. A run's curve is the best score
reported so far by any of its trials, as a step function of wall time since the search command started
(Ray's start-up included), read from the trials' progress.csv. Per strategy the median over seeds and the
min-max band go into curves.png (log-scaled FID), every curve into curves.json, and table.txt holds the
score at 25 %, 50 % and 100 % of the budget, the time to reach a few FID levels, and the final FID of each
run's kept generator re-scored on the space's finalist samples (10,000), which no 1,000-sample luck decides.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from gan_tune.tracking import parent_run
from gan_tune.training.cohort import MEMBERS_KEY
from gan_tune.training.config import read_yaml
from gan_tune.tuning import spaces

# The recipe gan_tune started from: its rates, latent size and loss, no G averaging.
SEED_RECIPE = {"lr_d": 2.0e-4, "lr_g": 1.0e-4, "latent_dim": 100, "beta1": 0.5, "loss": "ns", "g_ema": 0.0}
SHARES = (0.25, 0.5, 1.0)  # of the budget, for the table
FID_LEVELS = (100.0, 50.0, 30.0)
RUN_OVERHEAD_S = 60  # Ray start-up, finalists and tracking around each search's budget (the time estimate)


def seed_recipe(raw: dict) -> dict:
    """One trial of the seed recipe on the space's fixed settings, for the whole budget on every CPU."""
    base = {**raw.get("base", {}), **SEED_RECIPE}
    return {**raw, "base": base, "search": {}, "num_samples": 1, "max_epochs": spaces.UNTIL_BUDGET_EPOCHS,
            "search_alg": "random", "scheduler": {"type": "fifo"}, "finalists": {"trials": 1}}


def with_scheduler(scheduler: dict, search_alg: str = "random") -> Callable[[dict], dict]:
    def change(raw: dict) -> dict:
        base = raw.get("base", {})
        if scheduler["type"] in spaces.RESUMING_SCHEDULERS:  # what spaces.check_resuming asks of them
            base = {**base, "checkpoint_every": 1, "checkpoint_every_s": 0, "eval_every": 1}
        return {**raw, "base": base, "search_alg": search_alg, "scheduler": scheduler}
    return change


def pbt(raw: dict) -> dict:
    """PBT mutating the space's lr_d and lr_g ranges, a population of 4, training until the budget."""
    mutations = {key: raw["search"][key] for key in ("lr_d", "lr_g") if key in raw.get("search", {})}
    scheduler = {"type": "pbt", "perturbation_interval": 2, "burn_in_period": 2, "hyperparam_mutations": mutations}
    changed = {**with_scheduler(scheduler)(raw), "num_samples": 4}
    changed.pop("max_epochs", None)
    return changed


def cohort_asha(raw: dict) -> dict:
    """random-asha with its configurations trained COHORT_SIZE at a time as one fused model (issue 27)."""
    return {**with_scheduler({"type": "asha", "grace_period": 2, "reduction_factor": 3})(raw), "cohort": COHORT_SIZE}


COHORT_SIZE = 4
STRATEGIES: dict[str, Callable[[dict], dict]] = {
    "seed-recipe": seed_recipe,
    "random-fifo": with_scheduler({"type": "fifo"}),
    "random-asha": with_scheduler({"type": "asha", "grace_period": 2, "reduction_factor": 3}),
    "optuna-asha": with_scheduler({"type": "asha", "grace_period": 2, "reduction_factor": 3}, "optuna"),
    "random-hyperband": with_scheduler({"type": "hyperband", "reduction_factor": 3}),
    "pbt": pbt,
    "cohort-asha": cohort_asha,
}
DEFAULT_STRATEGIES = tuple(name for name in STRATEGIES if name != "cohort-asha")  # the README's measured six


def strategy_raw(raw: dict, strategy: str, gpu: bool) -> dict:
    """The space, its cpu block merged in on a machine without a GPU, with the strategy applied (after the
    merge, so the block's scheduler and counts do not override the strategy's); a space file as it is."""
    if strategy not in STRATEGIES:
        return read_yaml(strategy)
    space = spaces.parse_space(raw, "space", "space")
    merged = (space if gpu else spaces.for_cpu(space)).raw
    return STRATEGIES[strategy]({key: value for key, value in merged.items() if key != "cpu"})


# ---- curves

def best_so_far(reports: pd.DataFrame, started: float, mode: str = "min", metric: str = "fid") -> pd.DataFrame:
    """(seconds since `started`, best `metric` so far) at every report that improved it: a step function.

    `reports` holds every trial's reports (Tune's `timestamp` column, whole seconds); a resumed trial's repeated
    epochs and non-finite scores (a diverged epoch reports 1e6, finite) are simply more reports."""
    frame = reports[["timestamp", metric]].dropna()
    frame = frame[np.isfinite(frame[metric])].sort_values("timestamp", kind="stable")
    best = frame[metric].cummin() if mode == "min" else frame[metric].cummax()
    curve = pd.DataFrame({"t": frame["timestamp"].to_numpy() - started, "best": best.to_numpy()})
    return curve[curve["best"].diff().fillna(-1).ne(0)].reset_index(drop=True)


def value_at(curve: pd.DataFrame, t: float) -> float:
    """The best score known `t` seconds in; NaN before the first report."""
    known = curve[curve["t"] <= t]
    return float(known["best"].iloc[-1]) if len(known) else math.nan


def time_to(curve: pd.DataFrame, level: float, mode: str = "min") -> float:
    """Seconds until the best score first reached `level`; NaN if it never did."""
    reached = curve[curve["best"] <= level] if mode == "min" else curve[curve["best"] >= level]
    return float(reached["t"].iloc[0]) if len(reached) else math.nan


def configurations(study: Path) -> int:
    """Configurations the study trained at least one epoch of: a trial's, or each member of a cohort trial's."""
    count = 0
    for progress in study.glob("*/progress.csv"):
        params = json.loads((progress.parent / "params.json").read_text())
        count += len(params.get(MEMBERS_KEY, [None]))
    return count


def study_reports(study: Path) -> pd.DataFrame:
    frames = [pd.read_csv(path) for path in study.glob("*/progress.csv")]
    # no report yet: float columns (an empty frame's default, object, breaks np.isfinite in best_so_far)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["timestamp", "fid"], dtype=float)


# ---- runs

def run_search(space_file: Path, budget_s: float, name: str, storage: Path, uri: str, log: Path,
               *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m gan_tune.search` in a process of its own, as a user runs it; its output kept in `log`.
    Returns the finished process and its start (epoch seconds)."""
    command = [sys.executable, "-m", "gan_tune.search", "--space", str(space_file), "--time-budget", f"{budget_s:g}s",
               "--storage-path", str(storage), "--name", name, "--tracking-uri", uri, *extra]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    return done, started


def parent_run_id(stdout: str) -> str | None:
    """The MLflow parent run a search printed ("mlflow parent run: ID ...")."""
    found = [line.split("mlflow parent run: ", 1)[1].split()[0] for line in stdout.splitlines()
             if line.startswith("mlflow parent run: ")]
    return found[0] if found else None


def run_one(space_file: Path, strategy: str, seed: int, budget_s: float, out: Path) -> dict[str, Any]:
    """One search; its curve, its kept generator's re-scored FID, its wall time."""
    name = f"{Path(strategy).stem}-s{seed}"
    uri = f"sqlite:///{out / 'mlflow' / name}.db"
    (out / "mlflow").mkdir(parents=True, exist_ok=True)
    extra = ["--seed", str(seed)]
    if strategy == "seed-recipe":  # one trial: give it the machine, as a user training alone would
        extra += ["--cpus-per-trial", str(os.cpu_count() or 1)]
    done, started = run_search(space_file, budget_s, name, out / "ray_results", uri, out / "logs" / f"{name}.log",
                               *extra)
    wall = time.time() - started
    curve = best_so_far(study_reports(out / "ray_results" / name), started)
    return {"strategy": strategy, "seed": seed, "exit": done.returncode, "wall_s": round(wall, 1),
            "configurations": configurations(out / "ray_results" / name),
            "final_fid": rescored_fid(uri, done.stdout), "curve": curve.to_dict("list")}


def rescored_fid(uri: str, stdout: str) -> float:
    """The FID the search logged for the generator it kept: re-scored on its finalist samples when it did."""
    parent = parent_run_id(stdout)
    if parent is None:
        return math.nan
    run = MlflowClient(uri).get_run(parent)
    samples = run.data.tags.get(parent_run.RESCORED_TAG)
    key = parent_run.rescored_name("fid", int(samples)) if samples else "fid"
    return float(run.data.metrics.get(key, math.nan))


# ---- report

def summary_table(runs: list[dict], budget_s: float) -> pd.DataFrame:
    rows = []
    for strategy in dict.fromkeys(run["strategy"] for run in runs):
        mine = [run for run in runs if run["strategy"] == strategy]
        curves = [pd.DataFrame(run["curve"]) for run in mine]
        row = {"strategy": strategy, "seeds": len(mine),
               "configs": spread([float(run.get("configurations", math.nan)) for run in mine])}
        for share in SHARES:
            row[f"fid at {share:.0%}"] = spread([value_at(c, share * budget_s) for c in curves])
        for level in FID_LEVELS:
            times = [time_to(c, level) for c in curves]
            reached = [t for t in times if math.isfinite(t)]
            row[f"time to fid {level:g}"] = (f"{np.median(reached):.0f} s ({len(reached)}/{len(times)})"
                                             if reached else f"– (0/{len(times)})")
        row["final fid 10k"] = spread([run["final_fid"] for run in mine])
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(runs: list[dict], budget_s: float) -> list[str]:
    """At 25, 50 and 100 % of the budget, and for the kept generators re-scored: the strategy with the best
    median FID, the next one and the ratio of their medians, and whether the two stand apart beyond the seed
    spread (the winner's worst seed better than the next one's best) or not."""
    strategies = list(dict.fromkeys(run["strategy"] for run in runs))
    points = [(f"at {share:.0%} of the budget", lambda run, at=share * budget_s: value_at(pd.DataFrame(run["curve"]), at))
              for share in SHARES]
    points.append(("kept generator re-scored", lambda run: run["final_fid"]))
    lines = []
    for label, value in points:
        scores = {s: [v for v in (value(run) for run in runs if run["strategy"] == s) if math.isfinite(v)]
                  for s in strategies}
        ranked = sorted((s for s in strategies if scores[s]), key=lambda s: np.median(scores[s]))
        if len(ranked) < 2:
            continue
        (first, a), (second, b) = [(s, scores[s]) for s in ranked[:2]]
        apart = "apart beyond the seed spread" if max(a) < min(b) else "within the seed spread (ranges overlap)"
        if np.median(a) == np.median(b):
            line = f"{label}: {first} and {second} tie at {np.median(a):.1f}"
        else:
            line = (f"{label}: {first} {np.median(a):.1f}, next {second} {np.median(b):.1f} "
                    f"({np.median(b) / np.median(a):.2f}x), {apart}")
        behind = [s for s in ranked[1:] if min(scores[s]) > max(a)]  # even their best seed is worse than a's worst
        lines.append(line + (f"; behind beyond the spread: {', '.join(behind)}" if behind else ""))
    return lines


def spread(values: list[float]) -> str:
    """median [min–max] of the finite values, "–" when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "–"
    return f"{np.median(finite):.1f} [{min(finite):.1f}–{max(finite):.1f}]" if len(finite) > 1 else f"{finite[0]:.1f}"


def plot(runs: list[dict], budget_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, budget_s + RUN_OVERHEAD_S, 200)
    fig, ax = plt.subplots(figsize=(8, 5))
    for strategy in dict.fromkeys(run["strategy"] for run in runs):
        values = np.array([[value_at(pd.DataFrame(run["curve"]), t) for t in grid]
                           for run in runs if run["strategy"] == strategy])
        with np.errstate(all="ignore"):
            known = ~np.isnan(values).any(axis=0)  # from when every seed has a score
        if not known.any():
            continue
        line, = ax.step(grid[known] / 60, np.median(values[:, known], axis=0), where="post", label=strategy)
        ax.fill_between(grid[known] / 60, values[:, known].min(axis=0), values[:, known].max(axis=0), step="post",
                        alpha=0.2, color=line.get_color())
    ax.axvline(budget_s / 60, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="wall time since the search command started (min)", ylabel="best FID so far (1,000 samples)",
           yscale="log", title="best FID found over time: median over seeds, band min–max")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- CLI


def write_report(runs: list[dict], budget_s: float, out: Path) -> None:
    text = summary_table(runs, budget_s).to_string(index=False) + "\n\n" + "\n".join(verdict(runs, budget_s)) + "\n"
    (out / "table.txt").write_text(text)
    plot(runs, budget_s, out / "curves.png")
    print(text + f"curves: {out / 'curves.png'}, {out / 'curves.json'}; table: {out / 'table.txt'}")
