"""Fashion-MNIST loading, splits, image folders, and the clean-set checks."""
import gzip
import struct

import numpy as np
import pytest
import torch

from nft_fast import data as D
from nft_fast.harness import datasets as DS

HAVE_FMNIST = (DS.data_dir() / DS.FASHION_MNIST_FILES["test"][0]).is_file()


def write_idx(path, arr):
    header = struct.pack(">4B", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 20)):
        img, lab = DS.FASHION_MNIST_FILES[split]
        write_idx(tmp_path / img, rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / lab, np.arange(n) % 10)
    return tmp_path


def test_reads_idx_from_a_data_dir_and_env(fake_fmnist, monkeypatch):
    x, y = DS.fashion_mnist("train", fake_fmnist)
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(y, torch.arange(50) % 10)
    monkeypatch.setenv("NFT_FAST_DATA_DIR", str(fake_fmnist))
    assert DS.fashion_mnist("test")[0].shape == (20, 1, 28, 28)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(D.DataError, match="apt-get install dataset-fashion-mnist"):
        DS.fashion_mnist("train", tmp_path)


def test_truncated_idx_is_an_error(tmp_path):
    p = tmp_path / "bad.gz"
    with gzip.open(p, "wb") as f:
        f.write(struct.pack(">4B", 0, 0, 8, 2) + struct.pack(">2I", 10, 10) + b"\0" * 7)
    with pytest.raises(D.DataError, match="truncated"):
        DS.read_idx(p)


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    x, y = DS.fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and torch.equal(y.bincount(), torch.full((10,), 1000))


def test_holdout_split_is_disjoint_stratified_and_seeded():
    y = torch.arange(1000) % 10
    a, c = DS.holdout_split(y, 0.05, seed=0)
    assert a.numel() + c.numel() == 1000 and not set(a.tolist()) & set(c.tolist())
    assert torch.equal(y[c].bincount(), torch.full((10,), 5))
    a2, c2 = DS.holdout_split(y, 0.05, seed=0)
    assert torch.equal(c, c2) and not torch.equal(c, DS.holdout_split(y, 0.05, seed=1)[1])
    one = D.per_class(y[c], 1)
    assert torch.equal(y[c][one].sort().values, torch.arange(10))
    with pytest.raises(D.DataError, match="fewer than"):
        D.per_class(y[c], 6)


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((5, 5, 3), 40 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    x, y, classes = D.image_folder(tmp_path)
    assert x.shape == (4, 3, 5, 5) and y.tolist() == [0, 0, 1, 1] and classes == ["cat", "dog"]
    xg, _, _ = D.image_folder(tmp_path, size=8, grey=True)
    assert xg.shape == (4, 1, 8, 8)
    with pytest.raises(D.DataError, match="not an image folder"):
        D.image_folder(tmp_path / "cat")


def test_check_clean_set_errors():
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    D.check_clean_set(x, y, 3)
    with pytest.raises(D.DataError, match="empty"):
        D.check_clean_set(x[:0], y[:0], 3)
    with pytest.raises(D.DataError, match=r"\[3\]"):
        D.check_clean_set(x, y, 4)
    with pytest.raises(D.DataError, match="outside"):
        D.check_clean_set(x, y + 1, 3)
    bad = x.clone()
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(D.DataError, match="NaN/inf"):
        D.check_clean_set(bad, y, 3)


def test_moving_shapes_label_is_the_motion():
    x, y = DS.moving_shapes(64, frames=6, size=14, obj=3, seed=3)
    assert x.shape == (64, 1, 6, 14, 14) and float(x.min()) >= 0 and float(x.max()) <= 1
    for i in range(64):
        # centre of mass of the bright square per frame moves by MOTIONS[y] each frame
        f = (x[i, 0] > 0.5).float()
        rows = torch.arange(14).float()
        r = (f.sum(2) * rows).sum(1) / f.sum((1, 2))
        c = (f.sum(1) * rows).sum(1) / f.sum((1, 2))
        dx, dy = DS.MOTIONS[int(y[i])]
        assert torch.allclose(r[1:] - r[:-1], torch.full((5,), float(dy))), i
        assert torch.allclose(c[1:] - c[:-1], torch.full((5,), float(dx))), i
    assert torch.equal(DS.moving_shapes(8, seed=1)[0], DS.moving_shapes(8, seed=1)[0])
    with pytest.raises(ValueError, match="too small"):
        DS.moving_shapes(2, frames=8, size=10, obj=4)
