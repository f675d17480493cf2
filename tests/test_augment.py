"""DiffAugment ops and the adaptive probability (training/augment.py), and the step that applies them."""

import pytest
import torch

from gan_tune.training import augment, checkpoint, loop, step
from gan_tune.training.config import ConfigError, TrainConfig
from gan_tune.training.data import BUNDLED, load_mnist

CPU = torch.device("cpu")
TINY = dict(width=0.25, batch_size=32, steps_per_epoch=4, data_source=BUNDLED, subset=256, eval_every=0)


def dot_images(n=64):
    """Background everywhere but one bright pixel in the middle."""
    x = torch.full((n, 1, 28, 28), -1.0)
    x[:, :, 14, 14] = 1.0
    return x


def test_translation_moves_each_image_by_at_most_an_eighth_and_fills_with_background():
    out = augment.translation(dot_images(), torch.Generator().manual_seed(0))
    assert out.shape == (64, 1, 28, 28) and set(out.unique().tolist()) == {-1.0, 1.0}
    ys, xs = (out[:, 0] == 1.0).nonzero()[:, 1], (out[:, 0] == 1.0).nonzero()[:, 2]
    assert len(ys) == 64  # one dot per image, never pushed out
    assert (ys - 14).abs().max() <= 4 and (xs - 14).abs().max() <= 4  # round(28 / 8) = 4
    assert len(set(zip(ys.tolist(), xs.tolist()))) > 10  # shifts differ between images


def test_cutout_zeroes_one_square_of_half_the_side():
    out = augment.cutout(torch.ones(64, 1, 28, 28), torch.Generator().manual_seed(0))
    zeros = (out == 0).flatten(1).sum(dim=1)
    assert zeros.max() == 14 * 14 and zeros.min() > 0  # squares at the border are clipped
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_the_ops_are_differentiable_and_p_chooses_per_image():
    x = dot_images(8).requires_grad_(True)
    out = augment.augment(x, ("color", "translation", "cutout"), None, torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert grad.abs().sum() > 0  # G's gradient reaches through the augmentation
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(augment.augment(x, ("cutout",), torch.tensor(0.0), gen), x)
    mixed = augment.augment(torch.ones(64, 1, 28, 28), ("cutout",), torch.tensor(0.5), gen)
    untouched = (mixed == 1).flatten(1).all(dim=1).sum()
    assert 10 < untouched < 54  # about half the images kept as they were


def test_ada_raises_p_when_d_is_sure_of_the_reals_and_lowers_it_otherwise():
    p = torch.tensor(0.5)
    augment.adapt(p, torch.full((100,), 3.0), threshold=0.0, target=0.6)  # r_t = 1 > 0.6: overfitting
    assert p.item() == pytest.approx(0.5 + 100 / augment.ADA_SPEED_IMAGES)
    augment.adapt(p, torch.full((100,), -3.0), threshold=0.0, target=0.6)
    augment.adapt(p, torch.full((100,), -3.0), threshold=0.0, target=0.6)
    assert p.item() == pytest.approx(0.5 - 100 / augment.ADA_SPEED_IMAGES)
    zero = torch.tensor(0.0)
    augment.adapt(zero, torch.full((100,), -3.0), threshold=0.0, target=0.6)
    assert zero.item() == 0.0  # clamped to [0, 1]


@pytest.mark.parametrize("values, key", [({"augment": "translation,rotate"}, "augment"),
                                         ({"augment": ""}, "augment"),
                                         ({"augment_p": 1.5}, "augment_p"),
                                         ({"augment_target": 0.6}, "augment_target")])
def test_bad_augment_settings_name_their_key(values, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        TrainConfig(**values)


def test_augmentation_reaches_the_d_step_and_the_adaptive_p_is_reported_and_saved(tmp_path):
    images = load_mnist(BUNDLED, subset=256).images
    records = {}
    for aug in ("none", "translation,cutout"):
        cfg = TrainConfig(**TINY, augment=aug)
        records[aug] = loop.train_epoch(step.make_gan(cfg, CPU), images, loop.make_generator(cfg, CPU))
    assert records["none"]["loss_d"] != records["translation,cutout"]["loss_d"]
    assert (records["none"]["augment_p"], records["translation,cutout"]["augment_p"]) == (0.0, 1.0)
    cfg = TrainConfig(**TINY, augment="translation,cutout", augment_p=0.2, augment_target=0.6)
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    record = loop.train_epoch(gan, images, gen)
    assert record["augment_p"] != 0.2 and abs(record["augment_p"] - 0.2) <= 4 * 32 / augment.ADA_SPEED_IMAGES + 1e-6
    checkpoint.write(checkpoint.state(gan, 1, loop.fixed_noise(cfg, CPU), gen, []), tmp_path)
    other = step.make_gan(cfg, CPU)
    checkpoint.restore(other, checkpoint.read(tmp_path), loop.make_generator(cfg, CPU))
    assert other.augment_p.item() == pytest.approx(record["augment_p"])  # the adaptive p goes on where it was
