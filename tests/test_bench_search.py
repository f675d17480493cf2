"""python -m gan_tune.bench search: strategies, the best-so-far curves, a short real run, bad flags."""

import json
import math

import pandas as pd
import pytest
import yaml
from PIL import Image

from gan_tune import bench
from gan_tune.benchmarks import strategies
from gan_tune.training.config import read_yaml
from gan_tune.tuning import spaces
from gan_tune.tuning.space_files import resolve_space


def test_best_so_far_is_a_step_function_from_the_search_start():
    """Reports of three trials out of order: one ended early, one resumed (its epochs 3-4 reported again after a
    restart), a diverged epoch (1e6, finite) and a NaN report that must not count."""
    reports = pd.DataFrame([
        {"trial_id": "a", "epoch": 1, "timestamp": 1010, "fid": 300.0},
        {"trial_id": "b", "epoch": 1, "timestamp": 1012, "fid": 1e6},  # diverged
        {"trial_id": "a", "epoch": 2, "timestamp": 1020, "fid": 120.0},  # a then ended early
        {"trial_id": "c", "epoch": 3, "timestamp": 1030, "fid": 150.0},
        {"trial_id": "c", "epoch": 4, "timestamp": 1040, "fid": 90.0},
        {"trial_id": "c", "epoch": 3, "timestamp": 1055, "fid": 95.0},  # resumed: epoch 3 again, worse than 90
        {"trial_id": "c", "epoch": 4, "timestamp": 1060, "fid": float("nan")},
        {"trial_id": "c", "epoch": 5, "timestamp": 1070, "fid": 60.0},
    ]).sample(frac=1, random_state=0)  # the order of progress.csv files is not time order
    curve = strategies.best_so_far(reports, started=1000.0)
    assert curve.to_dict("list") == {"t": [10.0, 20.0, 40.0, 70.0], "best": [300.0, 120.0, 90.0, 60.0]}
    assert (curve["best"].diff().dropna() < 0).all()  # never increases, one row per improvement
    assert math.isnan(strategies.value_at(curve, 9.0)) and strategies.value_at(curve, 39.0) == 120.0
    assert strategies.value_at(curve, 1e9) == 60.0
    assert strategies.time_to(curve, 100.0) == 40.0 and math.isnan(strategies.time_to(curve, 50.0))


def test_a_search_in_which_no_trial_reported_has_an_empty_curve(tmp_path):
    """A budget that ends before the first report (Ray's start-up on a busy machine): no progress.csv at all."""
    curve = strategies.best_so_far(strategies.study_reports(tmp_path), started=0.0)
    assert curve.empty and math.isnan(strategies.value_at(curve, 1e9))


def test_the_summary_gives_median_and_range_over_seeds():
    runs = [{"strategy": "x", "seed": s, "final_fid": f, "curve": {"t": [10.0, 50.0], "best": [b, b / 2]}}
            for s, (b, f) in enumerate([(200.0, 80.0), (100.0, 40.0), (400.0, 60.0)])]
    table = strategies.summary_table(runs, budget_s=100).set_index("strategy")
    assert table.loc["x", "fid at 25%"] == "200.0 [100.0–400.0]"  # at 25 s: the first reports
    assert table.loc["x", "fid at 100%"] == "100.0 [50.0–200.0]"
    assert table.loc["x", "final fid 10k"] == "60.0 [40.0–80.0]"
    assert table.loc["x", "time to fid 100"] == "30 s (2/3)" and table.loc["x", "time to fid 30"] == "– (0/3)"


def test_the_verdict_names_the_winner_and_whether_the_seeds_separate_it(tmp_path, capsys):
    """a beats b at 50 % with every seed (apart); at 100 % b's median wins but a's best seed beats b's worst."""
    def run(strategy, half, full, final):
        return {"strategy": strategy, "seed": 0, "final_fid": final, "curve": {"t": [40.0, 90.0], "best": [half, full]}}
    runs = [run("a", 50.0, 40.0, 30.0), run("a", 60.0, 45.0, 31.0), run("a", 55.0, 35.0, 29.0),
            run("b", 80.0, 30.0, 60.0), run("b", 90.0, 38.0, 61.0), run("b", 70.0, 34.0, 59.0),
            run("c", 90.0, 40.0, 30.0), run("c", 95.0, 50.0, 30.5), run("c", 85.0, 45.0, 29.5)]
    lines = strategies.verdict(runs, budget_s=100)
    assert lines == [
        "at 50% of the budget: a 55.0, next b 80.0 (1.45x), apart beyond the seed spread; "
        "behind beyond the spread: b, c",
        "at 100% of the budget: b 34.0, next a 40.0 (1.18x), within the seed spread (ranges overlap); "
        "behind beyond the spread: c",
        "kept generator re-scored: a and c tie at 30.0; behind beyond the spread: b"]  # 25 %: no scores yet
    (tmp_path / "curves.json").write_text(json.dumps({"budget_s": 100, "space": "balanced", "runs": runs}))
    assert bench.main(["search", "--report", "--out", str(tmp_path)]) == 0  # drawn again, nothing run
    assert lines[0] in (tmp_path / "table.txt").read_text() and lines[0] in capsys.readouterr().out
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    assert bench.main(["search", "--report", "--out", str(tmp_path / "none")]) == 2
    assert "curves.json" in capsys.readouterr().err


def test_each_strategy_is_the_balanced_cpu_space_with_its_scheduler():
    raw = read_yaml(resolve_space("balanced"))
    made = {name: strategies.strategy_raw(raw, name, gpu=False) for name in strategies.STRATEGIES}
    loaded = {name: spaces.parse_space(r, name, name) for name, r in made.items()}
    assert {name: s.scheduler["type"] for name, s in loaded.items()} == {
        "seed-recipe": "fifo", "random-fifo": "fifo", "random-asha": "asha", "optuna-asha": "asha",
        "random-hyperband": "hyperband", "pbt": "pbt", "cohort-asha": "asha"}
    assert loaded["optuna-asha"].search_alg == "optuna" and loaded["random-asha"].search_alg == "random"
    assert loaded["cohort-asha"].cohort == strategies.COHORT_SIZE and loaded["random-asha"].cohort == 1
    assert "cohort-asha" not in strategies.DEFAULT_STRATEGIES
    recipe = loaded["seed-recipe"]
    assert recipe.num_samples == 1 and recipe.search == {} and recipe.base["lr_d"] == 2.0e-4
    assert (recipe.base["loss"], recipe.base["g_ema"], recipe.base["width"]) == ("ns", 0.0, 0.25)  # cpu block kept
    assert loaded["pbt"].epochs_until_budget and set(loaded["pbt"].scheduler["hyperparam_mutations"]) == {"lr_d", "lr_g"}
    assert all(s.base["width"] == 0.25 and s.time_budget_s == 14 * 60 for s in loaded.values())


def test_the_cohort_spaces_cpu_side_is_the_measured_cohort_asha_strategy():
    """README, Cohort trials: `--space cohort` on a CPU is what `bench search` measured as cohort-asha
    (balanced's cpu block with 4 configurations per trial)."""
    cohort = spaces.for_cpu(spaces.load_space(resolve_space("cohort")))
    measured = spaces.parse_space(strategies.strategy_raw(read_yaml(resolve_space("balanced")), "cohort-asha",
                                                          gpu=False), "cohort-asha", "cohort-asha")
    for key in ("base", "search", "max_epochs", "cohort", "scheduler", "resources", "time_budget_s"):
        assert getattr(cohort, key) == getattr(measured, key), key


def test_every_strategy_of_the_balanced_gpu_space_is_valid():
    """On a GPU `balanced` checkpoints by the clock and scores every other epoch, which HyperBand and PBT refuse
    (they resume trials from the last epoch's checkpoint and compare scores from epoch 1): their strategies
    switch to a checkpoint and a score every epoch, the others keep the space's settings.
    Before, `bench search` refused hyperband and pbt, so it exited 2 on every GPU machine."""
    raw = read_yaml(resolve_space("balanced"))
    loaded = {name: spaces.parse_space(strategies.strategy_raw(raw, name, gpu=True), name, name)
              for name in strategies.STRATEGIES}
    clock = {name: (s.base.get("checkpoint_every_s"), s.base["eval_every"]) for name, s in loaded.items()}
    assert clock == {"seed-recipe": (30, 2), "random-fifo": (30, 2), "random-asha": (30, 2), "optuna-asha": (30, 2),
                     "random-hyperband": (0, 1), "pbt": (0, 1), "cohort-asha": (30, 2)}
    assert all("width" not in s.base and s.time_budget_s == 30 * 60 for s in loaded.values())  # no cpu block


@pytest.mark.parametrize("argv, key", [
    (["--seeds", "0"], "--seeds"),
    (["--budget", "5 minutes"], "--budget"),
    (["--strategies", "random-asha,grid-everything"], "--strategies"),
    (["--space", "no-such-space"], "--space"),
    (["--seeds", "two"], "--seeds"),
])
def test_bad_flags_exit_2_with_one_line(argv, key, capsys, tmp_path):
    try:
        code = bench.main(["search", *argv, "--out", str(tmp_path / "out")])
    except SystemExit as exit_:  # argparse's own errors (a flag's type)
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and key in err[-1] and "error" in err[-1], err
    assert not (tmp_path / "out").exists()  # nothing started


def test_a_short_run_writes_the_curves_the_json_and_the_table(ray_local, tmp_path, capsys, monkeypatch):
    smoke = yaml.safe_load(resolve_space("smoke").read_text())
    # smoke with 200-sample scores and 2 trials (one wave on 2 CPUs): each search ends when its trials do, well
    # before the budget however busy the machine (a 40 s budget on a loaded machine ended before any report)
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({**smoke, "base": {**smoke["base"], "fid_samples": 200}, "num_samples": 2}))
    out = tmp_path / "out"
    code = bench.main(["search", "--space", str(space), "--strategies", "random-fifo,random-asha", "--seeds", "1",
                       "--budget", "5m", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "2 searches of 5m00s each" in printed and "[2/2] random-asha seed 0: exit 0" in printed
    runs = json.loads((out / "curves.json").read_text())["runs"]
    assert [run["strategy"] for run in runs] == ["random-fifo", "random-asha"]
    for run in runs:
        assert run["curve"]["t"] and 0 < run["curve"]["t"][0]  # seconds from the search's start
        assert run["curve"]["t"] == sorted(run["curve"]["t"])
        assert run["curve"]["best"] == sorted(run["curve"]["best"], reverse=True)
        assert run["final_fid"] > 0  # the kept generator, re-scored on smoke's 1000 finalist samples
    table = (out / "table.txt").read_text()
    assert "random-fifo" in table and "fid at 50%" in table and "final fid 10k" in table
    assert Image.open(out / "curves.png").size[0] > 500
