"""gan_tune.ablation: the rows of the README's quality table (the full table is a ~1 h run; these check its parts)."""

import time

import yaml

from gan_tune import ablation, spaces
from gan_tune.config import TrainConfig
from gan_tune.data import BUNDLED


def test_the_before_row_is_the_balanced_cpu_default_as_it_was(tmp_path):
    space = spaces.for_cpu(spaces.load_space(ablation.before_space(tmp_path)))
    assert space.num_samples == 10 and space.finalists["trials"] == 0
    assert (space.base["loss"], space.base["g_ema"]) == ("ns", 0.0)
    now = spaces.for_cpu(spaces.load_space(ablation.packaged_spaces() / "balanced.yaml"))
    assert now.num_samples is None and (now.base["loss"], now.base["g_ema"]) == ("hinge", 0.999)
    shipped = spaces.load_space(ablation.packaged_spaces() / "balanced.yaml").raw
    assert yaml.safe_load((tmp_path / "balanced-before.yaml").read_text())["search"] == shipped["search"]


def test_a_training_row_stops_before_its_wall_time_and_scores_the_evaluated_generator(monkeypatch):
    monkeypatch.setattr(ablation, "SAMPLES", 500)
    cfg = TrainConfig(**{**ablation.CPU_SETTING, "subset": 512, "latent_dim": 16, "g_ema": 0.9})
    started = time.monotonic()
    row = ablation.training_row("tiny", cfg, seconds=4, threads=1)
    assert time.monotonic() - started < 60
    assert row["row"] == "tiny" and row["fid_samples"] == 500 and row["epochs"] >= 1 and row["wall_s"] <= 10
    assert 0 < row["fid"] < 5000 and 1 <= row["coverage"] <= 10
    assert "tiny" in ablation.format_rows([row]) and cfg.data_source == BUNDLED
