"""Clean sets read one item at a time: image and video folder datasets, purification streamed
through DataLoader workers, the bounded sample the scans and BN recalibration see
(``purifier.gather``), bad folders, and ``nft-fast purify --data FOLDER --workers N``.

Everything is tiny (8x8 grey images, a ResNet-18 of width 4, a few steps) and runs on one thread.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from nft_fast import NFTConfig, models, purify
from nft_fast import data as D
from nft_fast.app.cli import main
from nft_fast.io import load_state_dict, save_state_dict
from nft_fast.purifier import gather

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, SIZE = 3, 8


def _image_folder(root: Path, per_class: int = 6, size: int = SIZE, grey: bool = True, seed: int = 0) -> Path:
    """``root/class<c>/<i>.png|jpg`` of random images (PNG and JPEG mixed)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size, size) if grey else (size, size, 3)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            name = f"{i:02d}.{'jpg' if i % 3 == 2 else 'png'}"
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"class{c}" / name)
    return root


def _model():
    torch.manual_seed(0)
    return models.build("resnet18", num_classes=CLASSES, in_channels=1, width=4, image_size=SIZE)


def _masks(result) -> dict:
    return result.masks()


# --- the datasets ----------------------------------------------------------------------------

def test_image_folder_dataset_reads_what_image_folder_reads(tmp_path):
    root = _image_folder(tmp_path / "f", grey=False)
    x, y, classes = D.image_folder(root)
    ds = D.ImageFolderDataset(root)
    assert len(ds) == x.shape[0] == 18 and ds.classes == classes and torch.equal(ds.targets, y)
    assert ds.sample_shape == tuple(x.shape[1:]) == (3, SIZE, SIZE)
    for i in range(len(ds)):
        xi, yi = ds[i]
        assert torch.equal(xi, x[i]) and yi == int(y[i])
    assert D.folder_kind(root) == "image" and isinstance(D.open_folder(root), D.ImageFolderDataset)
    xg, _, _ = D.image_folder(root, size=5, grey=True)
    dg = D.ImageFolderDataset(root, size=5, grey=True, transform=lambda t: t * 2)
    assert torch.equal(dg[3][0], 2 * xg[3]) and dg[3][0].shape == (1, 5, 5)
    assert D.ImageFolderDataset(root).digest() == ds.digest()


def test_video_folder_dataset(tmp_path):
    """Frame folders (natural frame order) and .npy/.pt/.safetensors clip files, as (C, T, H, W)."""
    from PIL import Image
    from safetensors.torch import save_file

    rng = np.random.default_rng(1)
    root, T = tmp_path / "v", 11
    frames = rng.integers(0, 256, (T, SIZE, SIZE), dtype=np.uint8)
    clip = root / "class0" / "clip0"
    clip.mkdir(parents=True)
    for t in range(T):  # frame_10 sorts after frame_9
        Image.fromarray(frames[t]).save(clip / f"frame_{t}.png")
    stored = rng.integers(0, 256, (1, T, SIZE, SIZE), dtype=np.uint8)
    np.save(root / "class0" / "clip1.npy", stored)
    (root / "class1").mkdir()
    floats = torch.rand(1, T, SIZE, SIZE)
    torch.save({"x": floats}, root / "class1" / "clip2.pt")
    save_file({"clip": floats * 0.5}, str(root / "class1" / "clip3.safetensors"))
    assert D.folder_kind(root) == "video"
    ds = D.open_folder(root, grey=True)
    assert isinstance(ds, D.VideoFolderDataset) and len(ds) == 4 and ds.targets.tolist() == [0, 0, 1, 1]
    assert ds.sample_shape == (1, T, SIZE, SIZE)
    assert torch.equal(ds[0][0], torch.from_numpy(frames).float().div(255).unsqueeze(0))
    assert torch.equal(ds[1][0], torch.from_numpy(stored).float() / 255)
    assert torch.equal(ds[2][0], floats) and torch.equal(ds[3][0], floats * 0.5)
    x, y, classes = D.load_folder(root, grey=True)
    assert x.shape == (4, 1, T, SIZE, SIZE) and torch.equal(x[2], floats) and classes == ["class0", "class1"]


# --- bad folders: one DataError, at creation ---------------------------------------------------

def test_bad_folders_raise_one_clear_error(tmp_path, monkeypatch):
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(D.DataError, match="not an image folder"):
        D.ImageFolderDataset(empty)
    with pytest.raises(D.DataError, match="not a data folder"):
        D.open_folder(empty)
    (empty / "cat").mkdir()
    with pytest.raises(D.DataError, match="no images found"):
        D.ImageFolderDataset(empty)
    with pytest.raises(D.DataError, match="no images or clips found"):
        D.open_folder(empty)

    mixed = _image_folder(tmp_path / "mixed", per_class=2)
    Image.fromarray(np.zeros((SIZE + 1, SIZE), dtype=np.uint8)).save(mixed / "class1" / "big.png")
    for read in (D.ImageFolderDataset, D.image_folder):
        with pytest.raises(D.DataError, match=r"differ in size: pass a size.*big\.png"):
            read(mixed)
    assert D.ImageFolderDataset(mixed, size=SIZE).sample_shape == (3, SIZE, SIZE)

    bad = _image_folder(tmp_path / "bad", per_class=2)
    (bad / "class2" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(D.DataError, match=r"cannot read the image .*broken\.png"):
        D.ImageFolderDataset(bad)

    # a valid header over truncated pixels: found when read, still one DataError naming the file
    trunc = _image_folder(tmp_path / "trunc", per_class=2, size=64)
    png = trunc / "class0" / "00.png"
    png.write_bytes(png.read_bytes()[:80])
    ds = D.ImageFolderDataset(trunc)
    with pytest.raises(D.DataError, match=r"cannot read the image .*00\.png"):
        ds[0]

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # every 8x8 image is a decompression bomb now
    with pytest.raises(D.DataError, match=r"cannot read the image .*decompression bomb"):
        D.ImageFolderDataset(_image_folder(tmp_path / "bomb", per_class=1))
    monkeypatch.undo()

    both = _image_folder(tmp_path / "both", per_class=1)
    np.save(both / "class0" / "clip.npy", np.zeros((1, 2, SIZE, SIZE), np.uint8))
    with pytest.raises(D.DataError, match="mixes images .* and clips"):
        D.open_folder(both)

    vid = tmp_path / "vid"
    (vid / "a").mkdir(parents=True)
    np.save(vid / "a" / "c0.npy", np.zeros((1, 4, SIZE, SIZE), np.uint8))
    np.save(vid / "a" / "c1.npy", np.zeros((1, 5, SIZE, SIZE), np.uint8))
    with pytest.raises(D.DataError, match=r"differ in shape .*c1\.npy"):
        D.VideoFolderDataset(vid)
    np.save(vid / "a" / "c1.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(D.DataError, match=r"c1\.npy.*(objects|pickle)"):
        D.VideoFolderDataset(vid)


# --- purification from a folder, through workers -----------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_purify_from_a_folder_equals_in_memory(tmp_path, workers):
    """Same seed, same samples: the same masks from the folder (read per batch, in worker
    processes or not) as from the tensors in memory; BN recalibration reads the same sample."""
    root = _image_folder(tmp_path / "f", per_class=8)
    x, y, _ = D.image_folder(root, grey=True)
    cfg = NFTConfig(steps=6, rounds=2, batch_size=8, bn_recalibrate=True)
    ref = purify(_model(), TensorDataset(x, y), cfg, progress=False)
    got = purify(_model(), D.ImageFolderDataset(root, grey=True), cfg, progress=False, num_workers=workers)
    a, b = _masks(ref), _masks(got)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for (n, t), (_, u) in zip(ref.model.state_dict().items(), got.model.state_dict().items()):
        assert torch.equal(t, u), n  # running statistics too (recalibrated on the same sample)


# --- gather: the bounded sample ---------------------------------------------------------------

def test_gather_is_bounded_stratified_and_deterministic():
    sizes = [3, 40, 100, 257]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    ds = TensorDataset(x, y)
    gx, gy = gather(ds, limit=100)
    assert gx.shape == (100, 1, 2, 2) and gy.bincount()[0] == 3 and sorted(gy.bincount().tolist()) == [3, 32, 32, 33]
    idx = gx[:, 0, 0, 0].long()  # the items chosen: distinct, in index order, labels matching
    assert torch.equal(idx, idx.unique()) and torch.equal(gy, y[idx])
    again = gather(ds, limit=100)
    assert torch.equal(again[0], gx) and torch.equal(again[1], gy)
    other = gather(ds, limit=100, seed=1)
    assert not torch.equal(other[0], gx) and sorted(other[1].bincount().tolist()) == [3, 32, 32, 33]
    assert gather(ds, limit=100, num_workers=2)[0].equal(gx)
    # within the bound: the whole set, in order (what small clean sets always got)
    wx, wy = gather(ds, limit=len(y))
    assert torch.equal(wx, x) and torch.equal(wy, y)
    # the byte bound: 16 bytes per sample, 160 bytes -> 10 samples, one class each at least
    bx, by = gather(ds, max_bytes=160)
    assert bx.shape[0] == 10 and by.unique().numel() == 4
    # a Subset's labels come from its parent; a dataset without labels gets a uniform random subset
    sub = Subset(ds, list(range(0, len(y), 2)))
    assert gather(sub, limit=20)[0].shape[0] == 20 and gather(sub, limit=20)[1].unique().numel() == 4

    class NoLabels(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i], y[i]

    ux, _ = gather(NoLabels(), limit=50)
    assert ux.shape[0] == 50 and torch.equal(ux, gather(NoLabels(), limit=50)[0])
    # a DataLoader is used as given: its first samples
    lx, ly = gather(DataLoader(ds, batch_size=7), limit=10)
    assert torch.equal(lx, x[:10]) and torch.equal(ly, y[:10])
    with pytest.raises(ValueError, match="limit"):
        gather(ds, limit=0)


def test_stratified_subset_quotas():
    y = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    idx = D.stratified_subset(y, 11, seed=3)
    assert idx.numel() == 11 and torch.equal(idx, idx.unique())
    assert sorted(y[idx].bincount().tolist()) == [2, 4, 5]  # class 0 whole, the rest split 4/5 at random
    assert torch.equal(idx, D.stratified_subset(y, 11, seed=3))
    assert torch.equal(D.stratified_subset(y, 50), torch.arange(22))


# --- the command line ------------------------------------------------------------------------------

def test_cli_purifies_from_an_image_folder(tmp_path, capsys):
    """``--data FOLDER --workers 2`` streams the folder; the masks equal those from the same
    images in an .npz file, and a bad folder is one error line."""
    root = _image_folder(tmp_path / "f", per_class=8)
    x, y, _ = D.image_folder(root, grey=True)
    np.savez(tmp_path / "clean.npz", x=x.numpy(), y=y.numpy())
    save_state_dict(_model().state_dict(), tmp_path / "model.safetensors")
    base = ["purify", "--checkpoint", str(tmp_path / "model.safetensors"), "--arch", "resnet18",
            "--steps", "6", "--rounds", "2", "--batch-size", "8", "--no-progress"]
    assert main([*base, "--data", str(root), "--out", str(tmp_path / "a"), "--workers", "2"]) == 0
    assert main([*base, "--data", str(tmp_path / "clean.npz"), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["clean_samples"] == len(y)
    ma, mb = (load_state_dict(tmp_path / o / "masks.safetensors") for o in "ab")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)

    (root / "class1" / "broken.png").write_bytes(b"nope")
    assert main([*base, "--data", str(root), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read the image" in err[0] and "broken.png" in err[0]
    assert not (tmp_path / "c").exists()
    assert main([*base, "--data", str(root), "--out", str(tmp_path / "d"), "--workers", "-1"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_cli_purifies_from_a_video_folder(tmp_path, capsys):
    """A video folder (frame folders and clip files mixed) as ``--data`` for a video net."""
    from PIL import Image

    rng = np.random.default_rng(2)
    root, T = tmp_path / "clips", 4
    for c in range(CLASSES):
        for k in range(4):
            if k % 2:
                np.save(root / f"class{c}" / f"clip{k}.npy", rng.integers(0, 256, (1, T, SIZE, SIZE), dtype=np.uint8))
                continue
            d = root / f"class{c}" / f"clip{k}"
            d.mkdir(parents=True)
            for t in range(T):
                Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(d / f"{t}.png")
    torch.manual_seed(0)
    net = models.build("r3d18", num_classes=CLASSES, in_channels=1, width=2, image_size=SIZE)
    save_state_dict(net.state_dict(), tmp_path / "video.safetensors")
    rc = main(["purify", "--checkpoint", str(tmp_path / "video.safetensors"), "--arch", "r3d18", "--data", str(root),
               "--out", str(tmp_path / "out"), "--steps", "4", "--rounds", "1", "--batch-size", "6", "--no-progress",
               "--workers", "1"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["clean_samples"] == 4 * CLASSES
