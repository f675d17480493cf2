"""The training step can be captured in a CUDA graph for every setting, proved on a CPU.

A CUDA graph records the GPU work of one iteration; any read of a device value on the host inside it
(`.item()`, `bool(t)`, a 0-dim tensor where an op wants a Python number, `.tolist()`, an op whose output
shape depends on the data) aborts the capture. Those reads are visible on a CPU too: at the dispatcher they
are ops tagged `data_dependent_output` or `dynamic_output_shape` (`aten._local_scalar_dense`, `aten.nonzero`,
...), the tags PyTorch's own fake tensors refuse; `.tolist()` / `.numpy()` / `.cpu()` never reach the
dispatcher on a CPU, so they are caught at the Python level.
"""

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gan_tune.training import loop, losses, step
from gan_tune.training.config import PRECISIONS, TrainConfig
from gan_tune.training.data import BUNDLED, load_mnist
from gan_tune.training.models import D_NORMS

CPU = torch.device("cpu")
TINY = dict(width=0.25, batch_size=8, steps_per_epoch=6, data_source=BUNDLED, subset=256, eval_every=0)
HOST_READ_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
PYTHON_READS = ("tolist", "numpy", "cpu")


class HostReads(TorchDispatchMode):
    """Records every op that makes the host wait for a device value, and every Tensor.tolist/numpy/cpu call."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.originals = {name: getattr(torch.Tensor, name) for name in PYTHON_READS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(tag in func.tags for tag in HOST_READ_TAGS) and not integer_gather(func, args):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, lambda t, *a, _f=original, _n=name, **k: self.seen.append(_n) or _f(t, *a, **k))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def integer_gather(func, args) -> bool:
    """images[idx] with integer indices: tagged dynamic_output_shape for boolean masks, but its shape is the
    index tensor's, so CUDA runs it without a host read."""
    return func is torch.ops.aten.index.Tensor and all(i is None or not i.dtype == torch.bool for i in args[1])


@pytest.fixture(scope="module")
def images():
    return load_mnist(BUNDLED, subset=256).images


def test_the_detector_sees_every_kind_of_host_read():
    """Guards the guard: if a PyTorch release dropped the tags, the capture test below would pass blindly."""
    x, weight = torch.ones(4), torch.tensor(0.5)
    reads = [lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: float(x.sum()), lambda: x.tolist(),
             lambda: x.nonzero(), lambda: x[x > 0], lambda: x.numpy(), lambda: x.cpu(),
             lambda: torch._foreach_lerp_([x.clone()], [x], weight)]  # the g_ema bug of issue 23
    for read in reads:
        with HostReads() as detector:
            read()
        assert detector.seen, read
    with HostReads() as detector:
        torch._foreach_mul_([x.clone()], weight)  # the Tensor overload stays on the device
        x[torch.tensor([0, 2])]  # an integer gather: its shape is the index's
    assert detector.seen == []


def capturable_gan(cfg: TrainConfig, monkeypatch) -> step.Gan:
    """A Gan with the optimisers a CUDA device gets (fused, capturable: the step count stays on the device)."""
    monkeypatch.setattr(step, "graph_unavailable", lambda cfg, device: None)
    gan = step.make_gan(cfg, CPU)
    monkeypatch.undo()
    assert gan.opt_d.defaults["capturable"] and gan.opt_d.defaults["fused"]
    return gan


SETTINGS = [dict(loss=loss, d_norm=d_norm, r1_gamma=r1, g_ema=ema, precision=precision, n_disc=n_disc)
            for loss, d_norm, r1, ema, precision, n_disc
            in itertools.product(losses.LOSSES, D_NORMS, (0.0, 1.0), (0.0, 0.999), PRECISIONS, (1, 2))
            if not (loss == "wgan-gp" and d_norm == "batch")]  # the one pair TrainConfig refuses


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_setting_trains_an_iteration_without_a_host_read(images, monkeypatch, setting):
    """What GraphStep captures (train_iteration after its warm-up) reads nothing on the host, for every
    combination of loss x d_norm x r1_gamma x g_ema x precision x n_disc."""
    cfg = TrainConfig(**TINY, **setting)
    gan, gen = capturable_gan(cfg, monkeypatch), loop.make_generator(cfg, CPU)
    sums = torch.zeros(step.N_STATS)
    idx = torch.arange(cfg.n_disc * cfg.batch_size).view(cfg.n_disc, cfg.batch_size)
    step.train_iteration(gan, images, idx, gen, sums)  # a warm-up iteration: optimiser state is created here
    with HostReads() as detector:
        step.train_iteration(gan, images, idx + cfg.batch_size, gen, sums)
    assert detector.seen == [], f"host reads in the captured step: {sorted(set(detector.seen))}"


@pytest.mark.parametrize("iteration", [0, 1], ids=["with R1", "without"])
def test_lazy_r1_iterations_read_nothing_on_the_host(images, monkeypatch, iteration):
    """Lazy R1 runs eagerly on CUDA (two different iterations), but picks its iterations by a host count: neither
    kind reads a device value."""
    cfg = TrainConfig(**TINY, r1_gamma=1.0, r1_every=2, g_ema=0.999)
    gan, gen = capturable_gan(cfg, monkeypatch), loop.make_generator(cfg, CPU)
    sums, idx = torch.zeros(step.N_STATS), torch.arange(cfg.batch_size).view(1, cfg.batch_size)
    step.train_iteration(gan, images, idx, gen, sums)
    gan.iteration = iteration
    with HostReads() as detector:
        step.train_iteration(gan, images, idx, gen, sums)
    assert detector.seen == []


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_the_other_model_families_capture_too(images, monkeypatch, model):
    cfg = TrainConfig(**TINY, model=model, g_ema=0.999, r1_gamma=1.0)
    gan, gen = capturable_gan(cfg, monkeypatch), loop.make_generator(cfg, CPU)
    sums, idx = torch.zeros(step.N_STATS), torch.arange(cfg.batch_size).view(1, cfg.batch_size)
    step.train_iteration(gan, images, idx, gen, sums)
    with HostReads() as detector:
        step.train_iteration(gan, images, idx, gen, sums)
    assert detector.seen == []


def test_an_epoch_reads_the_host_once(images):
    """Per-step reads cost a GPU a stall each; an epoch reads its statistics back once, with tolist."""
    cfg = TrainConfig(**TINY, g_ema=0.999, r1_gamma=1.0)
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    loop.train_epoch(gan, images, gen)  # the first epoch builds the step and the optimiser state
    with HostReads() as detector:
        loop.train_epoch(gan, images, gen)
    assert detector.seen == ["tolist"]


def test_a_cohort_epoch_reads_the_host_once(images):
    """Issue 27 item 4: a cohort epoch, like a trial's, reads every member's statistics back in one tolist."""
    from gan_tune.training import cohort, cohort_step

    cfgs = [TrainConfig(**TINY, seed=seed, lr_d=lr_d, g_ema=0.999, r1_gamma=1.0)
            for seed, lr_d in ((0, 2e-4), (1, 1e-3))]
    fused = cohort.make_cohort(cfgs, CPU)
    gens = cohort_step.make_generators(fused)
    cohort_step.train_cohort_epoch(fused, images, gens)  # the first epoch builds the step and the optimiser state
    with HostReads() as detector:
        records = cohort_step.train_cohort_epoch(fused, images, gens)
    assert detector.seen == ["tolist"] and len(records) == 2


def test_a_failed_capture_trains_on_eagerly_with_the_same_results(images, monkeypatch, caplog):
    """Forced to fail at capture, the graph path logs one line and trains exactly what the eager path trains."""
    cfg = TrainConfig(**TINY, g_ema=0.999, r1_gamma=1.0)

    def run(force_graph: bool):
        gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
        if force_graph:
            monkeypatch.setattr(step, "graph_unavailable", lambda cfg, device: None)
            monkeypatch.setattr(step.GraphStep, "warm_up", lambda self, idx: self.eager(idx))  # no side stream here
            monkeypatch.setattr(step.GraphStep, "capture", fail_capture)
        records = [loop.train_epoch(gan, images, gen) for _ in range(2)]
        monkeypatch.undo()
        return gan, records

    def fail_capture(self):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    eager, eager_records = run(force_graph=False)
    with caplog.at_level("WARNING", logger="gan_tune.training.step"):
        fallen, fallen_records = run(force_graph=True)
    assert [r["step_mode"] for r in fallen_records] == ["eager", "eager"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["CUDA graph capture failed, training on eagerly: "
                     "CUDA error: operation not permitted when stream is capturing"]
    for key in step.D_STATS + step.G_STATS:
        assert [r[key] for r in fallen_records] == [r[key] for r in eager_records], key
    for a, b in zip(eager.g_ema.parameters(), fallen.g_ema.parameters()):
        assert torch.equal(a, b)


def test_a_cohort_whose_capture_fails_trains_on_eagerly_with_the_same_results(images, monkeypatch, caplog):
    """The cohort step goes through the same GraphStep: forced to fail at capture, it trains on eagerly, exactly."""
    from gan_tune.training import cohort, cohort_step

    cfgs = [TrainConfig(**TINY, seed=seed, lr_d=lr_d, g_ema=0.999, r1_gamma=1.0)
            for seed, lr_d in ((0, 2e-4), (1, 1e-3))]

    def run(force_graph: bool) -> list[list[dict]]:
        fused = cohort.make_cohort(cfgs, CPU)
        gens = cohort_step.make_generators(fused)
        if force_graph:
            monkeypatch.setattr(step, "graph_unavailable", lambda cfg, device: None)
            monkeypatch.setattr(step.GraphStep, "warm_up", lambda self, idx: self.eager(idx))
            monkeypatch.setattr(step.GraphStep, "capture", lambda self: (_ for _ in ()).throw(RuntimeError("no")))
        records = [cohort_step.train_cohort_epoch(fused, images, gens) for _ in range(2)]
        assert fused.step_mode == "eager"
        monkeypatch.undo()
        return records

    eager = run(force_graph=False)
    with caplog.at_level("WARNING", logger="gan_tune.training.step"):
        fallen = run(force_graph=True)
    assert [r.getMessage() for r in caplog.records] == ["CUDA graph capture failed, training on eagerly: no"]
    for mine, theirs in zip(fallen, eager):
        assert [{k: v for k, v in r.items() if k != "cohort_img_per_s"} for r in mine] == \
               [{k: v for k, v in r.items() if k != "cohort_img_per_s"} for r in theirs]


AUGMENTS = [dict(augment="translation,cutout"), dict(augment="color,translation,cutout", augment_p=0.5),
            dict(augment="translation,cutout", augment_p=0.0, augment_target=0.6)]


@pytest.mark.parametrize("loss", list(losses.LOSSES))
@pytest.mark.parametrize("r1", [0.0, 1.0])
@pytest.mark.parametrize("aug", AUGMENTS, ids=["always", "p0.5", "adaptive"])
def test_augmented_iterations_read_nothing_on_the_host(images, monkeypatch, loss, r1, aug):
    cfg = TrainConfig(**TINY, loss=loss, d_norm="none" if loss == "wgan-gp" else "batch", r1_gamma=r1, g_ema=0.999,
                      **aug)
    gan, gen = capturable_gan(cfg, monkeypatch), loop.make_generator(cfg, CPU)
    sums, idx = torch.zeros(step.N_STATS), torch.arange(cfg.batch_size).view(1, cfg.batch_size)
    step.train_iteration(gan, images, idx, gen, sums)
    with HostReads() as detector:
        step.train_iteration(gan, images, idx + cfg.batch_size, gen, sums)
    assert detector.seen == [], f"host reads in the augmented step: {sorted(set(detector.seen))}"


@pytest.mark.parametrize("loss", list(losses.LOSSES))
@pytest.mark.parametrize("aug", [dict(), AUGMENTS[2], dict(precision="bf16")], ids=["fp32", "adaptive", "bf16"])
def test_a_cohort_iteration_reads_nothing_on_the_host(images, loss, aug):
    """The cohort step (issue 27) with g_ema and R1 on and two latent sizes: per-member Adam, the divergence
    mask and the weight averages all stay on the device."""
    from gan_tune.training import cohort, cohort_step

    base = dict(TINY, loss=loss, d_norm="spectral" if loss == "wgan-gp" else "batch", **aug)
    members = [(0, 16, 2e-4, 1.0, 0.999), (1, 8, 1e-3, 0.0, 0.0), (2, 8, 1e-4, 5.0, 0.9)]
    cfgs = [TrainConfig(**base, seed=seed, latent_dim=latent, lr_d=lr_d, r1_gamma=r1, g_ema=ema)
            for seed, latent, lr_d, r1, ema in members]
    fused = cohort.make_cohort(cfgs, CPU)
    gens, sums = cohort_step.make_generators(fused), torch.zeros(step.N_STATS, len(cfgs))
    idx = torch.arange(len(cfgs) * TINY["batch_size"]).view(len(cfgs), 1, TINY["batch_size"])
    cohort_step.cohort_iteration(fused, images, idx, gens, sums)  # the warm-up a capture would run first
    with HostReads() as detector:
        cohort_step.cohort_iteration(fused, images, idx + 32, gens, sums)
    assert detector.seen == [], f"host reads in the cohort step: {sorted(set(detector.seen))}"
