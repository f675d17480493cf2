"""Throughput benchmark behind `python -m gan_tune.bench [--device cuda|cpu] [--quick] [--json OUT]`
(`bench search`, the search strategies' benchmark, is benchmarks/strategies.py).

Prints one table measured in one run, side by side:
  (a) a typical seed-style loop (DataLoader, `.item()` every step, fp32): the reference;
  (b) gan_tune eager fp32; (c) gan_tune CUDA graph TF32; (d) CUDA graph bf16;
per-trial training images/s for each model family and batch size, with the ratio to (a);
then (e) aggregate images/s of a packed Ray Tune search, (f) FID scoring time for 10k samples,
(g) peak GPU memory per trial, (h) quality parity: eager vs graph losses over the first steps and
eager fp32 vs graph bf16 FID after the same epochs with the same seed. (c), (d) and (g) need CUDA
and are skipped on a CPU, where (h) is off by default (--parity-epochs). (j) `cohort`, with --cohort: aggregate
images/s of K members trained as one fused model (training.cohort) against one ordinary trial.
It imports the same models and loop as training (nanoGPT's bench.py idea), so it never forks them.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace

import pandas as pd
import torch
from ray import tune
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from gan_tune.quality.scorer import DEFAULT_BATCH_SIZE, batch_for, make_scorer
from gan_tune.training import cohort, cohort_step, loop, step
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import Mnist, to_float
from gan_tune.training.models import build_models

MODES = {  # name -> TrainConfig overrides; None marks the reference loop
    "a typical loop": None,
    "b eager fp32": {"cuda_graph": False, "precision": "fp32"},
    "c graph tf32": {"cuda_graph": True, "precision": "fp32"},
    "d graph bf16": {"cuda_graph": True, "precision": "bf16"},
}
CUDA_ONLY = {"c graph tf32", "d graph bf16"}


def typical_loop(cfg: TrainConfig, data: Mnist, device: torch.device, steps: int) -> float:
    """The seed-style loop most GAN code runs: a DataLoader per step, `.item()` syncs, fp32. Images/s."""
    torch.manual_seed(cfg.seed)
    g, d = (m.to(device) for m in build_models(cfg))
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    loader = DataLoader(TensorDataset(to_float(data.images)), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    done, start, history = 0, 0.0, []
    while done < steps:
        for (real,) in loader:
            if done == 1:
                start = time.perf_counter()  # first step warms up allocators and kernels
            real = real.to(device)
            z = torch.randn(real.shape[0], cfg.latent_dim, device=device)
            fake = g(z)
            out_real, out_fake = d(real), d(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(out_real, torch.ones_like(out_real)) \
                + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            out = d(fake)
            loss_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            history.append((loss_d.item(), loss_g.item()))  # the per-step syncs typical code has
            done += 1
            if done == steps:
                break
    return (steps - 1) * cfg.batch_size / (time.perf_counter() - start)


def gan_tune_loop(cfg: TrainConfig, data: Mnist, device: torch.device, steps: int) -> tuple[float, float]:
    """gan_tune's own loop: one warm-up epoch (includes graph capture), then one timed epoch.

    Returns (images/s, peak GPU memory in MiB or nan)."""
    cfg = replace(cfg, steps_per_epoch=steps)
    gan, generator = step.make_gan(cfg, device), loop.make_generator(cfg, device)
    images = data.images.to(device)
    loop.train_epoch(gan, images, generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    img_per_s = loop.train_epoch(gan, images, generator)["img_per_s"]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return img_per_s, peak


def trial_table(device: torch.device, data: Mnist, models: list[str], batches: list[int], steps: int) -> pd.DataFrame:
    rows = []
    for model in models:
        for batch in batches:
            cfg = TrainConfig(model=model, batch_size=batch, device=str(device))
            row, cell_steps = {"model": model, "batch": batch}, max(2, steps * 128 // batch)  # same images per cell
            for mode, overrides in MODES.items():
                if mode in CUDA_ONLY and device.type != "cuda":
                    continue
                if overrides is None:
                    row[mode] = typical_loop(cfg, data, device, cell_steps)
                else:
                    row[mode], row[f"peak MiB {mode[0]}"] = gan_tune_loop(replace(cfg, **overrides), data, device,
                                                                          cell_steps)
            rows.append(row)
            print(f"  measured {model} batch {batch}", file=sys.stderr)
    frame = pd.DataFrame(rows)
    for mode in MODES:
        if mode in frame and mode != "a typical loop":
            frame[f"x {mode[0]}"] = frame[mode] / frame["a typical loop"]
    return frame


FID_WIDTHS = (1.0, 0.25)  # the balanced recipe, and the width the CPU default search trains


def fid_timing(device: torch.device, data: Mnist, n_samples: int) -> dict:
    """Seconds to generate and score n_samples images with the balanced generator at each FID_WIDTHS
    (real statistics cached; the scorer's copy of G and the classifier run in channels_last)."""
    score = make_scorer(data, device, n_samples)
    # two full batches warm up every kernel shape the timed call runs (cuDNN autotunes per shape)
    warm_up = make_scorer(data, device, min(n_samples, 2 * batch_for(device, DEFAULT_BATCH_SIZE)))
    timings = {"fid_samples": n_samples}
    for width in FID_WIDTHS:
        g, _ = build_models(TrainConfig(width=width))
        g = g.to(device)
        warm_up(g, 100)  # lazy initialisation and autotuning happen here, outside the timed call
        start = time.perf_counter()
        score(g, 100)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[f"fid_seconds width {width:g}"] = round(time.perf_counter() - start, 2)
    return timings


PARITY_STEPS = 10  # loss parity compares the first steps, before chaotic GAN dynamics amplify rounding


def quality_parity(device: torch.device, data: Mnist, base: TrainConfig) -> dict:
    """(h) Same seed, same work: do the fast paths train the same GAN as eager fp32?

    Losses: the mean D and G loss of the first PARITY_STEPS steps, eager vs CUDA graph (both TF32 on
    CUDA), as relative differences. Quality: FID after base.max_epochs epochs, eager fp32 vs graph bf16
    (the target: within 10 %). Each path's step_mode is reported: on a CPU all run eagerly.
    """
    out, first, images = {}, {}, data.images.to(device)
    for mode in ("b eager fp32", "c graph tf32"):
        cfg = replace(base, **MODES[mode], steps_per_epoch=PARITY_STEPS)
        gan, generator = step.make_gan(cfg, device), loop.make_generator(cfg, device)
        first[mode] = loop.train_epoch(gan, images, generator)
        out[f"step_mode {mode[0]}"] = first[mode]["step_mode"]
    for key in ("loss_d", "loss_g"):
        b, c = first["b eager fp32"][key], first["c graph tf32"][key]
        out[f"{key} rel diff c vs b"] = float(f"{abs(c - b) / abs(b):.2e}")
    score = make_scorer(data, device, base.fid_samples)
    for mode in ("b eager fp32", "d graph bf16"):
        cfg = replace(base, **MODES[mode], eval_every=base.max_epochs)
        gan, generator = step.make_gan(cfg, device), loop.make_generator(cfg, device)
        start = time.perf_counter()
        *_, last = loop.fit(gan, images, generator, scorer=score)
        out[f"fid {mode}"] = round(last.get("fid", float("nan")), 2)  # no fid: diverged before the end
        out[f"seconds {mode}"] = round(time.perf_counter() - start, 1)
        out[f"step_mode {mode[0]}"] = last["step_mode"]
    out["parity_epochs"] = base.max_epochs
    out["fid d / fid b"] = round(out["fid d graph bf16"] / out["fid b eager fp32"], 3)
    return out


class EpochClock(tune.Callback):
    """A Tune callback in the driver that times each trial's epochs.

    An epoch spans [arrival - epoch_time_s, arrival]; the arrival lags the epoch's end by one report
    (milliseconds), so windows built from these times are exact to well under an epoch.
    """

    def __init__(self):
        self.epochs: list[dict] = []  # trial, epoch, start, end, images

    def on_trial_result(self, iteration, trials, trial, result, **info):
        end, seconds = time.time(), result["epoch_time_s"]
        self.epochs.append({"trial": trial.trial_id, "epoch": result["epoch"], "start": end - seconds,
                            "end": end, "images": result["img_per_s"] * seconds})


def packed_aggregate(epochs: pd.DataFrame, fit_start: float) -> dict:
    """Aggregate images/s while every trial trains, and the per-trial set-up time: from the search's
    start (time.time()) to the trial's first epoch (Ray actor, imports, data to the device, models).

    Epoch 1 holds warm-up and graph capture, so it counts as set-up. The window runs from the moment
    the last trial began its epoch 2 to the moment the first trial finished its last epoch: inside
    it all trials train at once, so images trained in it / its length is what the packing delivers
    (summing per-trial rates would also count trials that ran alone while others were starting).
    """
    timed = epochs[epochs["epoch"] >= 2].assign(seconds=epochs["end"] - epochs["start"])
    window_start = timed.groupby("trial")["start"].min().max()
    window_end = timed.groupby("trial")["end"].max().min()
    if window_end <= window_start:  # trials started too far apart for their epochs' length
        return {"aggregate_img_per_s": float("nan"), "note": "the trials never trained at the same time"}
    inside = (timed["end"].clip(upper=window_end) - timed["start"].clip(lower=window_start)).clip(lower=0)
    images = (timed["images"] * inside / timed["seconds"]).sum()  # each epoch's share in the window
    per_trial = timed.groupby("trial")[["images", "seconds"]].sum()
    first = epochs[epochs["epoch"] == 1]
    return {"aggregate_img_per_s": round(float(images / (window_end - window_start)), 1),
            "sum_of_trial_img_per_s": round(float((per_trial["images"] / per_trial["seconds"]).sum()), 1),
            "concurrent_window_s": round(float(window_end - window_start), 2),
            "trial_setup_s_median": round(float((first["start"] - fit_start).median()), 2),
            "first_epoch_s_median": round(float((first["end"] - first["start"]).median()), 2)}


def packed_search(trials: int, device: torch.device, data: Mnist, steps: int, epochs: int = 4,
                  model: str = "balanced") -> dict:
    """Aggregate images/s of `trials` concurrent Ray Tune trials sharing the device (1/trials GPU each),
    with Ray's start-up time and each trial's set-up time (process, data, models: start to first epoch)."""
    import os
    import tempfile

    import ray

    from gan_tune.tuning.trainable import train_gan

    start = time.perf_counter()
    # address="local": a Ray of its own, never a cluster someone else started on this machine (ray.init would
    # join the latest one it finds, and then refuses num_cpus)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - start
    cpus = max(1, (os.cpu_count() or 1) // trials)
    resources = {"cpu": cpus, "gpu": 1 / trials if device.type == "cuda" else 0}
    space = {**TrainConfig(model=model, steps_per_epoch=steps, max_epochs=epochs, eval_every=0, checkpoint_every=epochs,
                           sample_every=epochs, data_source=data.source).to_dict(),
             "seed": tune.grid_search(list(range(trials)))}
    clock = EpochClock()
    try:
        with tempfile.TemporaryDirectory() as storage:
            fit_start, fit_start_clock = time.perf_counter(), time.time()
            tune.Tuner(tune.with_resources(tune.with_parameters(train_gan, data=data), resources),
                       param_space=space,
                       run_config=tune.RunConfig(storage_path=storage, verbose=0, callbacks=[clock])).fit()
            fit_s = time.perf_counter() - fit_start
    finally:
        ray.shutdown()
    return {**packed_aggregate(pd.DataFrame(clock.epochs), fit_start_clock), "ray_start_s": round(ray_start_s, 2),
            "search_wall_s": round(fit_s, 2), "cpus_per_trial": cpus, "gpu_per_trial": resources["gpu"]}


def best_packing(aggregates: dict[int, float]) -> int | None:
    """The trial count with the highest aggregate; counts whose trials never overlapped (NaN) cannot win,
    which max() alone would let happen (nothing compares greater than NaN)."""
    measured = {n: rate for n, rate in aggregates.items() if not math.isnan(rate)}
    return max(measured, key=measured.get) if measured else None


COST_COLUMNS = {"train_s": "epoch_time_s", "score_s": "score_s", "files_s": "files_s", "report_s": "report_s"}


def cost_split(reports: pd.DataFrame) -> dict:
    """Mean seconds per epoch spent training, scoring, writing the trial's files and reporting (with the
    checkpoints), and training's share of their sum. Epoch 1 (warm-up, graph capture) is left out; report_s is
    the previous epoch's report, so the last report's own is not counted."""
    later = reports[reports["epoch"] >= 2]
    means = {name: float(later[column].mean()) for name, column in COST_COLUMNS.items()}
    total = sum(means.values())
    return {**{name: round(value, 4) for name, value in means.items()},
            "train_share": round(means["train_s"] / total, 3) if total else float("nan")}


def balanced_plan(device: torch.device):
    """The balanced space as a search on this device runs it: as written with a GPU, its cpu block merged in
    without one (imported here: the bench's other parts need no Ray Tune)."""
    from gan_tune.tuning.space_files import resolve_space
    from gan_tune.tuning.spaces import for_cpu, load_space

    space = load_space(resolve_space("balanced"))
    return space if device.type == "cuda" else for_cpu(space)


def trial_costs(device: torch.device, data: Mnist, epochs: int, steps: int = 0) -> dict:
    """One Tune trial of the balanced space with this device's settings (its cpu block without a GPU):
    where an epoch's time goes (cost_split). `steps` > 0 shortens the epochs (a quick CPU run)."""
    import tempfile

    import ray

    from gan_tune.training.config import from_dict
    from gan_tune.tuning.trainable import train_gan

    plan = balanced_plan(device)
    # the trial trains on `data` (the trainable takes it through the object store), whatever data_source says
    cfg = from_dict({**plan.train_fields, "max_epochs": epochs, "steps_per_epoch": steps, "device": device.type})
    resources = {"cpu": plan.resources["cpu"], "gpu": 1 if device.type == "cuda" else 0}
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            trainable = tune.with_resources(tune.with_parameters(train_gan, data=data, quiet=True), resources)
            result = tune.Tuner(trainable, param_space=cfg.to_dict(),
                                run_config=tune.RunConfig(storage_path=storage, verbose=0)).fit()[0]
            reports = result.metrics_dataframe
    finally:
        if started:
            ray.shutdown()
    return {**cost_split(reports), "epochs": epochs, "checkpoint_every_s": cfg.checkpoint_every_s,
            "sample_every": cfg.sample_every, "fid_samples": int(reports["fid_samples"].iloc[-1])}


COHORT_RATES = (1e-4, 2e-4, 5e-4, 1e-3)  # members differ in what fuses: lr_d cycles through these, seed is k


def cohort_throughput(device: torch.device, data: Mnist, sizes: list[int], steps: int, width: float = 0.25,
                      batch: int = 64, repeats: int = 3, graph: bool = False) -> dict:
    """(j) Aggregate training images/s of cohorts of each size in `sizes` against one ordinary trial of the same
    settings (the balanced model, fp32, both eager or both in their CUDA graph), so `x one trial` says how many
    times more settings per minute a cohort trains. After a warm-up epoch each, epochs of `steps` iterations take turns
    (the trial, then each cohort) `repeats` times and each keeps its best: on a shared machine the others'
    load comes and goes, and interleaving gives every contender the same chances."""
    base = TrainConfig(width=width, batch_size=batch, steps_per_epoch=steps, device=str(device), cuda_graph=graph)
    images = data.images.to(device)
    trial, trial_generator = step.make_gan(base, device), loop.make_generator(base, device)
    cohorts = {}
    for k in sizes:
        members = cohort.make_cohort([replace(base, seed=i, lr_d=COHORT_RATES[i % len(COHORT_RATES)])
                                      for i in range(k)], device)
        cohorts[k] = (members, cohort_step.make_generators(members))
    runs = {"one trial": lambda: loop.train_epoch(trial, images, trial_generator)["img_per_s"]}
    for k, (members, generators) in cohorts.items():
        runs[f"cohort {k}"] = lambda m=members, g=generators: cohort_step.train_cohort_epoch(m, images, g)[0][
            "cohort_img_per_s"]
    best = {name: run() * 0.0 for name, run in runs.items()}  # the warm-up epochs: allocators, kernels
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    out: dict = {"model": "balanced", "width": width, "batch": batch, "step": trial.step_mode,
                 "one trial img/s": round(best["one trial"], 1)}
    for k in sizes:
        out[f"cohort {k} step"] = cohorts[k][0].step_mode  # "eager" if its graph capture failed
        out[f"cohort {k} img/s"] = round(best[f"cohort {k}"], 1)
        out[f"cohort {k} x one trial"] = round(best[f"cohort {k}"] / best["one trial"], 2)
    return out
