import gzip

import pytest
import torch

from gan_tune import data


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
