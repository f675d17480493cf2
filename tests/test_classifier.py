import shutil

import pytest
import torch

from gan_tune import classifier
from gan_tune.quality import mnist_classifier
from gan_tune.quality.mnist_classifier import (
    FEATURE_DIM,
    HELD_OUT_START,
    WEIGHTS_FILE,
    ClassifierError,
    MnistClassifier,
    accuracy,
    asset_path,
    augment,
    classifier_checksum,
    classifier_info,
    file_sha256,
    load_classifier,
    save_classifier,
    sidecar_path,
    train_classifier,
)
from gan_tune.training.data import BUNDLED, Mnist, load_mnist

CPU = torch.device("cpu")
MAX_WEIGHTS_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def bundled() -> Mnist:
    return load_mnist(BUNDLED)


def test_shipped_weights_reach_their_recorded_held_out_accuracy(bundled):
    info = classifier_info()
    assert info["held_out"] == f"{BUNDLED}[{HELD_OUT_START}:]"
    held_out = Mnist(bundled.images[HELD_OUT_START:], bundled.labels[HELD_OUT_START:], info["held_out"])
    acc = accuracy(load_classifier(CPU), held_out, CPU)
    assert acc >= 0.98
    assert acc == pytest.approx(info["held_out_accuracy"], abs=0.002)


def test_sidecar_records_checksum_and_training_data():
    info = classifier_info()
    weights = asset_path(WEIGHTS_FILE)
    assert classifier_checksum() == info["sha256"] == file_sha256(weights)
    assert info["train_data"] in ("mnist-train-60k", f"{BUNDLED}[:{HELD_OUT_START}]")
    assert info["feature_dim"] == FEATURE_DIM
    assert weights.stat().st_size < MAX_WEIGHTS_BYTES


def test_corrupted_weights_raise_an_error_naming_the_file(tmp_path):
    weights = tmp_path / WEIGHTS_FILE
    shutil.copy(asset_path(WEIGHTS_FILE), weights)
    shutil.copy(sidecar_path(asset_path(WEIGHTS_FILE)), sidecar_path(weights))
    load_classifier(CPU, weights)  # the intact copy loads
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    mnist_classifier._load_verified.cache_clear()  # the intact copy is cached under the same path
    with pytest.raises(ClassifierError, match="sha256") as err:
        load_classifier(CPU, weights)
    assert str(weights) in str(err.value)


def test_missing_sidecar_is_an_error_naming_it(tmp_path):
    weights = tmp_path / WEIGHTS_FILE
    shutil.copy(asset_path(WEIGHTS_FILE), weights)
    with pytest.raises(ClassifierError, match="classifier.json"):
        load_classifier(CPU, weights)


def test_loaded_once_per_device_frozen_in_eval_mode():
    model = load_classifier(CPU)
    assert load_classifier("cpu") is model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_features_and_logits_shapes():
    model = load_classifier(CPU)
    x = torch.rand(7, 1, 28, 28) * 2 - 1
    features, logits = model.features_and_logits(x)
    assert 64 <= FEATURE_DIM <= 256
    assert features.shape == model.features(x).shape == (7, FEATURE_DIM)
    assert logits.shape == model(x).shape == (7, 10)
    torch.testing.assert_close(logits, model(x))


def test_augment_keeps_range_and_background():
    blank = -torch.ones(16, 1, 28, 28)
    out = augment(blank, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, blank)  # new pixels at the borders are background, not grey
    digits = torch.rand(16, 1, 28, 28) * 2 - 1
    moved = augment(digits, torch.Generator().manual_seed(0))
    assert moved.shape == digits.shape and moved.min() >= -1 and moved.max() <= 1
    assert not torch.equal(moved, digits)


def test_trained_weights_round_trip_through_the_sidecar(tmp_path, bundled):
    tiny = Mnist(bundled.images[:512], bundled.labels[:512], f"{BUNDLED}[:512]")
    model = train_classifier(tiny, epochs=1, seed=0, device=CPU, log=lambda line: None)
    weights = tmp_path / "mine.pt"
    info = save_classifier(model, weights, {"train_data": tiny.source})
    assert info["sha256"] == file_sha256(weights)
    loaded = load_classifier(CPU, weights)
    assert isinstance(loaded, MnistClassifier)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))


def test_cli_rejects_bad_epochs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        classifier.main(["train", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "--epochs" in capsys.readouterr().err
