"""On a CUDA device: the step is captured and replayed as a CUDA graph for every setting, and the graph trains
what the eager path trains. Skipped without a GPU (the CPU suite proves the capture safety in test_capture.py);
`python -m gan_tune.bench gpu-check` runs this file on a lent GPU."""

import math

import pytest
import torch
from test_capture import SETTINGS, TINY

from gan_tune.training import loop, step
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import BUNDLED, load_mnist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def images():
    return load_mnist(BUNDLED, subset=256).to(CUDA).images


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_setting_trains_in_a_cuda_graph(images, setting, caplog):
    cfg = TrainConfig(**{**TINY, "steps_per_epoch": 6 * setting["n_disc"]}, **setting)  # 3 warm-up, then replays
    gan, gen = step.make_gan(cfg, CUDA), loop.make_generator(cfg, CUDA)
    with caplog.at_level("WARNING", logger="gan_tune.training.step"):
        record = loop.train_epoch(gan, images, gen)
    assert "capture failed" not in caplog.text
    assert record["step_mode"] == "cuda_graph"
    assert all(math.isfinite(record[key]) for key in ("loss_d", "loss_g", "d_acc"))


def test_the_graph_trains_what_the_eager_path_trains(images):
    records = {}
    for graph in (False, True):
        cfg = TrainConfig(**{**TINY, "steps_per_epoch": 8}, g_ema=0.999, r1_gamma=1.0, cuda_graph=graph)
        gan, gen = step.make_gan(cfg, CUDA), loop.make_generator(cfg, CUDA)
        records[graph] = [loop.train_epoch(gan, images, gen) for _ in range(2)]
    for key in ("loss_d", "loss_g", "d_acc"):
        for eager, graph in zip(records[False], records[True]):
            assert graph[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-4), key
