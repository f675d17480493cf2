import pytest

from gan_tune import config
from gan_tune.config import ConfigError, TrainConfig


def test_defaults_follow_the_balanced_recipe():
    cfg = TrainConfig()
    assert (cfg.lr_d, cfg.lr_g, cfg.beta1, cfg.batch_size, cfg.latent_dim) == (2e-4, 1e-4, 0.5, 128, 100)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: mlp\nlr_d: 1.0e-3\nlatent_dim: 64\n")
    cfg = config.load(path, ["lr_g=5.0e-4", "n_disc=2"])
    assert (cfg.model, cfg.lr_d, cfg.lr_g, cfg.latent_dim, cfg.n_disc) == ("mlp", 1e-3, 5e-4, 64, 2)


def test_save_round_trip(tmp_path):
    cfg = TrainConfig(model="dcgan", lr_d=3e-4)
    config.save(cfg, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("text,key", [
    ("bogus: 1\n", "bogus"),
    ("lr_d: -1.0\n", "lr_d"),
    ("lr_g: 0\n", "lr_g"),
    ("latent_dim: 0\n", "latent_dim"),
    ("latent_dim: 10.5\n", "latent_dim"),
    ("model: resnet\n", "model"),
    ("lr_d: fast\n", "lr_d"),
    ("lr_d: 1e-4\n", "lr_d"),  # PyYAML reads 1e-4 (no dot) as a string
    ("beta1: 1.5\n", "beta1"),
    ("batch_size: [1]\n", "batch_size"),
    ("model: mlp\nlr_d: : 1\n", "line 2"),
])
def test_bad_config_names_file_and_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: path: file not found"):
        config.load("nope.yaml")


def test_bad_override_names_the_flag():
    with pytest.raises(ConfigError, match="--set: n_disc"):
        config.load(None, ["n_disc=0"])
