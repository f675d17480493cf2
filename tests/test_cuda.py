"""On a CUDA device: the step is captured and replayed as a CUDA graph for every setting, and the graph trains
what the eager path trains. Skipped without a GPU (the CPU suite proves the capture safety in test_capture.py);
`python -m gan_tune.bench gpu-check` runs this file on a lent GPU."""

import math

import pytest
import torch
from test_capture import SETTINGS, TINY

from gan_tune.benchmarks import throughput
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


def test_a_cohort_iteration_replays_in_a_cuda_graph_as_it_runs_eagerly(images):
    """Issue 27: the cohort step (two latent sizes, R1 and g_ema on some members) captured after three eager
    warm-up iterations on a side stream, each member's generator registered with the graph, then replayed on
    fresh batch indices: the same per-member statistics as eight eager iterations. (Written without a GPU;
    test_capture.py proves on the CPU that the step reads nothing on the host.)"""
    from gan_tune.training import cohort, cohort_step

    members = [(0, 16, 2e-4, 1.0, 0.999), (1, 8, 1e-3, 0.0, 0.0), (2, 8, 1e-4, 5.0, 0.9)]
    cfgs = [TrainConfig(**TINY, seed=seed, latent_dim=latent, lr_d=lr_d, r1_gamma=r1, g_ema=ema)
            for seed, latent, lr_d, r1, ema in members]
    draw = torch.Generator(device=CUDA).manual_seed(7)
    idx = torch.randint(0, 256, (8, len(cfgs), 1, TINY["batch_size"]), device=CUDA, generator=draw)

    def run(graphed: bool) -> torch.Tensor:
        fused = cohort.make_cohort(cfgs, CUDA)
        gens, sums = cohort_step.make_generators(fused), torch.zeros(step.N_STATS, len(cfgs), device=CUDA)
        static, out = idx[0].clone(), []

        def iteration(batch):
            sums.zero_()
            cohort_step.cohort_iteration(fused, images, batch, gens, sums)
            out.append(sums.clone())

        warm = 3 if graphed else len(idx)
        side = torch.cuda.Stream(CUDA)
        side.wait_stream(torch.cuda.current_stream(CUDA))
        with torch.cuda.stream(side):
            for i in range(warm):
                iteration(idx[i])
        torch.cuda.current_stream(CUDA).wait_stream(side)
        if graphed:
            graph = torch.cuda.CUDAGraph()
            for gen in gens:
                graph.register_generator_state(gen)
            fused.opt_d.zero_grad()
            fused.opt_g.zero_grad()
            with torch.cuda.graph(graph):
                cohort_step.cohort_iteration(fused, images, static, gens, sums)
            for i in range(warm, len(idx)):
                static.copy_(idx[i])
                sums.zero_()
                graph.replay()
                out.append(sums.clone())
        return torch.stack(out)

    torch.testing.assert_close(run(graphed=True), run(graphed=False), rtol=1e-3, atol=1e-4)


def test_a_cohort_epoch_in_its_cuda_graph_trains_as_it_does_eagerly(images):
    """Issue 27: train_cohort_epoch's own path (build_cohort_step -> step.GraphStep with every member's generator
    registered) against the same cohort with cuda_graph off: the same per-member statistics."""
    from dataclasses import replace

    from gan_tune.training import cohort, cohort_step

    members = [(0, 16, 2e-4, 1.0, 0.999), (1, 8, 1e-3, 0.0, 0.0), (2, 8, 1e-4, 5.0, 0.9)]
    cfgs = [TrainConfig(**TINY, seed=seed, latent_dim=latent, lr_d=lr_d, r1_gamma=r1, g_ema=ema)
            for seed, latent, lr_d, r1, ema in members]

    def run(graph: bool) -> list[list[dict]]:
        fused = cohort.make_cohort([replace(cfg, cuda_graph=graph) for cfg in cfgs], CUDA)
        gens = cohort_step.make_generators(fused)
        records = [cohort_step.train_cohort_epoch(fused, images, gens) for _ in range(3)]
        assert fused.step_mode == ("cuda_graph" if graph else "eager")
        return records

    for graphed, eager in zip(run(True), run(False)):
        for mine, theirs in zip(graphed, eager):
            for key in step.D_STATS + step.G_STATS:
                assert math.isclose(mine[key], theirs[key], rel_tol=1e-3, abs_tol=1e-4), key


def test_quality_parity_on_cuda_compares_eager_with_a_captured_graph():
    """The same seed through eager and CUDA-graph steps (both TF32): the graph replays the eager step's kernels,
    so the first steps' losses agree to rounding; bf16 in a graph trains a GAN of comparable FID."""
    data = load_mnist(BUNDLED)
    cfg = TrainConfig(device="cuda", width=0.25, batch_size=32, steps_per_epoch=4, max_epochs=2, fid_samples=200,
                      data_source=data.source)  # the size of test_bench.PARITY
    numbers = throughput.quality_parity(CUDA, data, cfg)
    assert numbers["step_mode b"] == "eager" and numbers["step_mode c"] == numbers["step_mode d"] == "cuda_graph"
    assert numbers["loss_d rel diff c vs b"] < 1e-3 and numbers["loss_g rel diff c vs b"] < 1e-3, numbers
    assert math.isfinite(numbers["fid d / fid b"]) and numbers["fid d / fid b"] > 0, numbers
