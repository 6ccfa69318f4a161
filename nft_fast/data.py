"""Data from users' files: tensors from ``.npz`` / ``.safetensors`` or an image folder, a
clean set's validation, and per-class subsets (one-shot purification)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import _checks
from .errors import DataError

__all__ = [
    "DataError", "ArrayDataset", "load_arrays", "image_folder", "check_inputs", "check_labels",
    "check_clean_set", "per_class", "MAX_ABS_INPUT",
]

#: Largest |x| accepted in a data set. Images are about [0, 1] (or a few units when
#: normalized); values far beyond overflow float32 BatchNorm statistics (x**2 past 3.4e38)
#: and give NaN running statistics instead of a purified model.
MAX_ABS_INPUT = 1e6


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


def _npz_declared(path: Path) -> dict:
    """``{name: (dtype, shape)}`` of the arrays of an ``.npz``, read from their headers only."""
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                shape, _, dtype = (read[version](f) if version in read
                                   else np.lib.format._read_array_header(f, version))
            out[info.filename[:-4]] = (dtype, tuple(shape))
    return out


def _declared(path: Path) -> dict:
    """The arrays a data file declares, ``{name: (itemsize, shape)}``, without reading them;
    refuses object arrays and files whose arrays (and the float32 copy of ``x``) would not fit
    in memory."""
    if path.suffix == ".safetensors":
        from .io import _ST_BYTES, safetensors_header

        arrs = {k: (_ST_BYTES[d], shape) for k, (d, shape) in safetensors_header(path).items()}
    else:
        arrs = {}
        for k, (dtype, shape) in _npz_declared(path).items():
            if dtype.hasobject:
                raise ValueError(f"array {k!r} holds Python objects (pickles are not loaded)")
            arrs[k] = (dtype.itemsize, shape)
    need = sum(math.prod(shape) * size for size, shape in arrs.values())
    need += 4 * math.prod(arrs["x"][1]) if "x" in arrs else 0  # x as float32
    _checks.fits_memory(need, f"its arrays ({', '.join(f'{k} {shape}' for k, (_, shape) in arrs.items())})")
    return arrs


def load_arrays(path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Read ``x`` (N, C, H, W; uint8 is scaled to [0, 1]), ``y`` (N,) and optional ``y_target``
    from ``.npz`` (no pickles) or ``.safetensors``. The declared shapes are checked (and the
    memory they need) before anything is read; ``x`` must be real-valued, ``y``/``y_target``
    integer labels, all with the same number of samples."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        _declared(path)
    except Exception as e:
        raise DataError(f"cannot read data file {path}: {str(e)[:300] or e.__class__.__name__}") from None
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
    if x.is_complex() or x.dtype == torch.bool:
        raise DataError(f"data file {path}: x must hold real numbers, got {x.dtype}")
    if x.dim() < 3:
        raise DataError(f"data file {path}: x has shape {tuple(x.shape)}; expected (N, C, H, W) images, (N, H, W) "
                        "grey images or (N, C, T, H, W) clips")
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    labels = {"y": y, "y_target": arrs.get("y_target")}
    for k, v in labels.items():
        if v is None:
            continue
        if v.dtype.is_floating_point or v.is_complex() or v.dtype == torch.bool or v.dim() != 1:
            raise DataError(f"data file {path}: {k} must be a 1-D integer array of labels, got {v.dtype} "
                            f"of shape {tuple(v.shape)}")
        if v.shape[0] != x.shape[0]:
            raise DataError(f"data file {path}: x has {x.shape[0]} samples but {k} has {v.shape[0]}")
        if v.dtype == torch.uint64 and bool((v.view(torch.int64) < 0).any()):  # would wrap to negative int64
            raise DataError(f"data file {path}: {k} holds labels beyond 2**63 - 1")
    yt = labels["y_target"]
    return x, y.long(), (yt.long() if yt is not None else None)


def check_inputs(x: torch.Tensor, what: str) -> None:
    """Raise :class:`DataError` when a data set's inputs hold NaN/inf or values beyond
    :data:`MAX_ABS_INPUT` (the rule for every data set: clean, test, poisoned). Checked in
    chunks of samples, so a large set needs little extra memory."""
    if x.numel() == 0:
        return
    flat = x.reshape(x.shape[0] if x.dim() else 1, -1)
    step = max(1, (1 << 24) // max(1, flat.shape[1]))
    nonfinite, big, peak = [], [], 0.0
    for i in range(0, flat.shape[0], step):
        a = flat[i:i + step].abs()
        fin = torch.isfinite(a)
        nonfinite.append((~fin).any(1))
        a = a.masked_fill(~fin, 0)
        big.append((a > MAX_ABS_INPUT).any(1))
        peak = max(peak, float(a.max()) if a.numel() else 0.0)
    if nonfinite and bool(torch.cat(nonfinite).any()):
        bad = torch.cat(nonfinite).nonzero().flatten()
        raise DataError(f"the {what} has NaN/inf values in {bad.numel()} samples (e.g. index {bad[:5].tolist()})")
    if big and bool(torch.cat(big).any()):
        bad = torch.cat(big).nonzero().flatten()
        raise DataError(f"the {what} has values of magnitude up to {peak:.3g} in {bad.numel()} samples "
                        f"(e.g. index {bad[:5].tolist()}); inputs must lie within +-{MAX_ABS_INPUT:g} "
                        "(images are expected in about [0, 1])")


def check_labels(y: torch.Tensor, num_classes: int, what: str) -> None:
    """Raise :class:`DataError` when labels are not integers in ``0 .. num_classes - 1``."""
    if y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"the {what} has labels of type {y.dtype}; expected integers")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"the {what} has labels outside 0..{num_classes - 1} (min {int(y.min())}, max {int(y.max())})")


def check_clean_set(x: torch.Tensor, y: torch.Tensor, num_classes: int, what: str = "clean set") -> None:
    """Raise :class:`DataError` naming the problem: empty, non-finite, bad or missing labels."""
    if x.shape[0] == 0:
        raise DataError(f"the {what} is empty")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"the {what} has {x.shape[0]} inputs but {y.shape[0]} labels")
    check_inputs(x, what)
    check_labels(y, num_classes, what)
    missing = sorted(set(range(num_classes)) - set(y.unique().tolist()))
    if missing:
        raise DataError(f"the {what} has no samples of {len(missing)} of the model's {num_classes} classes: {missing[:20]}")


# --- Fashion-MNIST ---------------------------------------------------------------------

def per_class(y: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``k`` samples of every class (``k=1``: one-shot)."""
    _checks.positive_int("k (samples per class)", k, owner="per_class")
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
            try:
                img = Image.open(f).convert("L" if grey else "RGB")
                if size is not None:
                    img = img.resize((size, size))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"cannot read the image {f}: {str(e)[:200] or type(e).__name__}") from None
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

