"""gan_tune.ablation: the rows of the README's quality table (the full table is a ~1 h run; these check its parts)."""

import time
import types

import yaml

from gan_tune.benchmarks import quality_table
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import BUNDLED
from gan_tune.tuning import space_files, spaces


def test_the_before_row_is_the_balanced_cpu_default_as_it_was(tmp_path):
    space = spaces.for_cpu(spaces.load_space(quality_table.before_space(tmp_path)))
    assert space.num_samples == 10 and space.max_epochs == 20 and space.finalists["trials"] == 0
    assert (space.base["loss"], space.base["g_ema"], space.base["r1_gamma"]) == ("ns", 0.0, 0.0)
    now = spaces.for_cpu(spaces.load_space(space_files.packaged_spaces() / "balanced.yaml"))
    assert now.num_samples is None and now.max_epochs == 120
    assert (now.base["loss"], now.base["g_ema"], now.base["r1_gamma"]) == ("hinge", 0.999, 1.0)
    shipped = spaces.load_space(space_files.packaged_spaces() / "balanced.yaml").raw
    assert yaml.safe_load((tmp_path / "balanced-before.yaml").read_text())["search"] == shipped["search"]


def test_a_training_row_stops_before_its_wall_time_and_scores_the_evaluated_generator(monkeypatch):
    """ablation reads a clock that moves 1 s per read: train_for reads it at each epoch's start and end, so an epoch
    trains for 1 s, and the stop and the mark are events of the training, not of this machine's speed."""
    reads = iter(range(10**6))
    monkeypatch.setattr(quality_table, "time", types.SimpleNamespace(monotonic=lambda: float(next(reads)), time=time.time))
    monkeypatch.setattr(quality_table, "SAMPLES", 500)
    cfg = TrainConfig(**{**quality_table.CPU_SETTING, "subset": 512, "latent_dim": 16, "g_ema": 0.9})
    row = quality_table.training_row("tiny", cfg, seconds=4, threads=1, marks=(2.0,))
    # after epoch 4 (4 s of training) a 5th would end past the 4 s budget: 4 epochs, not 5
    assert row["row"] == "tiny" and row["fid_samples"] == 500 and row["epochs"] == 4
    assert 0 < row["fid"] < 5000 and 1 <= row["coverage"] <= 10
    [mark] = row["curve"]  # scored once along the way, when training passed 2 s, on as many samples
    assert (mark["training_s"], mark["epoch"], mark["fid_samples"]) == (2.0, 2, 500) and 0 < mark["fid"] < 5000
    assert mark["fid"] != row["fid"]  # the mark scored epoch 2's generator, the row epoch 4's
    assert "tiny" in quality_table.format_rows([row]) and f"(epoch {mark['epoch']})" in quality_table.format_rows([row])
    assert cfg.data_source == BUNDLED


def test_the_trial_count_is_read_from_either_form_of_the_search_summary():
    """summary.summarise prints "N trials, ..." or, when queued trials never reported, "N trials (M more ...), ..."."""
    assert quality_table.trials_ran("x\n23 trials, 0 errored; results in rr (1 MiB)\nbudget: ...") == 23
    assert quality_table.trials_ran("2 trials (2 more never reported: queued, or cut by the budget), 0 errored; ...") == 2


def test_the_augment_and_capacity_blocks_are_valid_configs_of_the_cpu_default():
    from dataclasses import replace

    for block in (quality_table.AUGMENT, quality_table.CAPACITY):
        for change in block.values():
            cfg = replace(quality_table.ABLATION_BASE, **change)  # TrainConfig validates in __post_init__
            assert (cfg.loss, cfg.g_ema, cfg.r1_gamma) == ("hinge", 0.999, 1.0)
    assert {cfg["augment"] for cfg in quality_table.AUGMENT.values() if "augment" in cfg} == {"translation,cutout"}
    assert len(quality_table.CAPACITY) == 9  # width 0.25 / 0.375 / 0.5 x batch 32 / 64 / 128
