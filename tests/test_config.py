import pytest

from gan_tune.training import config
from gan_tune.training.config import ConfigError, TrainConfig


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
    ("g_ema: 1.0\n", "g_ema"),
    ("g_ema: -0.1\n", "g_ema"),
    ("loss: wgan\n", "loss"),
    ("d_norm: layer\n", "d_norm"),
    ("r1_gamma: -1.0\n", "r1_gamma"),
    ("gp_weight: -10.0\n", "gp_weight"),
    ("loss: wgan-gp\n", "d_norm"),  # D's BatchNorm would mix the images the gradient penalty treats one by one
    ("loss: hinge\nlabel_smoothing: 0.1\n", "label_smoothing"),  # hinge has no labels
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


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
    """data_source auto used to fail to cache MNIST under it and train on the bundled 10k without a word."""
    (tmp_path / "plain").write_text("a file\n")
    with pytest.raises(ConfigError, match="data_dir: .*plain is a file"):
        TrainConfig(data_dir=str(tmp_path / "plain"))
    TrainConfig(data_dir=str(tmp_path / "not yet made"))  # a folder made when MNIST is first cached


def test_new_options_default_to_todays_training():
    cfg = TrainConfig()
    assert (cfg.loss, cfg.d_norm, cfg.r1_gamma, cfg.g_ema) == ("ns", "batch", 0.0, 0.0)


def test_every_loss_and_d_norm_is_accepted(tmp_path):
    for loss in ("ns", "ls", "hinge", "wgan-gp"):
        for d_norm in ("spectral", "none"):
            assert config.load(None, [f"loss={loss}", f"d_norm={d_norm}", "g_ema=0.999", "r1_gamma=1.0"]).loss == loss
