"""`python -m gan_tune.ablation`: the README's quality table, each row given the same wall time on this machine.

Rows (issue 16), every generator scored on the same 10,000 latents (metrics.make_scorer):
- searches, `--minutes` of budget each, on all CPUs: the `balanced` CPU default as it is (`search-now`), and as
  main had it before the issue (`search-before`: 10 trials, no G averaging, no finalists);
- `seed-alone`: the seed recipe (lr_d 2e-4, lr_g 1e-4, latent 100) trained alone in the same CPU setting for
  `--minutes`, all CPUs, its last generator scored;
- ablations of one fixed config (ABLATION_BASE, the search's best before the issue) trained for
  `--ablation-minutes`, one CPU thread each and as many at a time as there are CPUs (as the search packs its
  trials): G averaging on/off, each loss family, spectral norm on/off.
Rows run one after another (the ablations side by side); compare numbers from one run only, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient

from gan_tune import checkpoint, spaces, train
from gan_tune.bench_search import SEED_RECIPE as SEED_VALUES, parent_run_id, run_search
from gan_tune.config import CliParser, TrainConfig
from gan_tune.data import BUNDLED, load_mnist
from gan_tune.metrics import make_scorer
from gan_tune.search import packaged_spaces

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
# The balanced CPU default before issue 16: 10 trials, the ns loss, no G averaging, no finalists.
BEFORE = {"num_samples": 10, "finalists": {"trials": 0}}
BEFORE_BASE = {"loss": "ns", "g_ema": 0.0}


def train_for(cfg: TrainConfig, seconds: float, threads: int) -> tuple[torch.nn.Module, int]:
    """Train until the next epoch would end past `seconds`; the generator that would be scored and its epochs."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    data = load_mnist(cfg.data_source, cfg.data_dir, cfg.subset)
    gan, generator = train.make_gan(cfg, device), train.make_generator(cfg, device)
    started, epoch = time.monotonic(), 0
    for record in train.fit(gan, data.images, generator):
        epoch = record["epoch"]
        elapsed = time.monotonic() - started
        if elapsed * (epoch + 1) / epoch > seconds or record["balance"] == "diverged":
            break
    return gan.eval_generator(), epoch


def score(g: torch.nn.Module, latent_dim: int) -> dict[str, float]:
    data = load_mnist(BUNDLED, TrainConfig().data_dir, 0)
    return make_scorer(data, torch.device("cpu"), SAMPLES)(g, latent_dim)


def training_row(name: str, cfg: TrainConfig, seconds: float, threads: int) -> dict:
    started = time.monotonic()
    g, epochs = train_for(cfg, seconds, threads)
    wall = time.monotonic() - started
    return {"row": name, **score(g, cfg.latent_dim), "wall_s": round(wall), "trials": 1, "epochs": epochs}


def search_row(name: str, space: Path, seconds: float, folder: Path) -> dict:
    """One `python -m gan_tune.search` run; its kept generator (the best trial's checkpoint) scored again here."""
    uri, slug = f"sqlite:///{folder}/mlflow.db", name.replace(" ", "-")
    done, started = run_search(space, seconds, slug, folder / "ray_results", uri, folder / f"{slug}.log")
    wall = time.time() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name}: search exited {done.returncode}; see {folder}")
    tags = MlflowClient(uri).get_run(parent_run_id(done.stdout)).data.tags
    g, cfg = kept_generator(Path(tags["best.path"]), int(tags["best.epoch"]))
    trials = int(re.search(r"^(\d+) trials, ", done.stdout, re.MULTILINE).group(1))
    return {"row": name, **score(g, cfg.latent_dim), "wall_s": round(wall), "trials": trials, "epochs": cfg.max_epochs}


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
    raw["cpu"] = {**raw["cpu"], **BEFORE}
    raw["base"] = {**raw["base"], **BEFORE_BASE}
    path = folder / "balanced-before.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'row':<22} {'FID 10k':>8} {'IS':>5} {'coverage':>8} {'wall':>7} {'trials':>6} {'epochs':>6}"]
    for r in rows:
        lines.append(f"{r['row']:<22} {r['fid']:>8.1f} {r['is']:>5.2f} {r['coverage']:>8.0f} "
                     f"{spaces.format_duration(r['wall_s']):>7} {r['trials']:>6} {r['epochs']:>6}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m gan_tune.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=14.0, help="budget of each search and the seed row")
    parser.add_argument("--ablation-minutes", type=float, default=5.0, help="wall time of each ablation row")
    parser.add_argument("--rows", default="ablations,seed-alone,search-before,search-now",
                        help="which blocks to run, comma-separated")
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--keep", help="keep the searches' logs, studies and MLflow store in this folder "
                                       "(default: a temporary folder, removed at the end)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    blocks, rows = args.rows.split(","), []
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if "ablations" in blocks:
            with ProcessPoolExecutor(cpus, mp_context=get_context("spawn")) as pool:
                jobs = [pool.submit(training_row, name, replace(ABLATION_BASE, **change), args.ablation_minutes * 60, 1)
                        for name, change in ABLATIONS.items()]
                rows += [job.result() for job in jobs]
            print(format_rows(rows), flush=True)
        if "seed-alone" in blocks:
            rows.append(training_row("seed recipe alone", SEED_RECIPE, args.minutes * 60, cpus))
            print(format_rows(rows[-1:]), flush=True)
        for block, space in (("search-before", before_space(folder)), ("search-now", packaged_spaces() / "balanced.yaml")):
            if block in blocks:
                rows.append(search_row(block, space, args.minutes * 60, folder))
                print(format_rows(rows[-1:]), flush=True)
    print(f"\n{SAMPLES} samples per score, {cpus} CPUs\n{format_rows(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
