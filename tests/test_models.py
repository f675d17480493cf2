import pytest
import torch
from torch import nn

from gan_tune.training.config import TrainConfig
from gan_tune.training.models import (
    MODELS,
    NearestUpConv,
    build_models,
    count_params,
    fuse_upsample_conv,
    register_model,
)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("latent_dim", [32, 100])
def test_shapes(model, latent_dim):
    g, d = build_models(TrainConfig(model=model, latent_dim=latent_dim))
    x = g(torch.randn(3, latent_dim))
    assert x.shape == (3, 1, 28, 28)
    assert x.min() >= -1 and x.max() <= 1  # tanh range, same as the data
    assert d(x).shape == (3,)  # one logit per image


def test_balanced_parameter_counts_are_pinned():
    g, d = build_models(TrainConfig(model="balanced", latent_dim=100))
    assert count_params(g) == 1_649_089
    assert count_params(d) == 373_761


@pytest.mark.parametrize("model,g_params,d_params", [("mlp", 1_486_352, 533_505), ("dcgan", 1_781_504, 138_624)])
def test_other_parameter_counts_are_pinned(model, g_params, d_params):
    g, d = build_models(TrainConfig(model=model))
    assert (count_params(g), count_params(d)) == (g_params, d_params)


def test_width_multiplier_shrinks_the_model():
    g, d = build_models(TrainConfig(width=0.25))
    assert count_params(g) < 1_649_089 / 3 and count_params(d) < 373_761 / 8


def test_dcgan_init_follows_radford():
    torch.manual_seed(0)
    g, _ = build_models(TrainConfig(model="dcgan"))
    conv = g[1]
    assert abs(conv.weight.std().item() - 0.02) < 0.002
    bn = g[2]
    assert abs(bn.weight.mean().item() - 1.0) < 0.01


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        register_model("mlp")(lambda cfg: None)


@pytest.mark.parametrize("bias", [False, True])
def test_nearest_up_conv_equals_upsample_then_conv(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 5, 3, padding=1, bias=bias)
    x = torch.randn(3, 8, 6, 7)  # odd and even sizes: every phase and border
    expected = conv(nn.Upsample(scale_factor=2)(x))
    with torch.no_grad():
        assert torch.allclose(NearestUpConv(conv)(x), expected, atol=1e-5)


def test_fusing_keeps_the_generator_function_and_skips_other_pairs():
    g, _ = build_models(TrainConfig(width=0.25))
    g.eval()
    fused = fuse_upsample_conv(g)
    assert [type(layer).__name__ for layer in fused].count("NearestUpConv") == 2
    z = torch.randn(16, 100)
    with torch.no_grad():
        assert torch.allclose(fused(z), g(z), atol=1e-5)
    bilinear = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(1, 1, 3, padding=1))
    strided = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(1, 1, 3, stride=2, padding=1))
    assert all(not any(isinstance(m, NearestUpConv) for m in fuse_upsample_conv(s)) for s in (bilinear, strided))


def batch_norms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_d_norm_none_and_spectral_drop_d_batch_norm_and_keep_g(model):
    g_batch, d_batch = build_models(TrainConfig(model=model, width=0.25))
    for d_norm in ("none", "spectral"):
        torch.manual_seed(0)
        g, d = build_models(TrainConfig(model=model, width=0.25, d_norm=d_norm))
        assert not batch_norms(d) and len(batch_norms(g)) == len(batch_norms(g_batch))
        assert d(g(torch.randn(3, 100))).shape == (3,)
    assert (len(batch_norms(d_batch)) > 0) == (model == "dcgan")  # only dcgan's D has BatchNorm


def test_spectral_norm_parametrizes_every_d_weight():
    _, d = build_models(TrainConfig(width=0.25, d_norm="spectral"))
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 4
    assert all(nn.utils.parametrize.is_parametrized(layer, "weight") for layer in layers)
