"""The checkpoint format, with and without G weight averaging: restore brings back both generators exactly and a
resumed run continues as an uninterrupted one; export gives the average."""

import pytest
import torch

from gan_tune.training import checkpoint, loop, step
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import BUNDLED, load_mnist

CPU = torch.device("cpu")
TINY = dict(width=0.25, batch_size=32, steps_per_epoch=4, data_source=BUNDLED, subset=256, eval_every=0, g_ema=0.9)


@pytest.fixture(scope="module")
def images():
    return load_mnist(BUNDLED, subset=256).images


def trained(cfg: TrainConfig, images, epochs: int = 1):
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    history = [{"epoch": e, **loop.train_epoch(gan, images, gen)} for e in range(1, epochs + 1)]
    return gan, gen, history


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_restore_brings_back_the_averaged_generator_exactly(images):
    cfg = TrainConfig(**TINY)
    gan, gen, history = trained(cfg, images)
    saved = checkpoint.state(gan, 1, loop.fixed_noise(cfg, CPU), gen, history)
    assert tensors_equal(saved["g_ema"], gan.g_ema.state_dict())  # with the statistics recomputed for it
    other = step.make_gan(TrainConfig(**{**TINY, "seed": 7}), CPU)
    checkpoint.restore(other, saved, torch.Generator())
    assert tensors_equal(other.g_ema.state_dict(), gan.g_ema.state_dict())
    assert tensors_equal(other.g.state_dict(), gan.g.state_dict())
    assert not tensors_equal(other.g_ema.state_dict(), other.g.state_dict())
    assert other.g_ema_updates.item() == gan.g_ema_updates.item() == saved["g_ema_updates"] > 0  # warm-up goes on


@pytest.mark.parametrize("g_ema", [0.0, 0.9], ids=["plain", "averaged"])
def test_a_resumed_run_continues_as_an_uninterrupted_one(images, g_ema):
    """Restored into a GAN built with another seed, epoch 2 has the uninterrupted run's losses, and its evaluated
    generator (the average when g_ema is on, G otherwise) the same weights."""
    cfg = TrainConfig(**{**TINY, "max_epochs": 2, "g_ema": g_ema})
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    straight = list(loop.fit(gan, images, gen))
    first_gan, first_gen, history = trained(cfg, images)
    saved = checkpoint.state(first_gan, 1, loop.fixed_noise(cfg, CPU), first_gen, history)
    resumed, gen2 = step.make_gan(TrainConfig(**{**TINY, "max_epochs": 2, "g_ema": g_ema, "seed": 7}), CPU), \
        torch.Generator()
    resumed.cfg = cfg
    start, _, restored_history = checkpoint.restore(resumed, saved, gen2)
    assert start == 1 and len(restored_history) == 1
    record = next(loop.fit(resumed, images, gen2, start_epoch=start))
    assert (record["loss_d"], record["loss_g"]) == (straight[1]["loss_d"], straight[1]["loss_g"])
    assert tensors_equal(resumed.eval_generator().state_dict(), gan.eval_generator().state_dict())


def test_a_checkpoint_without_an_average_starts_one_from_its_g(images):
    """E.g. --resume with g_ema switched on: the average starts where a fresh run's would, at G."""
    off = TrainConfig(**{**TINY, "g_ema": 0.0})
    gan, gen, history = trained(off, images)
    saved = checkpoint.state(gan, 1, loop.fixed_noise(off, CPU), gen, history)
    assert "g_ema" not in saved
    on = step.make_gan(TrainConfig(**TINY), CPU)
    checkpoint.restore(on, saved, torch.Generator())
    assert tensors_equal(on.g_ema.state_dict(), gan.g.state_dict())


def test_load_generator_gives_the_averaged_generator(images, tmp_path):
    cfg = TrainConfig(**TINY)
    gan, gen, history = trained(cfg, images)
    checkpoint.write(checkpoint.state(gan, 1, loop.fixed_noise(cfg, CPU), gen, history), tmp_path)
    g, loaded_cfg, _ = checkpoint.load_generator(tmp_path)
    assert loaded_cfg == cfg and not g.training
    assert tensors_equal(g.state_dict(), gan.eval_generator().state_dict())
    assert not tensors_equal(g.state_dict(), gan.g.state_dict())
    z = loop.fixed_noise(cfg, CPU)
    # close, not equal: the training copy runs channels_last on a CPU, the rebuilt one contiguous
    assert torch.allclose(loop.generate(g, z), loop.generate(gan.eval_generator(), z), atol=1e-5)


def test_without_averaging_load_generator_gives_g(images, tmp_path):
    cfg = TrainConfig(**{**TINY, "g_ema": 0.0})
    gan, gen, history = trained(cfg, images)
    checkpoint.write(checkpoint.state(gan, 1, loop.fixed_noise(cfg, CPU), gen, history), tmp_path)
    g, _, _ = checkpoint.load_generator(tmp_path)
    assert tensors_equal(g.state_dict(), gan.g.state_dict())
