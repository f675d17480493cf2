"""The files a run leaves for people to look at: sample grids, a GIF of them, the history plot and table.

The single-run CLI writes them into its run folder, the Ray Tune trainable into its trial folder,
and MLflow tracking uploads the same files, so every place shows the same pictures.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and Ray workers without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from gan_tune.training.config import BALANCED_BAND, WARN_ABOVE, WARN_BELOW  # noqa: E402

GRID_ROWS = 8
SAMPLES = "samples"  # the folder of per-epoch grids, in run folders, trial folders and MLflow
MAX_GIF_FRAMES = 50  # bounds the GIF's size however long the run
GIF_FRAME_MS = 400


def save_grid(images: Tensor, path: str | Path) -> Path:
    """An 8-per-row grid of images in [-1, 1]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images.detach().cpu(), nrow=GRID_ROWS, padding=2, normalize=True, value_range=(-1, 1))
    save_image(grid, path)
    return path


def grid_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.png"


def write_gif(frames: list[Path], path: str | Path, max_frames: int = MAX_GIF_FRAMES) -> Path | None:
    """A GIF of the sample grids in order, keeping at most `max_frames` evenly spaced ones (last included)."""
    if not frames:
        return None
    if len(frames) > max_frames:
        step = (len(frames) - 1) / (max_frames - 1)
        frames = [frames[round(i * step)] for i in range(max_frames)]
    images = [Image.open(f).convert("P") for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)
    return Path(path)


def write_summary(folder: Path, images: Tensor, history: list[dict]) -> None:
    """The files that sum a run up so far: the latest grid, the history table and plot, the GIF of the grids."""
    save_grid(images, folder / "final_grid.png")
    write_history(history, folder / "history.csv")
    plot_history(history, folder / "history.png")
    write_gif(sorted((folder / SAMPLES).glob("epoch_*.png")), folder / "progress.gif")


def history_frame(history: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(history).set_index("epoch") if history else pd.DataFrame()


def write_history(history: list[dict], csv_path: str | Path) -> Path:
    history_frame(history).to_csv(csv_path)
    return Path(csv_path)


def plot_history(history: list[dict], path: str | Path) -> Path:
    """Losses, D accuracy with the balance bands shaded, and FID where it was measured."""
    frame = history_frame(history)
    has_fid = "fid" in frame and frame["fid"].notna().any()
    fig, axes = plt.subplots(1, 3 if has_fid else 2, figsize=(15 if has_fid else 10, 4), constrained_layout=True)
    frame[["loss_d", "loss_g"]].plot(ax=axes[0], marker="o", title="losses")
    ax = axes[1]
    ax.axhspan(*BALANCED_BAND, color="tab:green", alpha=0.15, label="balanced 40-70 %")
    ax.axhspan(0, WARN_BELOW, color="tab:red", alpha=0.08, label="warn: D too weak / strong")
    ax.axhspan(WARN_ABOVE, 1, color="tab:red", alpha=0.08)
    frame[["d_acc", "d_acc_real", "d_acc_fake"]].plot(ax=ax, marker="o", title="D accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="best", fontsize=8)
    if has_fid:
        frame["fid"].dropna().plot(ax=axes[2], marker="o", color="tab:purple", title="FID (MNIST-classifier features, lower is better)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
