import gzip

import pandas as pd
import pytest
import torch

from gan_tune.training import data


def test_bundled_split_starts_with_canonical_labels():
    mnist = data.load_mnist(data.BUNDLED)
    assert mnist.source == "mnist-test-10k-bundled"
    assert mnist.images.shape == (10_000, 28, 28) and mnist.images.dtype == torch.uint8
    assert mnist.labels[:5].tolist() == [7, 2, 1, 0, 4]  # the canonical first test labels
    assert torch.bincount(mnist.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_subset_takes_first_images_and_records_it():
    full = data.load_mnist(data.BUNDLED)
    sub = data.load_mnist(data.BUNDLED, subset=100)
    assert len(sub) == 100 and sub.source == "mnist-test-10k-bundled[:100]"
    assert torch.equal(sub.images, full.images[:100])


def test_truncated_file_names_the_file(tmp_path):
    raw = gzip.open(data.bundled_file("images")).read()
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(raw[:5000]))
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        data.read_idx(bad)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(data.bundled_file("labels").read_bytes()[:100])
    with pytest.raises(data.DataError, match="cut.gz"):
        data.read_idx(cut)


def test_not_an_idx_file(tmp_path):
    bad = tmp_path / "x.idx"
    bad.write_bytes(b"hello world")
    with pytest.raises(data.DataError, match="bad magic"):
        data.read_idx(bad)


def test_epoch_batches_are_a_permutation_per_pass():
    gen = torch.Generator().manual_seed(0)
    idx = data.epoch_batches(10, 3, 6, gen, torch.device("cpu"))
    assert idx.shape == (6, 3)
    first_pass = idx[:3].flatten()  # 3 batches of 3 from 10 images: no repeats within a pass
    assert len(set(first_pass.tolist())) == 9


def test_to_float_range():
    x = data.to_float(torch.tensor([[[0, 255]]], dtype=torch.uint8))
    assert x.shape == (1, 1, 1, 2)
    assert x.flatten().tolist() == [-1.0, 1.0]


def test_auto_falls_back_offline_to_the_bundled_split_and_the_run_records_it(tmp_path, monkeypatch):
    """No cached MNIST in data_dir, and no network (a proxy nobody answers: torchvision's download fails as
    it does offline): `data_source: auto` trains on the bundled 10k and says so in the history."""
    from gan_tune import train

    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # the discard port: the connection is refused
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    mnist = data.load_mnist("auto", data_dir=tmp_path / "mnist")
    assert mnist.source == "mnist-test-10k-bundled" and len(mnist) == 10_000
    assert train.main(["--set", f"data_dir={tmp_path / 'mnist'}", "--set", "data_source=auto", "--set", "subset=256",
                       "--set", f"out_dir={tmp_path / 'runs'}", "--set", "width=0.25", "--set", "batch_size=32",
                       "--set", "steps_per_epoch=2", "--set", "max_epochs=1", "--set", "eval_every=0"]) == 0
    (history,) = (tmp_path / "runs").glob("*/history.csv")
    assert pd.read_csv(history)["data_source"].tolist() == ["mnist-test-10k-bundled[:256]"]
