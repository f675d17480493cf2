from pathlib import Path

import pytest
import yaml
from ray.tune.schedulers import (
    ASHAScheduler,
    HyperBandScheduler,
    PopulationBasedTraining,
)
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from gan_tune.training.cohort import MEMBERS_KEY
from gan_tune.training.config import (
    DERIVED_PARAMS,
    FIELD_TYPES,
    ConfigError,
    from_dict,
    resolve_derived,
)
from gan_tune.tuning import schedulers, searchers, space_values, spaces, summary

SPACES_DIR = Path(__file__).parents[1] / "search_spaces"
SHIPPED = ("balanced", "ttur", "pbt", "wide", "smoke", "cohort")


def write_space(tmp_path, raw, name="x"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def smoke_raw():
    return yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_load_and_build_ray_objects(name):
    space = spaces.load_space(SPACES_DIR / f"{name}.yaml")
    for variant in (space, spaces.for_cpu(space)):
        assert set(variant.base) <= set(FIELD_TYPES)
        assert set(variant.search) <= set(FIELD_TYPES) | set(DERIVED_PARAMS)
        schedulers.make_scheduler(variant)
        searchers.make_search_alg(variant, seed=0)
        params = searchers.param_space(variant, seed=0)
        # every trial, or every member of a cohort trial, gets a seed
        assert all("seed" in own for own in params.get(MEMBERS_KEY, [params]))
        from_dict(variant.train_fields)


def test_shipped_spaces_use_the_scheduler_and_search_alg_they_promise():
    load = lambda name: spaces.load_space(SPACES_DIR / f"{name}.yaml")  # noqa: E731
    assert isinstance(schedulers.make_scheduler(load("balanced")), ASHAScheduler)
    assert isinstance(schedulers.make_scheduler(load("pbt")), PopulationBasedTraining)
    assert isinstance(schedulers.make_scheduler(load("wide")), HyperBandScheduler)
    assert isinstance(searchers.make_search_alg(load("ttur"), 0), OptunaSearch)
    assert isinstance(searchers.make_search_alg(load("balanced"), 0), BasicVariantGenerator)
    assert set(load("pbt").scheduler["hyperparam_mutations"]) == {"lr_d", "lr_g"}


def test_balanced_cpu_block_shrinks_the_study_for_a_laptop():
    space = spaces.load_space(SPACES_DIR / "balanced.yaml")
    cpu = spaces.for_cpu(space)
    assert cpu.base["width"] < space.base.get("width", 1.0)
    assert cpu.num_samples is None and cpu.tune_num_samples == -1  # new trials until the budget ends
    assert cpu.time_budget_s <= 15 * 60 < space.time_budget_s
    assert cpu.base["model"] == "balanced"  # merged into base, not replacing it
    assert cpu.resources == {"cpu": 1, "gpu": 1}  # the cpu block sets the CPUs; a GPU share matters only on GPUs


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2.5m", 150)])
def test_durations(text, seconds):
    assert space_values.parse_duration(text, "time_budget", "x") == seconds


@pytest.mark.parametrize("text", ["15", "15x", "m", "", "-5m", "0s", "1 h"])
def test_bad_durations_name_the_key(text):
    with pytest.raises(ConfigError, match="time_budget"):
        space_values.parse_duration(text, "time_budget", "x")


def test_randint_includes_both_bounds():
    domain = space_values.DISTRIBUTIONS["randint"]([1, 5])
    assert {domain.sample() for _ in range(400)} == {1, 2, 3, 4, 5}


def test_lr_ratio_is_resolved_into_lr_d():
    assert resolve_derived({"lr_g": 1.0e-4, "lr_ratio": 4.0, "seed": 3}) == {"lr_g": 1.0e-4, "lr_d": 4.0e-4, "seed": 3}
    space = spaces.load_space(SPACES_DIR / "ttur.yaml")
    assert space.search["lr_ratio"] == ("uniform", [0.5, 8.0])


@pytest.mark.parametrize("change, key", [
    ({"search": {"lr_ratio": {"uniform": [0.5, 8.0]}}}, "search.lr_ratio"),  # needs lr_g
    ({"search": {"lr_g": {"loguniform": [1.0e-5, 1.0e-3]}, "lr_ratio": {"uniform": [1.0, 2.0]},
                 "lr_d": {"loguniform": [1.0e-5, 1.0e-3]}}}, "search.lr_ratio"),  # lr_d set twice
    ({"search": {"latent_dim": {"loguniform": [16, 128]}}}, "search.latent_dim"),  # int field, float samples
    ({"search": {"subset": {"choice": [100, 200]}}}, "search.subset"),  # data is loaded once
    ({"search": {"beta1": {"uniform": [-0.5, 0.5]}}}, "search.beta1"),  # low outside the field's range
    ({"search": {"n_disc": {"randint": [1, 2.5]}}}, "search.n_disc"),
    ({"base": {"max_epochs": 3}}, "base.max_epochs"),
    ({"base": {"lr_d": -1.0}}, "base.lr_d"),
    ({"base": {"eval_every": 0}}, "base.eval_every"),
    ({"mode": "max"}, "mode"),
    ({"metric": "loss_g"}, "metric"),
    ({"resources": {"gpu": 1.5}}, "resources.gpu"),
    ({"scheduler": {"type": "asha", "grace_period": 5}}, "scheduler.grace_period"),  # > max_epochs 2
    ({"scheduler": {"type": "asha", "patience": 5}}, "scheduler.patience"),
    ({"base": {"eval_every": 2}, "max_epochs": 4}, "scheduler.grace_period"),  # rung 1 before the first score
    ({"base": {"eval_every": 2}, "scheduler": {"type": "pbt", "perturbation_interval": 2,
                                               "hyperparam_mutations": {"lr_d": {"choice": [1.0e-4]}}}},
     "base.eval_every"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 1,
                    "hyperparam_mutations": {"lr_d": {"grid": [1.0e-4]}}}}, "hyperparam_mutations.lr_d"),
    ({"search_alg": "grid"}, "search.lr_d"),  # grid search takes grid entries only
    ({"cpu": {"base": {"width": -1.0}}}, "base.width"),
    ({"cpu": {"color": "red"}}, "cpu.color"),
    ({"num_samples": None, "time_budget": None}, "num_samples"),  # until the budget, but no budget
    ({"max_epochs": None}, "max_epochs"),  # only a pbt population trains until the budget
    ({"finalists": {"trials": -1}}, "finalists.trials"),
    ({"finalists": {"samples": 1}}, "finalists.samples"),
    ({"finalists": {"checkpoints": 2}}, "finalists.checkpoints"),
    ({"finalists": [3]}, "finalists"),
    ({"search": {"loss": {"choice": ["ns", "wgan-gp"]}, "d_norm": {"choice": ["spectral", "batch"]}}},
     "search.d_norm"),  # a trial drawing wgan-gp with a BatchNorm D would fail
])
def test_bad_spaces_name_file_and_key(tmp_path, change, key):
    path = write_space(tmp_path, {**smoke_raw(), **change})
    with pytest.raises(ConfigError) as err:
        spaces.load_space(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_cpu_block_and_flags_override_the_file(tmp_path):
    raw = {**smoke_raw(), "cpu": {"num_samples": 2, "base": {"subset": 500}, "scheduler": {"grace_period": 2}}}
    space = spaces.load_space(write_space(tmp_path, raw))
    cpu = spaces.for_cpu(space)
    assert (cpu.num_samples, cpu.base["subset"], cpu.base["width"], cpu.scheduler["grace_period"]) == (2, 500, 0.25, 2)
    flagged = spaces.with_values(cpu, {"max_epochs": 4, "time_budget": "90s"}, where="command line")
    assert (flagged.max_epochs, flagged.time_budget_s, flagged.num_samples) == (4, 90, 2)
    with pytest.raises(ConfigError, match="command line: num_samples"):
        spaces.with_values(cpu, {"num_samples": 0}, where="command line")


def test_left_out_counts_run_until_the_budget(tmp_path):
    """num_samples left out: Tune samples until the budget (-1); a number caps it. max_epochs left out (pbt
    only): the trials get a ceiling they never reach, so the budget ends them."""
    smoke = spaces.load_space(write_space(tmp_path, {k: v for k, v in smoke_raw().items() if k != "num_samples"}))
    assert (smoke.num_samples, smoke.tune_num_samples, smoke.max_epochs) == (None, -1, 2)
    assert spaces.with_values(smoke, {"num_samples": 5}, where="command line").tune_num_samples == 5
    pbt = spaces.load_space(SPACES_DIR / "pbt.yaml")
    assert pbt.epochs_until_budget and pbt.max_epochs == spaces.UNTIL_BUDGET_EPOCHS and pbt.num_samples == 8
    assert from_dict(pbt.train_fields).max_epochs == spaces.UNTIL_BUDGET_EPOCHS
    capped = spaces.with_values(pbt, {"max_epochs": 6}, where="command line")
    assert not capped.epochs_until_budget and capped.max_epochs == 6
    assert "until the budget" in spaces.describe_trials(pbt) and "until" not in spaces.describe_trials(capped)


def test_searched_choices_are_checked_in_pairs(tmp_path):
    """wgan-gp needs a D without BatchNorm: with d_norm searched too, only the pairs tell."""
    search = {"lr_d": {"loguniform": [1.0e-4, 1.0e-3]}, "loss": {"choice": ["ns", "wgan-gp"]},
              "d_norm": {"choice": ["spectral", "none"]}}
    space = spaces.load_space(write_space(tmp_path, {**smoke_raw(), "search": search}))
    assert space.search["loss"] == ("choice", ["ns", "wgan-gp"])


def test_finalists_default_and_override(tmp_path):
    assert spaces.load_space(SPACES_DIR / "balanced.yaml").finalists == {"trials": 3, "samples": 10_000}
    raw = {**smoke_raw(), "finalists": {"trials": 0}}
    assert spaces.load_space(write_space(tmp_path, raw)).finalists == {"trials": 0, "samples": 10_000}


def test_seed_is_drawn_per_trial_except_under_optuna():
    smoke = spaces.load_space(SPACES_DIR / "smoke.yaml")
    assert searchers.param_space(smoke, seed=7)["seed"].lower == 0  # a tune.randint domain
    assert searchers.param_space(spaces.load_space(SPACES_DIR / "ttur.yaml"), seed=7)["seed"] == 7


@pytest.mark.parametrize("lr_d, latent, warned", [
    (1.05e-4, 64, ["lr_d 0.000105 is at the low edge of its range [0.0001, 0.001]"]),  # log scale: 2 % in
    (9.0e-4, 64, ["lr_d 0.0009 is at the high edge of its range [0.0001, 0.001]"]),  # 95 % in on the log scale
    (3.0e-4, 64, []),  # the middle (48 % in)
    (3.0e-4, 128, []),  # a choice has no edge to widen past
])
def test_a_best_value_at_the_edge_of_its_range_is_flagged(tmp_path, lr_d, latent, warned):
    path = tmp_path / "edge.yaml"
    smoke = yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())
    base = {key: value for key, value in smoke["base"].items() if key != "latent_dim"}
    path.write_text(yaml.safe_dump({**smoke, "base": base, "search": {"lr_d": {"loguniform": [1.0e-4, 1.0e-3]},
                                                                      "latent_dim": {"choice": [32, 64, 128]}}}))
    lines = summary.edge_warnings(spaces.load_space(path), {"lr_d": lr_d, "latent_dim": latent, "seed": 1})
    assert [line.split(":")[0] for line in lines] == warned
    assert all(f"widen search.lr_d past it in {path}" in line for line in lines)


@pytest.mark.parametrize("scheduler", ["pbt", "hyperband"])
def test_schedulers_that_resume_trials_refuse_clock_checkpoints(tmp_path, scheduler):
    """PBT and HyperBand restart a trial from its last checkpoint: one taken by the clock would lose epochs."""
    raw = yaml.safe_load((SPACES_DIR / ("pbt.yaml" if scheduler == "pbt" else "smoke.yaml")).read_text())
    raw["base"]["checkpoint_every_s"] = 30
    if scheduler == "hyperband":
        raw["scheduler"] = {"type": "hyperband"}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"base.checkpoint_every_s: must be 0 with scheduler {scheduler}"):
        spaces.load_space(path)


@pytest.mark.parametrize("scheduler", ["pbt", "hyperband"])
def test_schedulers_that_compare_from_the_first_epoch_refuse_sparse_scores(tmp_path, scheduler):
    """PBT ranks every report and HyperBand's smallest bracket ranks trials after one epoch: a trial scored
    every other epoch would reach them without a score (Ray's brackets fail on the missing metric)."""
    raw = yaml.safe_load((SPACES_DIR / ("pbt.yaml" if scheduler == "pbt" else "wide.yaml")).read_text())
    raw["base"]["eval_every"] = 2
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="base.eval_every: .*use 1"):
        spaces.load_space(path)


@pytest.mark.parametrize("name", [name for name in SHIPPED if name != "smoke"])
def test_gpu_settings_spend_the_gpu_on_training_and_cpu_blocks_keep_every_epoch(name):
    """Issue 23, every space's GPU settings (the space without its cpu block): a GPU epoch of the bundled 10k
    trains in ~0.2 s, so per-epoch grids and checkpoints would cost more than the training. Checkpoints by the
    clock unless the scheduler resumes trials from the last epoch's (HyperBand, PBT), grids every 10 epochs,
    trials long enough to plateau and learning rates above the old 1e-3 edge the GPU winners sat at. A CPU
    epoch takes seconds: its block scores, checkpoints and draws every epoch."""
    space = spaces.load_space(SPACES_DIR / f"{name}.yaml")
    gpu, cpu = from_dict(space.train_fields), from_dict(spaces.for_cpu(space).train_fields)
    resumes = space.scheduler["type"] in spaces.RESUMING_SCHEDULERS
    assert gpu.checkpoint_every == 1 if resumes else gpu.checkpoint_every_s == 30
    assert gpu.sample_every == 10 and gpu.eval_every in (1, 2)
    assert space.epochs_until_budget or space.max_epochs >= 54
    rates = [key for key in ("lr_d", "lr_g") if key in space.search]
    assert rates and all(space.search[key][1][1] >= 3.0e-3 for key in rates)
    assert (cpu.eval_every, cpu.checkpoint_every, cpu.checkpoint_every_s, cpu.sample_every) == (1, 1, 0, 1)
