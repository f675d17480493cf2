"""`python -m gan_tune.ablation`: the README's quality table, each row given the same wall time on this machine.

Rows (issue 16), every generator scored on the same 10,000 latents (quality.scorer.make_scorer):
- searches, `--minutes` of budget each, on all CPUs: the `balanced` CPU default as it is (`search-now`), and as
  main had it before the issue (`search-before`: 10 trials of up to 20 epochs, ns loss, no G averaging, no R1,
  no finalists);
- `seed-alone`: the seed recipe (lr_d 2e-4, lr_g 1e-4, latent 100) trained alone in the same CPU setting for
  `--minutes`, all CPUs, its last generator scored;
- ablations of one fixed config (ABLATION_BASE, the search's best before the issue) trained for
  `--ablation-minutes`, one CPU thread each and as many at a time as there are CPUs (as the search packs its
  trials): G averaging on/off, each loss family, spectral norm on/off;
- `long` (not in the default run): the same config and variants (LONG) trained for the whole `--minutes` on one
  thread each, also scored at a third and two thirds of it: what a trial gains from training longer.
Rows run one after another (the ablations side by side); compare numbers from one run only, on a quiet machine.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient

from gan_tune.benchmarks.strategies import SEED_RECIPE as SEED_VALUES
from gan_tune.benchmarks.strategies import parent_run_id, run_search
from gan_tune.quality.scorer import make_scorer
from gan_tune.training import checkpoint, loop, step
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import BUNDLED, load_mnist
from gan_tune.tuning import space_values, spaces
from gan_tune.tuning.space_files import packaged_spaces

SAMPLES = 10_000
CPU_SETTING = dict(model="balanced", width=0.25, batch_size=64, data_source=BUNDLED, eval_every=0, sample_every=10**6,
                   checkpoint_every=10**6, max_epochs=spaces.UNTIL_BUDGET_EPOCHS)
SEED_RECIPE = TrainConfig(**CPU_SETTING, **SEED_VALUES)
# The best trial of the balanced CPU default on a fresh clone of main before issue 16 (the numbers).
ABLATION_BASE = TrainConfig(**CPU_SETTING, lr_d=6.5e-4, lr_g=8.2e-4, latent_dim=32, beta1=0.5)
ABLATIONS = {
    "ns": {},
    "ns + ema": {"g_ema": 0.999},
    "hinge + ema": {"loss": "hinge", "g_ema": 0.999},
    "ls + ema": {"loss": "ls", "g_ema": 0.999},
    "wgan-gp + ema": {"loss": "wgan-gp", "d_norm": "none", "g_ema": 0.999},
    "ns + ema + spectral": {"d_norm": "spectral", "g_ema": 0.999},
}
# One config trained for the whole --minutes on one thread (as the search's longest trial runs), scored along the
# way: does it keep improving past the 5-minute ablations, and which change keeps it improving?
LONG = {
    "hinge + ema": {"loss": "hinge", "g_ema": 0.999},
    "hinge + ema, 2x lr": {"loss": "hinge", "g_ema": 0.999, "lr_d": 1.3e-3, "lr_g": 1.64e-3},
    "hinge + ema + spectral": {"loss": "hinge", "g_ema": 0.999, "d_norm": "spectral"},
    "hinge + ema + r1 1.0": {"loss": "hinge", "g_ema": 0.999, "r1_gamma": 1.0},
}
LONG_MARKS = (1 / 3, 2 / 3)  # shares of --minutes at which the long rows are also scored
# Issue 26: the CPU default's config (hinge, g_ema, R1) for the whole --minutes, with and without DiffAugment on
# every image D sees, and with ADA's adaptive probability; then its capacity (width, batch) at equal wall time.
CPU_DEFAULT = {"loss": "hinge", "g_ema": 0.999, "r1_gamma": 1.0}
AUGMENT = {
    "hinge + ema + r1": CPU_DEFAULT,
    "+ diffaugment translation,cutout": {**CPU_DEFAULT, "augment": "translation,cutout"},
    "+ diffaugment, adaptive p (ada 0.6)": {**CPU_DEFAULT, "augment": "translation,cutout", "augment_p": 0.0,
                                            "augment_target": 0.6},
}
CAPACITY = {f"width {width:g}, batch {batch}": {**CPU_DEFAULT, "width": width, "batch_size": batch}
            for width in (0.25, 0.375, 0.5) for batch in (32, 64, 128)}
# Lazy R1 (StyleGAN2's interval, 16) against R1 on every iteration, at today's CPU batch and beta1.
LAZY_R1_BASE = {**CPU_DEFAULT, "batch_size": 32, "beta1": 0.0}
LAZY_R1 = {"r1 every iteration, batch 32": LAZY_R1_BASE, "lazy r1 (r1_every 16), batch 32": {**LAZY_R1_BASE, "r1_every": 16}}
# The balanced CPU default before issue 16: 10 trials of up to 20 epochs, the ns loss, no G averaging, no R1,
# no finalists.
BEFORE = {"num_samples": 10, "max_epochs": 20, "finalists": {"trials": 0}}
BEFORE_BASE = {"loss": "ns", "g_ema": 0.0, "r1_gamma": 0.0}


def train_for(cfg: TrainConfig, seconds: float, threads: int,
              marks: tuple[float, ...] = ()) -> tuple[torch.nn.Module, int, list[dict]]:
    """Train until the next epoch would end past `seconds` of training; the generator that would be scored, its
    epochs, and its scores when the training time first passes each of `marks` (seconds; scoring not counted)."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    data = load_mnist(cfg.data_source, cfg.data_dir, cfg.subset)
    gan, generator = step.make_gan(cfg, device), loop.make_generator(cfg, device)
    trained, epoch, curve, started = 0.0, 0, [], time.monotonic()
    for record in loop.fit(gan, data.images, generator):
        epoch, trained = record["epoch"], trained + time.monotonic() - started
        if len(curve) < len(marks) and trained >= marks[len(curve)]:
            curve.append({"training_s": round(trained, 1), "epoch": epoch, **score(gan.eval_generator(), cfg.latent_dim)})
        if trained * (epoch + 1) / epoch > seconds or record["balance"] == "diverged":
            break
        started = time.monotonic()
    return gan.eval_generator(), epoch, curve


def score(g: torch.nn.Module, latent_dim: int) -> dict[str, float]:
    data = load_mnist(BUNDLED, TrainConfig().data_dir, 0)
    return make_scorer(data, torch.device("cpu"), SAMPLES)(g, latent_dim)


def training_row(name: str, cfg: TrainConfig, seconds: float, threads: int, marks: tuple[float, ...] = ()) -> dict:
    """One config trained for `seconds` and scored; with `marks`, also its scores along the way (`curve`)."""
    started = time.monotonic()
    g, epochs, curve = train_for(cfg, seconds, threads, marks)
    wall = time.monotonic() - started
    return {"row": name, **score(g, cfg.latent_dim), "wall_s": round(wall), "trials": 1, "epochs": epochs,
            **({"curve": curve} if marks else {})}


def side_by_side(changes: dict[str, dict], prefix: str, seconds: float, cpus: int,
                 marks: tuple[float, ...] = ()) -> list[dict]:
    """`training_row` for ABLATION_BASE with each change, one thread each, `cpus` at a time (as a search packs)."""
    with ProcessPoolExecutor(cpus, mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(training_row, prefix + name, replace(ABLATION_BASE, **change), seconds, 1, marks)
                for name, change in changes.items()]
        return [job.result() for job in jobs]


def search_row(name: str, space: Path, seconds: float, folder: Path) -> dict:
    """One `python -m gan_tune.search` run; its kept generator (the best trial's checkpoint) scored again here."""
    uri, slug = f"sqlite:///{folder}/mlflow.db", name.replace(" ", "-")
    done, started = run_search(space, seconds, slug, folder / "ray_results", uri, folder / f"{slug}.log")
    wall = time.time() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name}: search exited {done.returncode}; see {folder}")
    tags = MlflowClient(uri).get_run(parent_run_id(done.stdout)).data.tags
    g, cfg = kept_generator(Path(tags["best.path"]), int(tags["best.epoch"]))
    return {"row": name, **score(g, cfg.latent_dim), "wall_s": round(wall), "trials": trials_ran(done.stdout),
            "epochs": cfg.max_epochs}


def trials_ran(stdout: str) -> int:
    """The trial count of a search's summary ("N trials, ..." or "N trials (M more never reported ...), ...")."""
    return int(re.search(r"^(\d+) trials?\b", stdout, re.MULTILINE).group(1))


def kept_generator(trial_dir: Path, epoch: int) -> tuple[torch.nn.Module, TrainConfig]:
    """The generator of the trial's kept checkpoint of `epoch` (max_epochs set to that epoch)."""
    for folder in sorted(trial_dir.glob("checkpoint_*")):
        saved = checkpoint.read(folder)
        if saved["epoch"] == epoch:
            g, cfg = checkpoint.rebuild_generator(saved, str(folder))
            return g, replace(cfg, max_epochs=epoch)
    raise FileNotFoundError(f"{trial_dir}: no kept checkpoint of epoch {epoch}")


def before_space(folder: Path) -> Path:
    raw = yaml.safe_load((packaged_spaces() / "balanced.yaml").read_text())
    raw["cpu"] = {**raw["cpu"], **BEFORE, "base": {**raw["cpu"]["base"], **BEFORE_BASE}}
    raw["base"] = {**raw["base"], **BEFORE_BASE}
    path = folder / "balanced-before.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'row':<30} {'FID 10k':>8} {'IS':>5} {'coverage':>8} {'wall':>7} {'trials':>6} {'epochs':>6}"]
    for r in rows:
        along = "".join(f"  {p['fid']:.1f} at {space_values.format_duration(p['training_s'])} (epoch {p['epoch']})"
                        for p in r.get("curve", []))
        lines.append(f"{r['row']:<30} {r['fid']:>8.1f} {r['is']:>5.2f} {r['coverage']:>8.0f} "
                     f"{space_values.format_duration(r['wall_s']):>7} {r['trials']:>6} {r['epochs']:>6}{along}")
    return "\n".join(lines)
