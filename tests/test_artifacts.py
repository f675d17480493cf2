import torch
from PIL import Image

from gan_tune.training import artifacts

README_GIF_FRAMES = 50  # README, Outputs and Disk: "a GIF of at most 50 of those grids"


def run_folder(tmp_path, epochs: int):
    """A run folder with one real sample grid per epoch (different noise each, so no two frames are alike)."""
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        images = torch.rand(8, 1, 28, 28, generator=gen) * 2 - 1
        artifacts.save_grid(images, tmp_path / artifacts.SAMPLES / artifacts.grid_name(epoch))
    history = [{"epoch": e, "loss_d": 1.0, "loss_g": 1.0, "d_acc_real": 0.5, "d_acc_fake": 0.5, "d_acc": 0.5,
                "balance": "balanced"}
               for e in range(1, epochs + 1)]
    artifacts.write_summary(tmp_path, images, history)
    return Image.open(tmp_path / "progress.gif")


def test_the_progress_gif_of_a_long_run_keeps_50_grids(tmp_path):
    assert run_folder(tmp_path, 80).n_frames == README_GIF_FRAMES


def test_the_progress_gif_of_a_short_run_keeps_every_grid(tmp_path):
    assert run_folder(tmp_path, 7).n_frames == 7
