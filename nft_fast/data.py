"""Data from users' files: tensors from ``.npz`` / ``.safetensors`` or an image folder, a
clean set's validation, and per-class subsets (one-shot purification)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

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


def image_folder(root: Union[str, os.PathLike], size: Optional[int] = None,
                 grey: bool = False) -> Tuple[torch.Tensor, torch.Tensor, list]:
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

