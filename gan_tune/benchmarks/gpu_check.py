"""One GPU check in one call (`python -m gan_tune.bench gpu-check --out DIR`): the CUDA tests, the quick bench
with 1 and 4 packed trials, a 4-minute `--space balanced` search tracked in MLflow, and 5,000 samples of its
best generator, each part a subprocess under its own time limit, the record saved after every part.

A GPU is lent for minutes at a time: a part that hangs must not eat the others' time, and what finished
must survive a later part's failure, hence one process group per part and DIR/gpu_check.json rewritten as
each part ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from gan_tune.benchmarks.strategies import parent_run_id

RECORD = "gpu_check.json"
TERM_GRACE_S = 10  # after SIGTERM (Ray's and Tune's own shutdown), SIGKILL
TESTS = Path(__file__).resolve().parents[2] / "tests"  # the repository's tests, when run from a checkout


@dataclass(frozen=True)
class Part:
    name: str
    command: list[str]
    limit_s: float
    log: str  # file in DIR for the part's stdout and stderr
    results: str = ""  # a search's storage folder in DIR: its trials are summed up in the record


COHORT_SIZES = "1,4,16,32,64"
COHORT_LIMIT_S = 75  # 60 steps an epoch: K = 64 trains 64 x 60 x 128 = 492k images per timed epoch, 4 epochs in all
QUALITY_BUDGET = "8m30s"  # issue 26's GPU target: FID <= 3.0 within 10 minutes, finalists and start-up included
QUALITY_LIMIT_S = 560  # a call to a lent GPU runs 10 minutes at most, its set-up (the carried wheels) included


def parts(out: Path, python: str = sys.executable, cohort: bool = False, quality: bool = False) -> list[Part]:
    """The check's parts in order; limits sum to 7 min 55 s, the search's 4-minute budget included (cohort: the
    cohort row too, COHORT_LIMIT_S more; quality: a QUALITY_BUDGET search, a call of its own)."""
    uri = f"sqlite:///{out / 'mlflow.db'}"
    search = [python, "-m", "gan_tune.search", "--space", "balanced", "--tracking-uri", uri]
    extra = [Part("cohort", [python, "-m", "gan_tune.bench", "--device", "cuda", "--cohort", COHORT_SIZES,
                             "--models", "", "--packed", "", "--fid-samples", "0", "--cost-epochs", "0",
                             "--parity-epochs", "0", "--steps", "60", "--json", str(out / "cohort.json")],
                  COHORT_LIMIT_S, "cohort.log")] if cohort else []
    extra += [Part("quality", [*search, "--time-budget", QUALITY_BUDGET, "--storage-path", str(out / "quality_results"),
                               "--name", "gpu_quality"], QUALITY_LIMIT_S, "quality.log", "quality_results")
              ] if quality else []
    return [
        # the CPU suite already proves capture safety (test_capture.py); here every setting really captures
        Part("cuda-tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                            str(TESTS / "test_cuda.py")], 90, "tests.log"),
        # the cost split comes from the search's own trials (search_summary), not from a trial of the bench's
        Part("bench", [python, "-m", "gan_tune.bench", "--device", "cuda", "--quick", "--packed", "1,4",
                       "--parity-epochs", "5", "--cost-epochs", "0", "--json", str(out / "bench.json")],
             90, "bench.log"),
        Part("search", [*search, "--time-budget", "4m", "--storage-path", str(out / "ray_results"),
                        "--name", "gpu_check"], 275, "search.log", "ray_results"),
        Part("samples", [python, "-m", "gan_tune.sample", "--run-id", "{parent}", "-n", "5000",
                         "--out", str(out / "samples.npz"), "--tracking-uri", uri], 20, "samples.log"),
        *extra,
    ]


PART_NAMES = tuple(part.name for part in parts(Path(), cohort=True, quality=True))  # in the order they run


def part_names(text: str) -> tuple[str, ...]:
    """argparse type of --parts: a comma-separated subset of PART_NAMES."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - set(PART_NAMES))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown part {', '.join(unknown) or '(none given)'} "
                                         f"(known: {', '.join(PART_NAMES)})")
    return names


def run_part(part: Part, out: Path) -> dict:
    """Run one part in a process group of its own; past its limit the whole group is stopped."""
    started = time.monotonic()
    with open(out / part.log, "w") as log:
        child = subprocess.Popen(part.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code, timed_out = child.wait(timeout=part.limit_s), False
        except subprocess.TimeoutExpired:
            code, timed_out = stop_group(child), True
    return {"part": part.name, "rc": code, "timed_out": timed_out, "seconds": round(time.monotonic() - started, 1),
            "limit_s": part.limit_s, "log": part.log, "command": " ".join(part.command)}


def stop_group(child: subprocess.Popen) -> int:
    """SIGTERM to the part's own process group (its Ray too), SIGKILL after TERM_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            return child.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return child.wait()


def run_check(out: Path, plan: list[Part]) -> list[dict]:
    """Every part in order, DIR/gpu_check.json rewritten after each; the samples part needs the search's run."""
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    parent = None
    for part in plan:
        if "{parent}" in part.command:
            if parent is None:
                records.append({"part": part.name, "rc": None, "skipped": "the search printed no MLflow parent run"})
                save(out, records)
                continue
            part = replace(part, command=[arg.replace("{parent}", parent) for arg in part.command])
        print(f"gpu-check: {part.name} (at most {part.limit_s:g} s) ...", flush=True)
        record = run_part(part, out)
        records.append(record)
        save(out, records)
        print(f"gpu-check: {part.name}: rc {record['rc']}{' (timed out)' if record['timed_out'] else ''}, "
              f"{record['seconds']} s; log {out / part.log}", flush=True)
        log = (out / part.log).read_text(errors="replace")
        if part.name == "search":
            parent = parent_run_id(log)
        if part.results:
            try:
                record["summary"] = {**search_summary(out / part.results), **kept_fid(log)}
            except (KeyError, ValueError, OSError) as err:  # a summary must not cost the parts after it
                record["summary"] = {"error": f"{type(err).__name__}: {err}"}
            save(out, records)
            print(f"gpu-check: {part.name} summary: {record['summary']}", flush=True)
    return records


def search_summary(storage: Path) -> dict:
    """What the search's trials reported, read from their progress.csv: how many ran and how far, whether
    their steps ran in the CUDA graph, their images/s, and where an epoch's time went (cost_split)."""
    import pandas as pd

    from gan_tune.benchmarks.throughput import cost_split

    frames = [pd.read_csv(path).assign(trial=path.parent.name) for path in sorted(storage.glob("*/*/progress.csv"))
              if path.stat().st_size]
    if not frames:
        return {"trials": 0}
    reports = pd.concat(frames, ignore_index=True)
    epochs = reports.groupby("trial")["epoch"].max()
    later = reports[reports["epoch"] >= 2]  # epoch 1 holds the warm-up and the capture
    return {"trials": len(epochs), "epochs_median": float(epochs.median()), "epochs_max": int(epochs.max()),
            "step_mode": reports["step_mode"].value_counts().to_dict(),
            "img_per_s_median": round(float(later["img_per_s"].median()), 1) if len(later) else None,
            "best_fid": round(float(reports["fid"].min()), 3), **cost_split(reports)}


def kept_fid(log: str) -> dict:
    """The kept generator's FID as the search printed it (its finalists scored again on more samples)."""
    found = re.search(r"^best trial \S+: fid ([\d.]+) on (\d+) samples", log, re.M)
    return {"kept_fid": float(found[1]), "kept_fid_samples": int(found[2])} if found else {}


def save(out: Path, records: list[dict]) -> None:
    tmp = out / f"{RECORD}.tmp"
    tmp.write_text(json.dumps({"parts": records, "device": device_name()}, indent=1))
    tmp.replace(out / RECORD)


def device_name() -> str:
    import torch  # late: the dry run needs no CUDA

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


def describe(plan: list[Part]) -> str:
    lines = [f"{part.name:11} at most {part.limit_s:>4g} s: {' '.join(part.command)}" for part in plan]
    return "\n".join(lines + [f"in all at most {sum(p.limit_s for p in plan) / 60:.1f} min"])
