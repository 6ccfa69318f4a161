"""Data from users' files: tensors from ``.npz`` / ``.safetensors``, image and video folders
read whole or streamed item by item (:class:`ImageFolderDataset`, :class:`VideoFolderDataset`),
a clean set's validation, and per-class subsets (one-shot purification)."""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import _checks
from .errors import DataError

__all__ = [
    "DataError", "ArrayDataset", "load_arrays", "image_folder", "check_inputs", "check_labels",
    "check_clean_set", "per_class", "MAX_ABS_INPUT",
    "ImageFolderDataset", "VideoFolderDataset", "open_folder", "folder_kind", "load_folder", "stack_folder",
    "read_image", "crop_flip", "check_clean_labels", "dataset_labels", "stratified_subset",
    "IMAGE_SUFFIXES", "CLIP_SUFFIXES",
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
            x = crop_flip(x, self.pad)
        return x, self.y[i]


def crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """The reference training transform of one sample: a random crop of its own size from the
    sample zero-padded by ``pad`` pixels, then a horizontal flip with probability 1/2, both
    drawn from torch's global RNG (in a DataLoader worker: the worker's own seeded RNG)."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (pad,) * 4)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    x = xp[..., dy:dy + h, dx:dx + w]
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


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


def check_clean_labels(y: torch.Tensor, num_classes: int, what: str = "clean set") -> None:
    """:func:`check_clean_set`'s checks of the labels alone (empty, out of range, missing
    classes), for a streamed clean set whose inputs are checked as they are read."""
    if y.shape[0] == 0:
        raise DataError(f"the {what} is empty")
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


def dataset_labels(data: Dataset) -> Optional[torch.Tensor]:
    """Every label of a map-style dataset, read without reading its inputs: ``targets`` (the
    folder datasets, torchvision's), a TensorDataset's second tensor, an ArrayDataset's ``y``, a
    Subset's from its parent; None when it exposes no 1-D integer labels of its length."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(data, Subset):
        inner = dataset_labels(data.dataset)
        return None if inner is None else inner[torch.as_tensor(list(data.indices), dtype=torch.long)]
    if isinstance(data, TensorDataset):
        y = data.tensors[1] if len(data.tensors) >= 2 else None
    elif isinstance(data, ArrayDataset):
        y = data.y
    else:
        y = getattr(data, "targets", None)
    try:
        y = torch.as_tensor(y) if y is not None else None
    except (TypeError, ValueError, RuntimeError):
        return None
    if y is None or y.dim() != 1 or y.numel() != len(data) or y.is_floating_point() or y.is_complex():
        return None
    return y.long()


def stratified_subset(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` of the indices of ``labels`` (sorted), spread as evenly across classes as the classes
    allow: every class gets ``min(its size, q)`` for the largest ``q`` that fits, what remains goes
    one each to classes drawn at random, and each class's members are drawn at random; every
    draw from a generator seeded with ``seed``. ``k >= len(labels)``: every index."""
    _checks.positive_int("k", k, owner="stratified_subset")
    labels = torch.as_tensor(labels).reshape(-1)
    if k >= labels.numel():
        return torch.arange(labels.numel())
    g = torch.Generator().manual_seed(seed)
    order = labels.argsort(stable=True)
    _, counts = labels[order].unique_consecutive(return_counts=True)
    quota, left = torch.zeros_like(counts), k
    while left > 0:  # water-filling: each pass fills every open class evenly or closes one
        open_ = quota < counts
        add = left // int(open_.sum())
        if add == 0:  # fewer left than open classes: one more each for classes drawn at random
            pick = open_.nonzero().flatten()
            quota[pick[torch.randperm(pick.numel(), generator=g)[:left]]] += 1
            break
        quota = torch.where(open_, torch.minimum(quota + add, counts), quota)
        left = k - int(quota.sum())
    out, start = [], 0
    for q, c in zip(quota.tolist(), counts.tolist()):
        members = order[start:start + c]
        out.append(members[torch.randperm(c, generator=g)[:q]])
        start += c
    return torch.cat(out).sort().values


# --- image and video folders -----------------------------------------------------------

#: File suffixes read as images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: File suffixes read as one decoded clip each: a (C, T, H, W) array, loaded without pickles.
CLIP_SUFFIXES = (".pt", ".npy", ".safetensors")

_FOLDER_HINT = ("one sub-folder per class holding images (an image folder), or clips: a folder of frame images "
                "or a .pt/.npy/.safetensors file per clip (a video folder)")


def _natural(name: str) -> list:
    """Sort key in which digits compare as numbers (``frame_9`` before ``frame_10``)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _class_dirs(root: Path, what: str, items: str) -> List[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root} is not {what}: expected one sub-folder of {items} per class")
    return classes


def _unreadable(kind: str, path: Path, e: BaseException) -> DataError:
    return DataError(f"cannot read the {kind} {path}: {str(e)[:200] or type(e).__name__}")


def _image_size(path: Path) -> Tuple[int, int]:
    """``(height, width)`` of an image from its header alone (no pixels decoded); PIL's
    decompression-bomb limit applies."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except MemoryError:
        raise
    except Exception as e:  # unidentified format, truncated header, decompression bomb, a folder
        raise _unreadable("image", path, e) from None
    return h, w


def read_image(path: Union[str, os.PathLike], size: Optional[int] = None, grey: bool = False) -> torch.Tensor:
    """One image file as a ``(C, H, W)`` float tensor in [0, 1] (C = 1 with ``grey``, else 3 RGB),
    resized to ``size`` x ``size`` when given. Files beyond PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) and unreadable files raise :class:`DataError` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = im.convert("L" if grey else "RGB")
        if size is not None:
            img = img.resize((size, size))
        arr = np.asarray(img, dtype=np.uint8)
    except MemoryError:
        raise
    except Exception as e:  # OSError (truncated, unidentified), ValueError, DecompressionBombError, ...
        raise _unreadable("image", Path(path), e) from None
    x = torch.from_numpy(arr.copy()).float().div_(255)
    return x.unsqueeze(0) if grey else x.permute(2, 0, 1).contiguous()


def _check_hw(hw: Tuple[int, int], want: Tuple[int, int], path: Path, root: Path, first: Path) -> None:
    if hw != want:
        raise DataError(f"images under {root} differ in size: pass a size to resize them ({path} is "
                        f"{hw[1]}x{hw[0]}, {first} {want[1]}x{want[0]})")


class _FolderDataset(Dataset):
    """What the image and video folder datasets share: classes, labels, the fingerprint."""

    root: Path
    classes: List[str]
    items: List[Path]
    targets: torch.Tensor
    size: Optional[int]
    grey: bool
    transform: Optional[Callable]

    def __len__(self) -> int:
        return len(self.items)

    def _setup(self, root, size, grey, transform, owner: str) -> None:
        if size is not None:
            _checks.positive_int("size", size, owner=owner, hi=1 << 16)
        if transform is not None and not callable(transform):
            raise TypeError(f"{owner}: transform must be callable, got {type(transform).__name__}")
        self.root, self.size, self.grey, self.transform = Path(root), size, bool(grey), transform

    def _item(self, x: torch.Tensor, i: int):
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        """The shape of every item's input before ``transform``: ``(C, H, W)`` or ``(C, T, H, W)``."""
        return self._shape

    def digest(self) -> str:
        """SHA-256 of what the dataset reads: the files' names (relative to ``root``), sizes and
        modification times, the labels, ``size`` and ``grey``. Pixels are not read: a cheap
        fingerprint that changes when a file is replaced, added or removed."""
        h = hashlib.sha256(f"{type(self).__name__};{self.size};{self.grey};{self.classes}".encode())
        for p, c in zip(self._files(), self.targets.tolist()):
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}\0{c}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def _files(self) -> List[Path]:
        return self.items


class ImageFolderDataset(_FolderDataset):
    """An image folder, ``root/<class>/<image>`` (classes in sorted name order, images in sorted
    file-name order, suffixes :data:`IMAGE_SUFFIXES`), read one image at a time: item ``i`` is
    ``(x, y)``, x a ``(C, H, W)`` float tensor in [0, 1] (:func:`read_image`: C = 1 with ``grey``,
    else 3; resized to ``size`` x ``size`` when given) passed through ``transform`` when given,
    y the class index. ``targets`` holds every label, ``classes`` the class names.

    Only file names are listed at creation, and (``check``, the default) every image's header
    read: format and size, no pixels decoded. So an unreadable file, a decompression bomb or
    images of different sizes without ``size`` raise :class:`DataError` then, before any
    purification; pixel data broken behind a valid header raises it when the image is read.
    Nothing is cached: memory stays that of the items in flight, whatever the folder's size.
    """

    def __init__(self, root: Union[str, os.PathLike], size: Optional[int] = None, grey: bool = False,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, check: bool = True) -> None:
        self._setup(root, size, grey, transform, "ImageFolderDataset")
        self.classes = _class_dirs(self.root, "an image folder", "images")
        self.items, labels = [], []
        for c, name in enumerate(self.classes):
            for f in sorted((self.root / name).iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    self.items.append(f)
                    labels.append(c)
        if not self.items:
            raise DataError(f"no images found under {self.root}")
        self.targets = torch.tensor(labels, dtype=torch.long)
        first = self.items[0]
        self._first = first
        self._hw = (size, size) if size is not None else _image_size(first)
        if check:
            for f in self.items:
                hw = _image_size(f)
                if size is None:
                    _check_hw(hw, self._hw, f, self.root, first)
        self._shape = (1 if self.grey else 3, *self._hw)

    def __getitem__(self, i: int):
        f = self.items[i]
        x = read_image(f, self.size, self.grey)
        _check_hw(tuple(x.shape[-2:]), self._hw, f, self.root, self._first)
        return self._item(x, i)


def _npy_header(path: Path) -> Tuple[np.dtype, tuple]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, _, dtype = read[version](f) if version in read else np.lib.format._read_array_header(f, version)
    return dtype, tuple(shape)


def _st_name(header: dict, path: Path) -> str:
    if len(header) == 1:
        return next(iter(header))
    if "x" in header:
        return "x"
    raise DataError(f"the clip file {path} holds {len(header)} tensors {sorted(header)[:5]}: expected one, or one named 'x'")


def _load_pt(path: Path, mmap: bool):
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if isinstance(obj, dict):
        if len(obj) == 1 or "x" in obj:
            obj = obj["x"] if "x" in obj else next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"the clip file {path} holds a {type(obj).__name__}: expected one tensor (C, T, H, W), "
                        "or a dict holding one, or one named 'x'")
    return obj


def _clip_declared(path: Path) -> Tuple[int, tuple]:
    """``(itemsize, shape)`` a clip file declares, read without loading its data; its memory checked."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        dtype, shape = _npy_header(path)
        if dtype.hasobject:
            raise DataError(f"the clip file {path} holds Python objects (pickles are not loaded)")
        size = dtype.itemsize
    elif suffix == ".safetensors":
        from .io import _ST_BYTES, safetensors_header

        header = safetensors_header(path)
        dt, shape = header[_st_name(header, path)]
        size = _ST_BYTES[dt]
    else:  # .pt: memory-mapped (zip format), only the shape is read
        t = _load_pt(path, mmap=True)
        size, shape = t.element_size(), tuple(t.shape)
    _checks.fits_memory((size + 4) * math.prod(shape), f"the clip file {path} ({shape})")
    return size, shape


def _load_clip(path: Path) -> torch.Tensor:
    """A clip file's tensor as float (uint8 scaled to [0, 1]), without executing code."""
    _clip_declared(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        t = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(_st_name({k: None for k in f.keys()}, path))
    else:
        t = _load_pt(path, mmap=True)
    if t.is_complex() or t.dtype == torch.bool or not (t.is_floating_point() or t.dtype == torch.uint8 or
                                                       t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise DataError(f"the clip file {path} holds {t.dtype} values: expected real numbers (uint8 or float)")
    return t.float() / 255 if t.dtype == torch.uint8 else t.float()


class VideoFolderDataset(_FolderDataset):
    """A video folder, ``root/<class>/<clip>`` (classes and clips in sorted name order), read one
    clip at a time: item ``i`` is ``(x, y)``, x a ``(C, T, H, W)`` float tensor (passed through
    ``transform`` when given), y the class index; a clip is a folder of frames or a clip file.

    A clip is either

    - a folder of frame images (:data:`IMAGE_SUFFIXES`), in natural name order (``frame_9``
      before ``frame_10``), each read as :func:`read_image` does (``size``, ``grey``) and stacked
      along T; or
    - one file holding the decoded clip as a ``(C, T, H, W)`` array (uint8 is scaled to [0, 1]),
      loaded without executing code: ``.safetensors`` (its one tensor, or the one named ``x``),
      ``.npy`` (``np.load(allow_pickle=False)``) or ``.pt`` (``torch.load(weights_only=True)``,
      memory-mapped: torch's zip format, the default since torch 1.6; a tensor, or a dict
      holding it). ``size`` and ``grey`` do not change clip files.

    Every clip must have the same shape (frames, channels, and height and width unless
    ``size`` resizes frame images). With ``check`` (the default) that is verified at creation
    from the frames' and files' headers, without decoding pixels, so a bad folder raises one
    :class:`DataError` naming the file before any purification; otherwise when the clip is read.
    """

    def __init__(self, root: Union[str, os.PathLike], size: Optional[int] = None, grey: bool = False,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, check: bool = True) -> None:
        self._setup(root, size, grey, transform, "VideoFolderDataset")
        self.classes = _class_dirs(self.root, "a video folder", "clips (a folder of frames or a clip file each)")
        self.items, self.frames, labels = [], [], []
        for c, name in enumerate(self.classes):
            for p in sorted((self.root / name).iterdir()):
                if p.name.startswith("."):
                    continue
                if p.is_dir():
                    frames = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES),
                                    key=lambda f: _natural(f.name))
                    if not frames:
                        raise DataError(f"the clip folder {p} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
                elif p.suffix.lower() in CLIP_SUFFIXES:
                    frames = None
                else:
                    continue
                self.items.append(p)
                self.frames.append(frames)
                labels.append(c)
        if not self.items:
            raise DataError(f"no clips found under {self.root}: expected a folder of frame images or a "
                            f"{'/'.join(CLIP_SUFFIXES)} file per clip in each class folder")
        self.targets = torch.tensor(labels, dtype=torch.long)
        self._shape = self._declared(0)
        if check:
            for i in range(1, len(self.items)):
                self._check_shape(self._declared(i, full=True), i)
        self._check_shape(self._declared(0, full=True), 0)

    def _declared(self, i: int, full: bool = False) -> Tuple[int, ...]:
        """Clip ``i``'s (C, T, H, W) from headers (frame folders: the first frame, or all with ``full``)."""
        p, frames = self.items[i], self.frames[i]
        if frames is None:
            try:
                _, shape = _clip_declared(p)
            except DataError:
                raise
            except Exception as e:
                raise _unreadable("clip file", p, e) from None
            if len(shape) != 4:
                raise DataError(f"the clip file {p} holds an array of shape {shape}: expected (C, T, H, W)")
            return shape
        hw = (self.size, self.size) if self.size is not None else _image_size(frames[0])
        for f in frames[1:] if full else ():
            fhw = _image_size(f)
            if self.size is None and fhw != hw:
                raise DataError(f"the frames of the clip {p} differ in size: pass a size to resize them ({f} is "
                                f"{fhw[1]}x{fhw[0]}, {frames[0]} {hw[1]}x{hw[0]})")
        return (1 if self.grey else 3, len(frames), *hw)

    def _check_shape(self, shape: Tuple[int, ...], i: int) -> None:
        if tuple(shape) != tuple(self._shape):
            first = self.items[0]
            hint = " (pass a size to resize frame images)" if shape[:2] == self._shape[:2] and self.size is None else ""
            raise DataError(f"clips under {self.root} differ in shape (C, T, H, W): {self.items[i]} is {tuple(shape)}, "
                            f"{first} {tuple(self._shape)}{hint}")

    def _files(self) -> List[Path]:
        return [f for p, frames in zip(self.items, self.frames) for f in (frames or [p])]

    def __getitem__(self, i: int):
        p, frames = self.items[i], self.frames[i]
        if frames is None:
            try:
                x = _load_clip(p)
            except DataError:
                raise
            except MemoryError:
                raise
            except Exception as e:
                raise _unreadable("clip file", p, e) from None
        else:
            x = torch.stack([read_image(f, self.size, self.grey) for f in frames], dim=1)
        self._check_shape(tuple(x.shape), i if i >= 0 else len(self) + i)
        return self._item(x, i)


def folder_kind(root: Union[str, os.PathLike]) -> str:
    """``"image"`` for an image folder (``root/<class>/<image>``), ``"video"`` for a video folder
    (``root/<class>/<clip>``, a clip being a folder of frames or a clip file), told apart by what
    the class folders hold; :class:`DataError` saying what was found when neither or both."""
    root = Path(root)
    classes = [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
    if not classes:
        raise DataError(f"{root} is not a data folder: expected {_FOLDER_HINT}")
    images = clips = None
    for c in classes:
        for p in c.iterdir():
            if p.name.startswith("."):
                continue
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir():
                images = images or p
            elif p.is_dir() or p.suffix.lower() in CLIP_SUFFIXES:
                clips = clips or p
        if images and clips:
            raise DataError(f"{root} mixes images ({images}) and clips ({clips}) in its class folders: expected "
                            f"{_FOLDER_HINT}")
    if not images and not clips:
        raise DataError(f"no images or clips found under {root}: expected {_FOLDER_HINT}")
    return "image" if images else "video"


def open_folder(root: Union[str, os.PathLike], size: Optional[int] = None, grey: bool = False,
                transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                check: bool = True) -> Union[ImageFolderDataset, VideoFolderDataset]:
    """The streaming dataset of an image or video folder (:func:`folder_kind`):
    :class:`ImageFolderDataset` or :class:`VideoFolderDataset`."""
    cls = ImageFolderDataset if folder_kind(root) == "image" else VideoFolderDataset
    return cls(root, size=size, grey=grey, transform=transform, check=check)


def stack_folder(ds: Union[ImageFolderDataset, VideoFolderDataset]) -> torch.Tensor:
    """Every input of a folder dataset as one float tensor (``transform`` applied), its memory
    checked first (:class:`DataError` when it would not fit)."""
    shape = (len(ds), *ds.sample_shape)
    try:
        _checks.fits_memory(4 * math.prod(shape), f"the folder {ds.root} read whole ({len(ds)} samples of "
                                                  f"{tuple(ds.sample_shape)})")
    except ValueError as e:
        raise DataError(f"{e}: stream it instead (a Dataset, e.g. nft_fast.data.open_folder)") from None
    x = None
    for i in range(len(ds)):
        xi = ds[i][0]
        if x is None:
            x = torch.empty((len(ds), *xi.shape), dtype=xi.dtype)
        x[i] = xi
    return x


def image_folder(root: Union[str, os.PathLike], size: Optional[int] = None,
                 grey: bool = False) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """An ImageFolder-style tree (``root/<class>/<image>``) read whole: inputs in [0, 1]
    ``(N, C, H, W)``, labels and class names (:class:`ImageFolderDataset` stacked; the memory
    it needs is checked first). To read one image at a time, use the dataset."""
    ds = ImageFolderDataset(root, size=size, grey=grey)
    return stack_folder(ds), ds.targets.clone(), list(ds.classes)


def load_folder(root: Union[str, os.PathLike], size: Optional[int] = None,
                grey: bool = False) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """An image or video folder (:func:`open_folder`) read whole: inputs, labels, class names."""
    ds = open_folder(root, size=size, grey=grey)
    return stack_folder(ds), ds.targets.clone(), list(ds.classes)
