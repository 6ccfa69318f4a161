"""Data: Fashion-MNIST (Debian's ``dataset-fashion-mnist``), clean/attacker splits, tensors
from files (``.npz`` / ``.safetensors``) or an image folder, validation of a clean set, and a
small synthetic task for fast tests.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class DataError(ValueError):
    """Data that cannot be used for purification (empty, non-finite, missing classes...)."""


class ArrayDataset(Dataset):
    """``(x, y)`` pairs from tensors; ``augment`` applies the reference training transforms
    (random crop with 4-pixel zero padding, horizontal flip) drawn from torch's global RNG."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool = False, pad: int = 4) -> None:
        if x.shape[0] != y.shape[0]:
            raise DataError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x, self.y, self.augment, self.pad = x, y, augment, pad

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment:
            h, w = x.shape[-2:]
            xp = F.pad(x, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = xp[..., dy:dy + h, dx:dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, self.y[i]


def load_arrays(path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Read ``x`` (N, C, H, W; uint8 is scaled to [0, 1]), ``y`` (N,) and optional ``y_target``
    from ``.npz`` (no pickles) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            arrs = {k: v for k, v in load_file(str(path)).items()}
        else:
            with np.load(path, allow_pickle=False) as z:
                arrs = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    except Exception as e:
        raise DataError(f"cannot read data file {path}: {e.__class__.__name__}: {str(e)[:120]}") from None
    if "x" not in arrs or "y" not in arrs:
        raise DataError(f"data file {path} must hold arrays named 'x' and 'y' (found {sorted(arrs)})")
    x, y = arrs["x"], arrs["y"]
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if y.dtype.is_floating_point or y.dim() != 1:
        raise DataError(f"data file {path}: y must be a 1-D integer array of labels")
    yt = arrs.get("y_target")
    return x, y.long(), (yt.long() if yt is not None else None)


def check_clean_set(x: torch.Tensor, y: torch.Tensor, num_classes: int, what: str = "clean set") -> None:
    """Raise :class:`DataError` naming the problem: empty, non-finite, bad or missing labels."""
    if x.shape[0] == 0:
        raise DataError(f"the {what} is empty")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero().flatten()
        raise DataError(f"the {what} has NaN/inf values in {bad.numel()} samples (e.g. index {bad[:5].tolist()})")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"the {what} has labels outside 0..{num_classes - 1} (min {int(y.min())}, max {int(y.max())})")
    missing = sorted(set(range(num_classes)) - set(y.unique().tolist()))
    if missing:
        raise DataError(f"the {what} has no samples of {len(missing)} of the model's {num_classes} classes: {missing[:20]}")


# --- Fashion-MNIST ---------------------------------------------------------------------

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
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
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


def per_class(y: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``k`` samples of every class (``k=1``: one-shot)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        if idx.numel() < k:
            raise DataError(f"class {c} has only {idx.numel()} samples, fewer than the {k} asked for")
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    return torch.cat(out).sort().values


def image_folder(root: Union[str, os.PathLike], size: Optional[int] = None, grey: bool = False) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """An ImageFolder-style tree (``root/<class>/<image>``) as tensors in [0, 1], labels and class names."""
    from PIL import Image

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root} is not an image folder: expected one sub-folder of images per class")
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
                continue
            img = Image.open(f).convert("L" if grey else "RGB")
            if size is not None:
                img = img.resize((size, size))
            arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div_(255)
            xs.append(arr.unsqueeze(0) if grey else arr.permute(2, 0, 1))
            ys.append(c)
    if not xs:
        raise DataError(f"no images found under {root}")
    try:
        x = torch.stack(xs)
    except RuntimeError:
        raise DataError(f"images under {root} differ in size: pass a size to resize them") from None
    return x, torch.tensor(ys), classes


# --- synthetic task (fast tests) -------------------------------------------------------

def toy_images(n: int, num_classes: int = 10, size: int = 16, channels: int = 1, seed: int = 0,
               noise: float = 0.15, prototype_seed: int = 1234) -> Tuple[torch.Tensor, torch.Tensor]:
    """A synthetic image task: each class is a smooth random prototype plus noise and a small shift.

    Prototypes depend only on ``prototype_seed`` so that separately drawn splits share classes.
    """
    gp = torch.Generator().manual_seed(prototype_seed)
    protos = F.interpolate(torch.rand(num_classes, channels, 4, 4, generator=gp), size=(size, size), mode="bilinear", align_corners=False)
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
