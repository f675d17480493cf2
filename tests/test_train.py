import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from gan_tune import train
from gan_tune.training import loop, losses, step
from gan_tune.training.config import TrainConfig
from gan_tune.training.data import BUNDLED, load_mnist

CPU = torch.device("cpu")
TINY = dict(width=0.25, batch_size=32, steps_per_epoch=4, data_source=BUNDLED, subset=256, eval_every=0)


@pytest.fixture(scope="module")
def images():
    return load_mnist(BUNDLED, subset=256).images


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_one_iteration_changes_both_models_and_losses_are_finite(images):
    cfg = TrainConfig(**TINY)
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    g0, d0 = params(gan.g), params(gan.d)
    sums = torch.zeros(len(step.D_STATS) + len(step.G_STATS))
    step.train_iteration(gan, images, torch.arange(32).view(1, 32), gen, sums)
    assert all(not torch.equal(a, b) for a, b in zip(g0, params(gan.g)))
    assert all(not torch.equal(a, b) for a, b in zip(d0, params(gan.d)))
    assert torch.isfinite(sums).all()
    assert 0 <= sums[1] <= 1 and 0 <= sums[2] <= 1  # accuracies of one step


def test_n_disc_steps_d_more_often(images):
    cfg = TrainConfig(**{**TINY, "n_disc": 3, "steps_per_epoch": 6})
    assert loop.iterations_per_epoch(cfg, len(images)) == 2
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    loop.train_epoch(gan, images, gen)
    assert gan.opt_d.state_dict()["state"][0]["step"] == 6
    assert gan.opt_g.state_dict()["state"][0]["step"] == 2


def test_epoch_record_has_every_metric(images):
    cfg = TrainConfig(**TINY)
    record = loop.train_epoch(step.make_gan(cfg, CPU), images, loop.make_generator(cfg, CPU))
    for key in ("loss_d", "loss_g", "d_acc_real", "d_acc_fake", "d_acc", "d_fake_prob", "img_per_s", "epoch_time_s"):
        assert math.isfinite(record[key]), key
    assert record["d_acc"] == pytest.approx((record["d_acc_real"] + record["d_acc_fake"]) / 2)
    assert 0 < record["d_fake_prob"] < 1
    assert record["balance"] in ("balanced", "borderline", "D too weak", "D too strong")


@pytest.mark.parametrize("model", ["balanced", "mlp", "dcgan"])
def test_deterministic_on_cpu(images, model):
    cfg = TrainConfig(**{**TINY, "model": model})
    runs = []
    for _ in range(2):
        gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
        runs.append([loop.train_epoch(gan, images, gen)[k] for k in ("loss_d", "loss_g", "d_acc")])
    assert runs[0] == runs[1]


def test_label_smoothing_changes_the_d_loss(images):
    d_losses = []
    for smoothing in (0.0, 0.2):
        cfg = TrainConfig(**{**TINY, "label_smoothing": smoothing})
        d_losses.append(loop.train_epoch(step.make_gan(cfg, CPU), images, loop.make_generator(cfg, CPU))["loss_d"])
    assert d_losses[0] != d_losses[1]


def test_huge_learning_rate_diverges_and_fit_stops(images):
    cfg = TrainConfig(**{**TINY, "lr_d": 50.0, "lr_g": 50.0, "beta1": 0.0, "max_epochs": 5, "model": "mlp"})
    records = list(loop.fit(step.make_gan(cfg, CPU), images, loop.make_generator(cfg, CPU)))
    assert records[-1]["balance"] == "diverged"
    assert len(records) < 5


@pytest.mark.parametrize("acc,label", [(0.2, "D too weak"), (0.35, "borderline"), (0.5, "balanced"), (0.9, "D too strong")])
def test_balance_bands(acc, label):
    assert loop.diagnose_balance({"loss_d": 1.0, "loss_g": 1.0, "d_acc": acc}) == label
    assert loop.diagnose_balance({"loss_d": math.nan, "loss_g": 1.0, "d_acc": acc}) == "diverged"
    assert loop.diagnose_balance({"loss_d": 1.0, "loss_g": 5.0e3, "d_acc": acc}) == "diverged"


def run_cli(tmp_path, *extra):
    args = ["--set", f"out_dir={tmp_path}", "--set", "name=t", "--set", "subset=1000", "--set", f"data_source={BUNDLED}",
            "--set", "width=0.25", "--set", "batch_size=64", "--set", "steps_per_epoch=4", "--set", "fid_samples=200"]
    return train.main(args + list(extra))


def test_cli_run_writes_every_artifact_and_resumes(tmp_path):
    assert run_cli(tmp_path, "--set", "max_epochs=2") == 0
    (run_dir,) = tmp_path.glob("t-*")
    for name in ("config.yaml", "train.log", "samples/epoch_001.png", "samples/epoch_002.png", "final_grid.png",
                 "history.png", "history.csv", "progress.gif", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert history["data_source"].iloc[0] == "mnist-test-10k-bundled[:1000]"
    assert history["fid"].notna().all()  # scored every epoch by default
    assert "mnist-test-10k-bundled[:1000]" in (run_dir / "train.log").read_text()

    assert train.main(["--resume", str(run_dir), "--set", "max_epochs=3"]) == 0
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]  # continued from epoch 2, not from zero
    assert "resumed" in (run_dir / "train.log").read_text()
    assert (run_dir / "samples/epoch_003.png").is_file()


@pytest.mark.parametrize("args,needle", [
    (["--set", "lr_d=-1.0"], "--set: lr_d"),
    (["--set", "model=gpt"], "--set: model"),
    (["--set", "latent_dim=0"], "--set: latent_dim"),
    (["--set", "nonsense"], "--set: nonsense"),
    (["--config", "missing.yaml"], "missing.yaml: path"),
    (["--resume", "no/such/run"], "--resume"),
])
def test_cli_bad_input_exits_2_with_one_line(args, needle, capsys):
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_cli_bad_yaml_key(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("lr_d: 2.0e-4\nlr_gg: 1.0e-4\n")
    assert train.main(["--config", str(path)]) == 2
    assert f"{path}: lr_gg: unknown key" in capsys.readouterr().err


# ---- the fast path's parts that run on a CPU (the CUDA graph itself is checked by the GPU benchmark)

# The capture-safety of the step (no host reads, every setting) is proved in test_capture.py.


def test_cpu_training_runs_eagerly_and_logs_why(images, caplog):
    cfg = TrainConfig(**TINY)  # cuda_graph defaults to on; a CPU cannot capture
    assert step.graph_unavailable(cfg, CPU) == "CUDA graphs need a CUDA device (running on cpu)"
    assert step.graph_unavailable(TrainConfig(**TINY, cuda_graph=False), torch.device("cuda")) == "cuda_graph is off"
    assert step.graph_unavailable(cfg, torch.device("cuda")) is None
    with caplog.at_level("INFO", logger="gan_tune.training.step"):
        record = loop.train_epoch(step.make_gan(cfg, CPU), images, loop.make_generator(cfg, CPU))
    assert record["step_mode"] == "eager"
    assert "training step runs eagerly: CUDA graphs need a CUDA device" in caplog.text


def test_bf16_precision_trains_close_to_fp32(images):
    """bf16 autocast keeps the loss in fp32: the first epoch's statistics stay within bf16's ~1 % of fp32's."""
    records = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(**{**TINY, "precision": precision, "steps_per_epoch": 2})
        records[precision] = loop.train_epoch(step.make_gan(cfg, CPU), images, loop.make_generator(cfg, CPU))
    for key in ("loss_d", "loss_g", "d_fake_prob"):
        assert records["bf16"][key] != records["fp32"][key]  # autocast really ran in bf16
        assert records["bf16"][key] == pytest.approx(records["fp32"][key], rel=0.05), key


def test_dry_run_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    out_dir = tmp_path / "runs"
    assert train.main(["--set", "width=0.25", "--set", f"out_dir={out_dir}", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == TrainConfig(width=0.25, out_dir=str(out_dir)).to_dict()
    assert not out_dir.exists()  # no run folder, so nothing was trained or written


def test_the_installed_console_script_runs_train_main(tmp_path):
    """pyproject's [project.scripts]: gan-tune-train sits beside the venv's python and runs outside the checkout;
    a bad flag's exit code 2 shows that main's return value reaches the shell."""
    script = Path(sys.executable).parent / "gan-tune-train"
    done = subprocess.run([str(script), "--set", "lr_d=-1.0"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --set: lr_d"), done.stderr


# ---- G weight averaging, loss families, D regularisation (issue 16)

def batch_norms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_g_ema_is_the_hand_computed_average_of_g_after_each_step(images):
    cfg = TrainConfig(**TINY, g_ema=0.5)
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    expected = params(gan.g)  # the average starts at G's initial weights
    sums = torch.zeros(step.N_STATS)
    for n in range(12):
        step.train_iteration(gan, images, torch.arange(32).view(1, 32) + 32 * (n % 4), gen, sums)
        decay = min(0.5, (1 + n) / (10 + n))  # the warm-up: 0.1, 0.18, ..., then 0.5 from the 9th update
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, params(gan.g))]
    averaged = params(gan.g_ema)
    assert all(torch.allclose(a, e, rtol=0, atol=1e-6) for a, e in zip(averaged, expected))
    assert gan.g_ema_updates.item() == 12
    assert not all(torch.equal(a, p) for a, p in zip(averaged, params(gan.g)))  # an average, not a copy of G


def test_g_ema_off_keeps_no_average_and_evaluates_g_itself():
    gan = step.make_gan(TrainConfig(**TINY), CPU)
    assert gan.g_ema is None and gan.eval_generator() is gan.g


def test_averaged_g_gets_batch_norm_statistics_recomputed_for_its_weights(images):
    cfg = TrainConfig(**TINY, g_ema=0.9)
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    loop.train_epoch(gan, images, gen)
    before = [bn.running_var.clone() for bn in batch_norms(gan.g_ema)]
    evaluated = gan.eval_generator()
    assert evaluated is gan.g_ema and not evaluated.training
    after = [bn.running_var.clone() for bn in batch_norms(evaluated)]
    assert len(after) == 3 and all(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(not torch.equal(a, bn.running_var) for a, bn in zip(after, batch_norms(gan.g)))  # not G's statistics
    assert all(bn.momentum == 0.1 for bn in batch_norms(evaluated))  # update_bn gives the momentum back
    gan.eval_generator()  # a second ask in the same epoch reuses the statistics (same noise: same values anyway)
    assert all(torch.equal(a, bn.running_var) for a, bn in zip(after, batch_norms(gan.g_ema)))


def test_fit_scores_the_averaged_generator(images):
    cfg = TrainConfig(**{**TINY, "g_ema": 0.9, "eval_every": 1, "max_epochs": 1})
    gan = step.make_gan(cfg, CPU)
    scored = []
    list(loop.fit(gan, images, loop.make_generator(cfg, CPU), scorer=lambda g, latent: scored.append(g) or {}))
    assert scored == [gan.g_ema] and gan.g_ema_bn_fresh


@pytest.mark.parametrize("loss", sorted(losses.LOSSES))
def test_each_loss_family_trains_with_finite_losses_and_accuracies_in_range(images, loss):
    cfg = TrainConfig(**TINY, loss=loss, d_norm="none" if loss == "wgan-gp" else "batch")
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    for _ in range(2):
        record = loop.train_epoch(gan, images, gen)
        assert all(math.isfinite(record[k]) for k in ("loss_d", "loss_g")), record
        for key in ("d_acc_real", "d_acc_fake", "d_acc", "d_fake_prob"):
            assert 0 <= record[key] <= 1, key
        assert record["balance"] != "diverged"


def test_loss_families_differ_from_the_default(images):
    values = {}
    for loss in losses.LOSSES:
        cfg = TrainConfig(**TINY, loss=loss, d_norm="none")
        values[loss] = loop.train_epoch(step.make_gan(cfg, CPU), images, loop.make_generator(cfg, CPU))["loss_d"]
    assert len(set(values.values())) == len(values)


def test_divergence_threshold_comes_from_the_loss_family():
    stats = {"loss_d": -40.0, "loss_g": 5.0e3, "d_acc": 0.5}
    assert loop.diagnose_balance(stats, "ns") == "diverged"
    assert loop.diagnose_balance(stats, "wgan-gp") == "balanced"  # a critic's level drifts; its losses may be large
    assert loop.diagnose_balance({**stats, "loss_d": -5.0e6}, "wgan-gp") == "diverged"


def test_spectral_norm_holds_each_d_weight_at_singular_value_one(images):
    cfg = TrainConfig(**TINY, model="dcgan", d_norm="spectral")
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    assert not batch_norms(gan.d)
    loop.train_epoch(gan, images, gen)
    layers = [m for m in gan.d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 3
    gan.d.eval()  # eval: read the weight with the power iteration's current estimate, no further iteration
    with torch.no_grad():
        sigmas = [torch.linalg.matrix_norm(layer.weight.flatten(1), ord=2).item() for layer in layers]
        raws = [torch.linalg.matrix_norm(layer.parametrizations.weight.original.flatten(1), ord=2).item()
                for layer in layers]
    # one power iteration per training forward: the estimate trails the moving weights by a few percent
    assert sigmas == pytest.approx([1.0] * 3, abs=0.1)
    assert raws != pytest.approx([1.0] * 3, abs=0.1)  # the parametrization, not the raw weights, is at 1


def test_r1_penalty_changes_the_d_update(images):
    updated = []
    for gamma in (0.0, 10.0):
        cfg = TrainConfig(**TINY, r1_gamma=gamma)
        gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
        sums = torch.zeros(step.N_STATS)
        for n in range(2):  # Adam's first update is about lr * sign(gradient): a second one shows magnitudes
            step.train_iteration(gan, images, torch.arange(32).view(1, 32) + 32 * n, gen, sums)
        updated.append((params(gan.d), sums[0].clone()))
    (d_off, loss_off), (d_on, loss_on) = updated
    assert all(not torch.equal(a, b) for a, b in zip(d_off, d_on))
    assert loss_on > loss_off  # the penalty is added to D's loss and is never negative


def d_after_iterations(cfg: TrainConfig, images, iterations: list[int]) -> tuple[list[torch.Tensor], float]:
    """D's weights and the summed D loss after one iteration per entry of `iterations` (each run as that
    iteration of its epoch), on the same batches and noise whatever the config."""
    gan, gen = step.make_gan(cfg, CPU), loop.make_generator(cfg, CPU)
    sums = torch.zeros(step.N_STATS)
    for n, iteration in enumerate(iterations):
        gan.iteration = iteration
        step.train_iteration(gan, images, torch.arange(32).view(1, 32) + 32 * n, gen, sums)
    return params(gan.d), sums[0].item()


def test_lazy_r1_regularises_every_r1_everyth_iteration_at_r1_every_times_gamma(images):
    """StyleGAN2's lazy R1: iteration 0 of an epoch carries r1_gamma * r1_every, iterations 1..3 none; an eager
    R1 at 4 gamma, then none, trains the same D exactly."""
    lazy = d_after_iterations(TrainConfig(**TINY, r1_gamma=1.0, r1_every=4), images, [0, 1, 2, 3])
    eager_rest = TrainConfig(**TINY, r1_gamma=4.0)
    gan, gen = step.make_gan(eager_rest, CPU), loop.make_generator(eager_rest, CPU)
    sums = torch.zeros(step.N_STATS)
    for n in range(4):
        if n == 1:
            gan.cfg = TrainConfig(**TINY)  # R1 off from the second iteration on
        step.train_iteration(gan, images, torch.arange(32).view(1, 32) + 32 * n, gen, sums)
    assert all(torch.equal(a, b) for a, b in zip(lazy[0], params(gan.d)))
    assert lazy[1] == pytest.approx(sums[0].item(), rel=1e-6)
    every = d_after_iterations(TrainConfig(**TINY, r1_gamma=1.0), images, [0, 1, 2, 3])
    assert not all(torch.equal(a, b) for a, b in zip(lazy[0], every[0]))  # not R1 on every iteration


def test_lazy_r1_trains_eagerly_on_cuda_and_says_why():
    reason = step.graph_unavailable(TrainConfig(r1_gamma=1.0, r1_every=16, device="cuda"), torch.device("cuda"))
    assert reason is not None and "r1_every 16" in reason
    assert step.graph_unavailable(TrainConfig(r1_gamma=1.0, device="cuda"), torch.device("cuda")) is None
    # without R1 every iteration is the same one: r1_every alone does not cost the graph
    assert step.graph_unavailable(TrainConfig(r1_every=16, device="cuda"), torch.device("cuda")) is None
