import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from gan_tune import metrics
from gan_tune.quality import baselines, measures, scorer
from gan_tune.quality.mnist_classifier import (
    FEATURE_DIM,
    classifier_checksum,
    load_classifier,
)
from gan_tune.training.checkpoint import state
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import BUNDLED, Mnist, load_mnist, to_float
from gan_tune.training.loop import fixed_noise, make_generator
from gan_tune.training.models import NearestUpConv, build_models
from gan_tune.training.step import make_gan

CPU = torch.device("cpu")
N = 2000  # images per baseline set, as in the README's table (FID depends on the count)
README = Path(__file__).resolve().parents[1] / "README.md"
# README row -> quality.baselines.BASELINES name
README_ROWS = {
    "real held-out images": "real held-out",
    "real + blur (σ 1 px)": "real + blur (sigma 1 px)",
    "real + noise (std 0.5)": "real + noise (std 0.5)",
    "real digits 0–4 only": "real, digits 0-4 only",
    "mode collapse (copies of a 3 and a 7)": "mode collapse (2 images: 3, 7)",
    "uniform noise": "uniform noise",
}
SCORE_KEYS = {"fid", "is", "coverage", "coverage_entropy", "mean_confidence", "fid_samples"}


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def cache_env(module_cache, monkeypatch):
    monkeypatch.setenv(scorer.CACHE_ENV, str(module_cache))  # never touch ~/.cache in tests


@pytest.fixture(scope="module")
def table(module_cache):
    return baselines.baseline_table(N, CPU, cache_dir=module_cache / "fid_stats")


def readme_baselines() -> tuple[list[str], dict[str, list[str]]]:
    """(columns, README row -> its cells as printed) of the table under 'What good looks like'."""
    section = README.read_text().split("What good looks like", 1)[1]
    lines = [line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rows = cells[0], cells[2:]  # cells[1] is the |---| line
    return header[1:], {row[0]: row[1:] for row in rows}


def printed_tolerance(printed: str, value: float) -> float:
    """Half a unit of the last printed digit (the README's rounding) plus 0.1 % for BLAS differences between CPUs."""
    decimals = len(printed.split(".", 1)[1]) if "." in printed else 0
    return 0.5 * 10 ** -decimals + 1e-3 * abs(value)


def test_the_readme_baseline_table_is_what_baselines_computes(table):
    columns, rows = readme_baselines()
    assert columns == ["fid", "is", "coverage", "coverage_entropy", "mean_confidence"]
    assert set(rows) == set(README_ROWS) and set(README_ROWS.values()) == set(baselines.BASELINES)
    for readme_name, printed_row in rows.items():
        measured = table[README_ROWS[readme_name]]
        for column, printed in zip(columns, printed_row):
            documented, value = float(printed.replace(",", "")), measured[column]
            assert abs(value - documented) <= printed_tolerance(printed, documented), (readme_name, column, value)


def test_real_held_out_images_score_well(table):
    real = table["real held-out"]
    assert real["fid"] < 5
    assert real["is"] > 9
    assert real["coverage"] == 10
    assert real["coverage_entropy"] > math.log(10) - 0.02
    assert real["mean_confidence"] > 0.95


def test_fid_grows_with_degradation(table):
    fids = [table[name]["fid"] for name in baselines.BASELINES if name.startswith(("real held", "real +", "uniform"))]
    assert len(fids) == 4  # real < real + blur < real + noise < uniform noise
    assert fids == sorted(fids) and len(set(fids)) == 4
    assert fids[1] > 10 * fids[0]


def test_mode_collapse_gets_low_coverage_and_large_fid(table):
    collapsed = next(row for name, row in table.items() if name.startswith("mode collapse"))
    assert collapsed["coverage"] <= 2
    assert collapsed["coverage_entropy"] <= math.log(2) + 1e-9
    assert collapsed["fid"] > 50 * table["real held-out"]["fid"]


def test_half_the_digits_cover_five_classes(table):
    half = table["real, digits 0-4 only"]
    assert half["coverage"] == 5
    assert half["coverage_entropy"] == pytest.approx(math.log(5), abs=0.05)
    assert half["fid"] > 10 * table["real held-out"]["fid"]


class ClassifierFeatures(nn.Module):
    """The bundled classifier as a torchmetrics feature extractor: (B, 1, 28, 28) -> (B, FEATURE_DIM)."""

    def __init__(self):
        super().__init__()
        self.classifier = load_classifier(CPU)
        self.num_features = FEATURE_DIM  # saves torchmetrics a dummy forward pass

    def forward(self, x):
        return self.classifier.features(x)


def test_frechet_distance_matches_torchmetrics():
    reference, pool = baselines.baseline_split()
    real = to_float(reference.images[:N])
    fake = baselines.real_blurred(pool, N, torch.Generator())
    features = load_classifier(CPU).features
    ours = measures.frechet_distance(measures.gaussian_fit(features(fake)), measures.gaussian_fit(features(real)))
    # normalize=True: the custom extractor takes float images as they are
    theirs = FrechetInceptionDistance(feature=ClassifierFeatures(), normalize=True)
    theirs.update(real, real=True)
    theirs.update(fake, real=False)
    assert ours == pytest.approx(float(theirs.compute()), rel=1e-3)
    fit = measures.gaussian_fit(features(real))
    assert abs(measures.frechet_distance(fit, fit)) < 1e-6 * float(fit.cov.trace())


def test_real_stats_are_cached_on_disk_by_source_and_checksum(tmp_path, monkeypatch):
    bundled = load_mnist(BUNDLED, subset=300)
    calls = []
    classify = scorer.classify
    monkeypatch.setattr(scorer, "classify", lambda *args: calls.append(1) or classify(*args))
    first = scorer.real_stats(bundled, CPU, cache_dir=tmp_path)
    second = scorer.real_stats(bundled, CPU, cache_dir=tmp_path)
    assert len(calls) == 1  # the second call read the file
    torch.testing.assert_close(first.cov, second.cov)
    (path,) = tmp_path.glob("*.pt")
    assert path == scorer.stats_path(bundled.source, classifier_checksum(), tmp_path)
    assert classifier_checksum()[:16] in path.name

    scorer.real_stats(Mnist(bundled.images, bundled.labels, "another-source"), CPU, cache_dir=tmp_path)
    monkeypatch.setattr(scorer, "classifier_checksum", lambda: "f" * 64)
    scorer.real_stats(bundled, CPU, cache_dir=tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.pt"))) == 3


def test_corrupt_cache_file_is_recomputed(tmp_path):
    bundled = load_mnist(BUNDLED, subset=200)
    fit = scorer.real_stats(bundled, CPU, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"not a torch file")
    again = scorer.real_stats(bundled, CPU, cache_dir=tmp_path)
    torch.testing.assert_close(again.mean, fit.mean)
    assert scorer.read_stats(path, {"source": bundled.source}) is not None  # replaced by a good file


def test_cache_dir_comes_from_the_environment(module_cache):
    assert scorer.stats_dir() == module_cache / "fid_stats"


def test_untrained_generator_scores_finite_and_bad(table):
    cfg = TrainConfig(width=0.25)
    g, _ = build_models(cfg)
    score = scorer.make_scorer(load_mnist(BUNDLED, subset=1000), CPU, n_samples=300)
    scores = score(g, cfg.latent_dim)
    assert set(scores) == SCORE_KEYS and scores["fid_samples"] == 300
    assert all(math.isfinite(v) for v in scores.values())
    assert scores["fid"] > 20 * table["real held-out"]["fid"]
    assert g.training  # the generator's mode is restored
    assert score(g, cfg.latent_dim) == scores  # same weights, same score
    g.eval()
    score(g, cfg.latent_dim)
    assert not g.training


def test_scoring_in_channels_last_matches_the_training_layout():
    """The scorer's channels_last copy draws the same images as G itself, and leaves G's layout alone."""
    cfg = TrainConfig(width=0.25)
    g, _ = build_models(cfg)
    g[1].running_mean.normal_()  # non-trivial BatchNorm statistics, which eval mode uses
    z = torch.randn(64, cfg.latent_dim)
    copy = scorer.scoring_copy(g)
    assert sum(isinstance(layer, NearestUpConv) for layer in copy) == 2  # both upsample + conv pairs fused
    assert copy[10].weight.is_contiguous(memory_format=torch.channels_last) and g[12].weight.is_contiguous()
    assert g.training and not copy.training
    with torch.no_grad():
        assert torch.allclose(copy(z), g.eval()(z), atol=1e-5)


def test_diverged_generator_gets_infinite_fid():
    nan_generator = nn.Sequential(nn.Linear(8, 784), nn.Unflatten(1, (1, 28, 28)))
    nn.init.constant_(nan_generator[0].weight, math.nan)
    scores = scorer.make_scorer(load_mnist(BUNDLED, subset=200), CPU, n_samples=50)(nan_generator, 8)
    assert scores["fid"] == math.inf


def test_default_sample_counts():
    assert scorer.default_fid_samples(CPU) == 2_000
    assert scorer.default_fid_samples(torch.device("cuda")) == 10_000


def test_registry_lists_the_known_metrics():
    assert set(measures.METRICS) == SCORE_KEYS - {"fid_samples"}
    with pytest.raises(KeyError, match="known: fid"):
        measures.calc_metrics(None, None, ["fdi"])
    with pytest.raises(ValueError, match="twice"):
        measures.register_metric("fid", mode="min", worst=1.0)(measures.fid)


def test_the_tables_come_from_the_metric_specs():
    """README: FID is the default objective (lower is better); the others are better higher; a diverged epoch
    reports each metric's worst finite value, so no NaN or inf reaches a scheduler."""
    assert measures.OBJECTIVES == {"fid": "min", "is": "max", "coverage": "max", "coverage_entropy": "max",
                                  "mean_confidence": "max"}
    assert set(measures.SCORE_KEYS) == SCORE_KEYS
    assert measures.DIVERGED_SCORES == {"fid": 1.0e6, "is": 0.0, "coverage": 0, "coverage_entropy": 0.0,
                                       "mean_confidence": 0.0, "fid_samples": 0}


@pytest.fixture
def checkpoint_dir(tmp_path):
    cfg = TrainConfig(width=0.25, data_source=BUNDLED, subset=1000)
    gan = make_gan(cfg, CPU)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(state(gan, 1, fixed_noise(cfg, CPU), make_generator(cfg, CPU), []), run_dir / "checkpoint.pt")
    return run_dir


def test_score_cli_on_a_run_dir_and_a_checkpoint(checkpoint_dir, capsys):
    assert metrics.main(["score", str(checkpoint_dir), "--n", "200"]) == 0
    assert metrics.main(["score", str(checkpoint_dir / "checkpoint.pt"), "--n", "200"]) == 0
    out = capsys.readouterr().out
    assert f"{BUNDLED}[:1000]" in out
    for key in SCORE_KEYS:
        assert key in out


def test_baselines_cli(capsys):
    assert metrics.main(["baselines", "--n", "300"]) == 0
    out = capsys.readouterr().out
    for name in baselines.BASELINES:
        assert name in out


@pytest.mark.parametrize("content", [None, b"garbage", "no-generator"])
def test_bad_checkpoint_exits_2_naming_the_file(tmp_path, capsys, content):
    path = tmp_path / "checkpoint.pt"
    if content == "no-generator":
        torch.save({"config": TrainConfig().to_dict()}, path)
    elif content is not None:
        path.write_bytes(content)
    assert metrics.main(["score", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1


def test_bad_sample_count_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        metrics.main(["baselines", "--n", "99999"])
    assert exit_info.value.code == 2
    assert "--n" in capsys.readouterr().err
