"""Datasets of the backdoor harness: Fashion-MNIST (Debian's ``dataset-fashion-mnist``), the
defender/attacker split, and small synthetic tasks (images, moving-shape clips) for fast tests.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DataError


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def data_dir(override: Optional[Union[str, os.PathLike]] = None) -> Path:
    """``override``, else ``$NFT_FAST_DATA_DIR``, else Debian's Fashion-MNIST folder."""
    return Path(override or os.environ.get("NFT_FAST_DATA_DIR") or FASHION_MNIST_DIR)


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, cut short, unreadable
        raise DataError(f"cannot read {path}: {str(e)[:200] or type(e).__name__}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: its header declares {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise DataError(f"{path} is truncated: {data.size} values for shape {dims}")
    return data.reshape(dims)


def fashion_mnist(split: str = "train", root: Optional[Union[str, os.PathLike]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as (N, 1, 28, 28) floats in [0, 1] and labels."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = data_dir(root)
    paths = [d / f for f in FASHION_MNIST_FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST not found in {d} (missing {', '.join(missing)}): install it with "
                        "`apt-get install dataset-fashion-mnist`, or point --data-dir / NFT_FAST_DATA_DIR at a folder "
                        "holding the four IDX .gz files")
    x, y = read_idx(paths[0]), read_idx(paths[1])
    if x.ndim != 3 or y.ndim != 1:
        raise DataError(f"{paths[0]} and {paths[1]} hold arrays of shapes {x.shape} and {y.shape}: expected (N, H, W) "
                        "images and (N,) labels")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise DataError(f"{paths[0]} holds {x.shape[0]} images and {paths[1]} {y.shape[0]} labels: expected the same "
                        "number, at least one")
    if int(y.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{paths[1]} has labels outside 0..{len(FASHION_MNIST_CLASSES) - 1} (max {int(y.max())})")
    return torch.from_numpy(x.copy()).unsqueeze(1).float().div_(255), torch.from_numpy(y.astype(np.int64))


def holdout_split(y: torch.Tensor, fraction: float = 0.01, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(attacker, clean)``: a class-stratified ``fraction`` of the training split is
    held out as the defender's clean set; the attacker trains on the rest (disjoint)."""
    if not 0 < fraction < 1:
        raise ValueError(f"clean fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    clean = []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        clean.append(idx[: max(1, int(round(fraction * idx.numel())))])
    clean_idx = torch.cat(clean).sort().values
    keep = torch.ones(y.shape[0], dtype=torch.bool)
    keep[clean_idx] = False
    return keep.nonzero().flatten(), clean_idx


def toy_images(n: int, num_classes: int = 10, size: int = 16, channels: int = 1, seed: int = 0,
               noise: float = 0.15, prototype_seed: int = 1234) -> Tuple[torch.Tensor, torch.Tensor]:
    """A synthetic image task: each class is a smooth random prototype plus noise and a small shift.

    Prototypes depend only on ``prototype_seed`` so that separately drawn splits share classes.
    """
    gp = torch.Generator().manual_seed(prototype_seed)
    protos = F.interpolate(torch.rand(num_classes, channels, 4, 4, generator=gp), size=(size, size), mode="bilinear",
                           align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    x = protos[y] + noise * torch.randn(n, channels, size, size, generator=g)
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    x = torch.stack([torch.roll(xi, tuple(s.tolist()), dims=(-2, -1)) for xi, s in zip(x, shifts)])
    return x.clamp(0, 1), y


#: Motion directions of :func:`moving_shapes` (class k moves by ``MOTIONS[k]`` pixels per frame).
MOTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))


def moving_shapes(n: int, frames: int = 8, size: int = 16, obj: int = 4, noise: float = 0.1,
                  seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A synthetic-motion video task: ``(n, 1, frames, size, size)`` clips in [0, 1] of a bright
    ``obj``-pixel square crossing a noisy background; the label (8 classes) is its direction of
    motion (:data:`MOTIONS`), so no single frame tells the class -- the network must use time.
    Start positions and brightness are random; the square stays inside the frame."""
    if size < obj + frames:
        raise ValueError(f"moving_shapes: size {size} is too small for a {obj}-pixel square moving {frames} frames")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(len(MOTIONS), (n,), generator=g)
    x = noise * torch.rand(n, 1, frames, size, size, generator=g)
    span = size - obj - (frames - 1)
    for i in range(n):
        dx, dy = MOTIONS[int(y[i])]
        r0 = int(torch.randint(span + 1, (1,), generator=g)) + (frames - 1 if dy < 0 else 0)
        c0 = int(torch.randint(span + 1, (1,), generator=g)) + (frames - 1 if dx < 0 else 0)
        v = 0.6 + 0.4 * float(torch.rand(1, generator=g))
        for t in range(frames):
            r, c = r0 + dy * t, c0 + dx * t
            x[i, 0, t, r:r + obj, c:c + obj] = v
    return x, y
