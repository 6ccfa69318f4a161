"""BackdoorBench attack folders as inputs: the backdoored model, the defender's clean data and
the clean and poisoned test sets of one attack.

BackdoorBench (github.com/SCLBD/BackdoorBench) saves an attack as a folder
``record/<name>/`` holding ``attack_result.pt``, a ``torch.save`` pickle of a dict:

- ``model_name`` (``"preactresnet18"``, ``"resnet18"``, ...), ``num_classes``, ``model`` (the
  state dict), ``img_size`` ``(H, W, C)``, ``clean_data`` (the dataset's *name*: ``"cifar10"``,
  ...), ``data_path`` (where the original dataset lies, relative to the BackdoorBench checkout,
  e.g. ``./data/cifar10``);
- ``bd_test`` (and ``bd_train``): the state of their poisoned dataset, indices into the original
  dataset (``original_index_array``, ``poison_indicator``: numpy arrays) and a container
  ``bd_data_container`` of the poisoned samples. The attacks write each poisoned image as a PNG
  into the folder (``bd_test_dataset/<label>/<index>.png``) and keep ``{"path", "other_info":
  [poisoned label, true label]}`` per index; without a save folder the container holds
  ``(PIL image, poisoned label, true label)`` in the pickle itself. Their first release stored
  ``bd_test`` as ``{"x": [PIL images], "y", "original_index", "original_targets"}``.

The clean training and test sets are not in the folder: they are read from the original
dataset (CIFAR-10/100 as torchvision stores them, MNIST's IDX files). The defender's clean data
is, as in BackdoorBench's defenses, a random ``clean_ratio`` (5%) of the clean training set, or
the indices of their ``--index`` file.

``attack_result.pt`` is loaded with ``torch.load(weights_only=True)`` and, while loading, an
allowlist of numpy's array, scalar and numeric dtype reconstructors (no object arrays). A file
holding anything else (PIL images, arbitrary objects) is refused unless ``trust_pickle=True``,
which unpickles it in full and so runs whatever code the file holds.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .. import _checks, models
from ..data import DataError, check_clean_set, check_inputs, check_labels
from ..io import CheckpointError, check_finite, load_into
from .datasets import read_idx

PathLike = Union[str, os.PathLike]

RESULT_FILE = "attack_result.pt"
#: The keys every ``attack_result.pt`` holds (``bd_train`` may be None; it is not read).
REQUIRED_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_test")
#: BackdoorBench's defenses take this fraction of the clean training set (their ``ratio``).
CLEAN_RATIO = 0.05


class BackdoorBenchError(ValueError):
    """A BackdoorBench folder that cannot be (safely) read or is not supported."""


class TrustPickleWarning(UserWarning):
    """``trust_pickle=True``: the attack file is unpickled in full, running any code it holds."""


# --------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelMap:
    """How one BackdoorBench model name maps onto the zoo: the architecture, and the renames
    of their state-dict keys to ours (regex, replacement; applied in order, after a
    ``module.`` prefix of ``DataParallel`` is stripped)."""

    arch: str
    renames: Tuple[Tuple[str, str], ...] = ()
    source: str = ""


#: BackdoorBench ``model_name`` -> zoo architecture. Their PreActResNet-18
#: (models/preact_resnet.py) and torchvision's ResNet-18/50 use the zoo's key names as they are;
#: every key is checked (no key missing, none left over) when the state is loaded.
MODELS: Dict[str, ModelMap] = {
    "preactresnet18": ModelMap("preactresnet18_backdoorbench", source="models/preact_resnet.py PreActResNet18"),
    "resnet18": ModelMap("resnet18_imagenet", source="torchvision.models.resnet18"),
    "resnet50": ModelMap("resnet50_imagenet", source="torchvision.models.resnet50"),
}


def map_state_dict(model_name: str, state: Dict[str, Any]) -> Tuple[str, Dict[str, torch.Tensor]]:
    """``(arch, state)``: their model name's zoo architecture and their state dict under the
    zoo's key names. Refuses an unsupported model name, or values that are not tensors."""
    if model_name not in MODELS:
        raise BackdoorBenchError(f"model {model_name!r} is not supported; supported BackdoorBench models: "
                                 f"{', '.join(sorted(MODELS))}")
    spec = MODELS[model_name]
    if not isinstance(state, dict) or not state:
        raise BackdoorBenchError(f"'model' is not a state dict (got {type(state).__name__})")
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise BackdoorBenchError(f"'model' is not a state dict of tensors (key {key!r}: {type(value).__name__})")
        new = key[len("module."):] if key.startswith("module.") else key
        for pattern, repl in spec.renames:
            new = re.sub(pattern, repl, new)
        if new in out:
            raise BackdoorBenchError(f"'model' holds the key {new!r} twice (with and without 'module.')")
        out[new] = value
    return spec.arch, out


# --------------------------------------------------------------------------- datasets

#: Their input normalisation per dataset (utils/aggregate_block/dataset_and_transform_generate.py).
NORMALIZATION: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
#: Datasets whose original files this module reads (torchvision's layout under ``data_path``).
DATASETS = ("cifar10", "cifar100", "mnist")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python batches: plain containers and numpy arrays, no other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return _np_multiarray()._reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # bytes, as protocol 2 writes them from Python 3
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _np_multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _read_cifar_batch(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"cannot read {path}: not a CIFAR python batch ({str(e)[:200] or type(e).__name__})") from None
    data = d.get("data") if isinstance(d, dict) else None
    labels = d.get(label_key) if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or labels is None or len(labels) != data.shape[0]:
        raise DataError(f"{path} is not a CIFAR python batch: expected 'data' (N, 3072) uint8 and '{label_key}'")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _cifar(root: Path, name: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    if name == "cifar10":
        sub, files, key = "cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)] if split == "train"
                                                  else ["test_batch"]), "labels"
    else:
        sub, files, key = "cifar-100-python", [split], "fine_labels"
    parts = [_read_cifar_batch(root / sub / f, key) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _mnist(root: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    out = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        base = root / "MNIST" / "raw" / f"{prefix}-{kind}"
        path = base if base.exists() else base.with_name(base.name + ".gz")
        if not path.exists():
            raise FileNotFoundError(str(base))
        out.append(read_idx(path))
    x, y = out
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"the MNIST files under {root / 'MNIST' / 'raw'} do not fit together: images {x.shape}, "
                        f"labels {y.shape}")
    return x[:, None], y.astype(np.int64)


def _dataset_marker(name: str) -> str:
    return {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "mnist": "MNIST/raw"}[name]


def read_dataset(name: str, root: PathLike, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(x uint8 (N, C, H, W), y int64)`` of split ``"train"``/``"test"`` of the original
    dataset ``name`` in torchvision's layout under ``root`` (BackdoorBench's ``data_path``)."""
    root = Path(root)
    try:
        return _mnist(root, split) if name == "mnist" else _cifar(root, name, split)
    except FileNotFoundError as e:
        raise DataError(f"the original {name} dataset is incomplete under {root}: {e.filename or e} is missing "
                        f"(expected torchvision's layout, {root / _dataset_marker(name)})") from None


def resolve_data_dir(folder: Path, data_path: str, name: str, data_dir: Optional[PathLike]) -> Path:
    """Where the original dataset lies: ``data_dir`` when given, else their ``data_path``
    resolved as BackdoorBench does (the checkout holding ``record/``, then the path from its
    ``data`` component), else ``data_path`` relative to the folder and its parents."""
    if data_dir is not None:
        d = Path(data_dir)
        if not d.is_dir():
            raise DataError(f"--data-dir {d} is not a directory (the original {name} dataset, torchvision's layout)")
        return d
    cands: List[Path] = []
    real = folder.resolve()
    parts = real.parts
    dparts = Path(str(data_path)).parts
    if "record" in parts and "data" in dparts:
        base = Path(*parts[:parts.index("record")])
        cands.append(base.joinpath(*dparts[dparts.index("data"):]))
    if not Path(str(data_path)).is_absolute():
        cands += [p / data_path for p in (real, *real.parents)]
    else:
        cands.append(Path(data_path))
    for c in cands:
        if (c / _dataset_marker(name)).is_dir():
            return c
    tried = ", ".join(str(c) for c in cands[:3])
    raise DataError(f"the original {name} dataset is needed: BackdoorBench keeps the clean training and test sets "
                    f"as indices into it, and its data_path {data_path!r} was not found (tried {tried}); give its "
                    f"folder (the one holding {_dataset_marker(name)}) with --data-dir")


# --------------------------------------------------------------------------- the pickle

def _safe_numpy_globals() -> list:
    """The numpy globals a weights-only load may use: array and scalar reconstruction, and the
    dtypes of plain numbers (no object arrays), under both numpy 1.x and 2.x module names."""
    ma = _np_multiarray()
    allowed: list = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(ma._reconstruct, f"{mod}._reconstruct"), (ma.scalar, f"{mod}.scalar")]
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
              np.float16, np.float32, np.float64):
        allowed.append(type(np.dtype(t)))
    return allowed


def read_attack_result(path: PathLike, trust_pickle: bool = False) -> Dict[str, Any]:
    """The dict saved in ``attack_result.pt``: loaded with ``torch.load(weights_only=True)``
    plus numpy arrays (refused, naming ``--trust-pickle``, when it holds other objects); with
    ``trust_pickle`` unpickled in full after a :class:`TrustPickleWarning`."""
    path = Path(path)
    try:
        _checks.fits_memory(path.stat().st_size, f"{path}")
    except ValueError as e:
        raise BackdoorBenchError(f"refusing to load {path}: {e}") from None
    if trust_pickle:
        warnings.warn(f"--trust-pickle: unpickling {path} in full; this runs any code the file holds. Use it only "
                      "for attack folders you made or trust.", TrustPickleWarning, stacklevel=2)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise BackdoorBenchError(f"cannot read {path}: {type(e).__name__}: {str(e)[:200]}") from None
    else:
        try:
            with torch.serialization.safe_globals(_safe_numpy_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            msg = str(e)
            m = re.search(r"GLOBAL ([\w.]+)|unrecognized function ([^\s]+)|types allowlisted via `add_safe_globals`, "
                          r"but got (<[^>]+>)|allowlisted via `add_safe_globals` but got (<[^>]+>)", msg)
            if m or re.search(r"global|allowlist", msg, re.I):
                what = next((g for g in (m.groups() if m else ()) if g), "objects")
                raise BackdoorBenchError(
                    f"{path} holds pickled objects beyond tensors and numpy arrays ({what}); loading them would run "
                    "code from the file. Give --trust-pickle (trust_pickle=True) only if you trust the file, or "
                    "re-save it with the poisoned images as files (BackdoorBench's bd_test_dataset folder)") from None
            raise BackdoorBenchError(f"cannot read {path}: corrupt or not a torch file ({msg.strip()[-160:]})") from None
        except Exception as e:
            raise BackdoorBenchError(f"cannot read {path}: corrupt or not a torch file "
                                     f"({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(obj, dict):
        raise BackdoorBenchError(f"{path} is not a BackdoorBench attack result: a {type(obj).__name__}, not a dict")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise BackdoorBenchError(f"{path} is not a BackdoorBench attack result: missing the keys {', '.join(missing)} "
                                 f"(it has {', '.join(map(str, list(obj)[:12]))})")
    return obj


# --------------------------------------------------------------------------- the poisoned test set

def _to_uint8_image(img: Any, channels: int, size: Tuple[int, int], where: str) -> np.ndarray:
    """(C, H, W) uint8 of a PIL image, an array (H, W[, C]) or a path, resized as their Resize."""
    from PIL import Image

    try:
        if isinstance(img, (str, Path)):
            with Image.open(img) as f:
                img = f.convert("L" if channels == 1 else "RGB")
        elif isinstance(img, np.ndarray):
            img = Image.fromarray(img.astype(np.uint8))
        elif isinstance(img, torch.Tensor):  # (C, H, W) in [0, 1], as their ToTensor gives
            img = Image.fromarray((img.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).squeeze(-1).numpy())
        if not isinstance(img, Image.Image):
            raise BackdoorBenchError(f"{where}: not an image ({type(img).__name__})")
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
    except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read the poisoned image {where}: {str(e)[:200] or type(e).__name__}") from None
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _local_path(folder: Path, container_dir: Optional[str], path: str) -> Path:
    """Their absolute or checkout-relative PNG path, found inside the attack folder."""
    p = str(path).replace("\\", "/")
    base = str(container_dir).replace("\\", "/").rstrip("/") if container_dir else ""
    if base and p.startswith(base + "/"):
        rel = Path(p[len(base) + 1:])
        local = folder / Path(base).name / rel
    else:  # <save folder>/<label>/<index>.png
        parts = Path(p).parts
        local = folder.joinpath(*parts[-3:]) if len(parts) >= 3 else folder / p
    if ".." in Path(os.path.relpath(local, folder)).parts:
        raise BackdoorBenchError(f"the poisoned image path {path!r} points outside the folder {folder}")
    return local


def _int(v: Any, what: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
            return int(v)
        raise BackdoorBenchError(f"bd_test: {what} is {v!r} ({type(v).__name__}), not an integer")
    return int(v)


def _poisoned_v2(folder: Path, state: Dict[str, Any]) -> List[Tuple[Any, int, int, str]]:
    """``[(image or path, poisoned label, true label, where)]`` of a prepro_cls_DatasetBD_v2 state."""
    cont = state.get("bd_data_container")
    if not isinstance(cont, dict) or not isinstance(cont.get("data_dict"), dict):
        raise BackdoorBenchError("bd_test: 'bd_data_container' with a 'data_dict' is missing")
    index = np.asarray(state.get("original_index_array"))
    indicator = np.asarray(state.get("poison_indicator"))
    if index.ndim != 1 or indicator.ndim != 1 or index.dtype.kind not in "iu" or indicator.dtype.kind not in "biuf":
        raise BackdoorBenchError("bd_test: 'original_index_array' / 'poison_indicator' are not 1-D numeric arrays")
    if index.size and (index.min() < 0 or index.max() >= indicator.size):
        raise BackdoorBenchError("bd_test: 'original_index_array' points outside 'poison_indicator'")
    data = {_int(k, "an index of data_dict"): v for k, v in cont["data_dict"].items()}
    save_dir = cont.get("save_folder_path")
    out = []
    for i in index.tolist():
        if indicator[i] != 1:
            continue  # a clean sample: not part of the poisoned test set's ASR/RA
        if i not in data:
            raise BackdoorBenchError(f"bd_test: sample {i} is marked poisoned but has no entry in data_dict")
        v = data[i]
        if save_dir is None:  # (image, poisoned label, true label) in the pickle
            if not isinstance(v, (tuple, list)) or len(v) < 3:
                raise BackdoorBenchError(f"bd_test: data_dict[{i}] is not (image, poisoned label, true label)")
            out.append((v[0], _int(v[1], f"the poisoned label of {i}"), _int(v[2], f"the label of {i}"),
                        f"bd_test[{i}]"))
        else:
            if not isinstance(v, dict) or not isinstance(v.get("path"), str) or len(v.get("other_info") or ()) < 2:
                raise BackdoorBenchError(f"bd_test: data_dict[{i}] is not {{'path', 'other_info': [poisoned label, "
                                         "true label]}")
            local = _local_path(folder, save_dir, v["path"])
            if not local.is_file():
                raise DataError(f"the poisoned test image {local} is missing (data_dict[{i}] names {v['path']!r}); "
                                f"copy the folder with its {Path(str(save_dir)).name} sub-folder")
            out.append((local, _int(v["other_info"][0], f"the poisoned label of {i}"),
                        _int(v["other_info"][1], f"the label of {i}"), str(local)))
    return out


def _poisoned_v1(state: Dict[str, Any]) -> List[Tuple[Any, int, int, str]]:
    """The first release's ``{"x", "y", "original_index", "original_targets"}``."""
    xs, ys, ts = state.get("x"), state.get("y"), state.get("original_targets")
    if xs is None or ys is None or ts is None or not (len(xs) == len(ys) == len(ts)):
        raise BackdoorBenchError("bd_test: 'x', 'y' and 'original_targets' are missing or differ in length")
    return [(x, _int(y, f"y[{i}]"), _int(t, f"original_targets[{i}]"), f"bd_test x[{i}]")
            for i, (x, y, t) in enumerate(zip(xs, ys, ts))]


# --------------------------------------------------------------------------- the whole folder

@dataclass
class BackdoorBenchAttack:
    """One BackdoorBench attack, ready to purify and evaluate. Every ``x`` is float32
    ``(N, C, H, W)`` normalised as BackdoorBench feeds the model (``(x / 255 - mean) / std``)."""

    model: nn.Module
    arch: str
    arch_kwargs: Dict[str, int]
    num_classes: int
    model_name: str
    dataset: str
    clean: Tuple[torch.Tensor, torch.Tensor]
    test: Tuple[torch.Tensor, torch.Tensor]
    poison: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x, true labels, target labels
    normalization: Tuple[Tuple[float, ...], Tuple[float, ...]]  # mean, std per channel
    data_dir: Path
    info: Dict[str, Any] = field(default_factory=dict)


def _normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    c = x.shape[1]
    m = torch.tensor(mean if len(mean) == c else mean[:1] * c, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std if len(std) == c else std[:1] * c, dtype=torch.float32).view(1, c, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(x)).float().div_(255) - m) / s


def _fit_channels(x: np.ndarray, channels: int) -> np.ndarray:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return np.repeat(x, channels, axis=1)
    raise DataError(f"the dataset has {x.shape[1]} channels, the model {channels}")


def _clean_index(n: int, ratio: float, index: Optional[Union[PathLike, Sequence[int]]], seed: int) -> np.ndarray:
    if index is not None:
        idx = np.loadtxt(index, dtype=np.int64, ndmin=1) if isinstance(index, (str, os.PathLike)) \
            else np.asarray(index, dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
            raise DataError(f"the clean index {index if isinstance(index, (str, os.PathLike)) else 'list'} is empty or "
                            f"points outside the {n} training samples")
        return idx
    _checks.number("clean_ratio", ratio, 0.0, 1.0, lo_open=True)
    k = int(n * ratio)
    if k < 1:
        raise DataError(f"clean_ratio {ratio} of {n} training samples is no sample")
    return np.sort(np.asarray(random.Random(seed).sample(range(n), k), dtype=np.int64))


def load_backdoorbench(folder: PathLike, trust_pickle: bool = False, data_dir: Optional[PathLike] = None,
                       clean_ratio: float = CLEAN_RATIO, clean_index: Optional[Union[PathLike, Sequence[int]]] = None,
                       seed: int = 0) -> BackdoorBenchAttack:
    """Read a BackdoorBench attack folder (``record/<name>/``): the backdoored model as a zoo
    architecture (:data:`MODELS`), the defender's clean data (``clean_ratio`` of the clean
    training set drawn with ``seed``, or the indices ``clean_index``: a list or their index
    file), the clean test set and the poisoned test set with true and target labels.

    ``data_dir``: the original dataset's folder (default: their ``data_path``, resolved as
    BackdoorBench does). ``trust_pickle``: unpickle ``attack_result.pt`` in full (runs code
    from the file; needed for results holding PIL images). Raises :class:`BackdoorBenchError`
    or :class:`~nft_fast.data.DataError` / :class:`~nft_fast.io.CheckpointError` naming the
    problem (all ``ValueError``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BackdoorBenchError(f"{folder} is not a directory (a BackdoorBench attack folder, record/<name>/)")
    path = folder / RESULT_FILE
    if not path.is_file():
        raise BackdoorBenchError(f"{folder} is not a BackdoorBench attack folder: {RESULT_FILE} is missing")
    res = read_attack_result(path, trust_pickle)
    where = f"BackdoorBench folder {folder}"

    # the model
    name = res["model_name"]
    if not isinstance(name, str):
        raise BackdoorBenchError(f"{where}: model_name is {name!r}, not a name")
    arch, state = map_state_dict(name, res["model"])
    try:
        num_classes = _int(res["num_classes"], "num_classes")
    except BackdoorBenchError:
        raise BackdoorBenchError(f"{where}: num_classes is {res['num_classes']!r}, not an integer") from None
    img = res["img_size"]
    if not isinstance(img, (list, tuple)) or len(img) not in (2, 3) or not all(
            isinstance(v, (int, np.integer)) and 0 < v <= 4096 for v in img):
        raise BackdoorBenchError(f"{where}: img_size is {img!r}, not (height, width, channels)")
    h, w = int(img[0]), int(img[1])
    kw = dict(num_classes=num_classes, in_channels=3, width=64, image_size=h)
    inferred = models.infer_kwargs(arch, state)
    if inferred.get("num_classes", num_classes) != num_classes:
        raise BackdoorBenchError(f"{where}: num_classes is {num_classes} but the model's head has "
                                 f"{inferred['num_classes']} outputs")
    kw.update(inferred)
    try:
        model = models.build(arch, **kw)
    except ValueError as e:
        raise CheckpointError(f"{where}: model {name!r} ({arch}): {e}") from None
    check_finite(state, f"{where}: the model")
    load_into(model, state, f"{where}: model {name!r} (as {arch}; their {MODELS[name].source})")
    channels = kw["in_channels"]

    # the poisoned test set (in the folder, or in the pickle)
    dataset = res["clean_data"]
    if not isinstance(dataset, str) or dataset not in NORMALIZATION:
        raise BackdoorBenchError(f"{where}: clean_data {dataset!r} is not a BackdoorBench dataset "
                                 f"({', '.join(NORMALIZATION)})")
    mean, std = NORMALIZATION[dataset]
    bd = res["bd_test"]
    if not isinstance(bd, dict):
        raise BackdoorBenchError(f"{where}: bd_test is {type(bd).__name__}, not a saved dataset state")
    samples = _poisoned_v2(folder, bd) if "bd_data_container" in bd else _poisoned_v1(bd) if "x" in bd else None
    if samples is None:
        raise BackdoorBenchError(f"{where}: bd_test has neither 'bd_data_container' (their v2 format) nor 'x' "
                                 f"(v1); keys: {', '.join(map(str, list(bd)[:8]))}")
    if not samples:
        raise BackdoorBenchError(f"{where}: bd_test holds no poisoned sample")
    _checks.fits_memory(len(samples) * channels * h * w * 5, f"the {len(samples)} poisoned test images")
    xp = np.stack([_to_uint8_image(s[0], channels, (h, w), s[3]) for s in samples])
    ytp = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    yp = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    check_labels(yp, num_classes, f"{where}: poisoned test set (true labels)")
    check_labels(ytp, num_classes, f"{where}: poisoned test set (target labels)")
    if not bool((yp != ytp).any()):
        raise DataError(f"{where}: no poisoned test sample has a target label other than its true label: ASR and RA "
                        "would be undefined")

    # the clean sets, from the original dataset
    if dataset not in DATASETS:
        raise BackdoorBenchError(f"{where}: reading the original {dataset} dataset is not supported (supported: "
                                 f"{', '.join(DATASETS)}); BackdoorBench keeps the clean sets as indices into it")
    root = resolve_data_dir(folder, str(res["data_path"]), dataset, data_dir)
    xtr, ytr = read_dataset(dataset, root, "train")
    xte, yte = read_dataset(dataset, root, "test")
    xtr, xte = _fit_channels(xtr, channels), _fit_channels(xte, channels)
    if xte.shape[2:] != (h, w):
        raise DataError(f"the original {dataset} images under {root} are {xte.shape[2]}x{xte.shape[3]}, img_size "
                        f"{h}x{w}")
    idx = _clean_index(len(ytr), clean_ratio, clean_index, seed)
    clean = (_normalize(xtr[idx], mean, std), torch.from_numpy(ytr[idx]))
    test = (_normalize(xte, mean, std), torch.from_numpy(yte))
    poison = (_normalize(xp, mean, std), yp, ytp)
    for what, (x, y) in (("clean training subset", clean), ("clean test set", test)):
        check_inputs(x, f"{where}: {what}")
        check_labels(y, num_classes, f"{where}: {what}")
    check_clean_set(*clean, num_classes, what=f"clean training subset of {dataset} ({len(idx)} samples)")
    info = {"folder": str(folder), "model_name": name, "dataset": dataset, "data_dir": str(root),
            "clean_samples": int(len(idx)), "clean_ratio": None if clean_index is not None else clean_ratio,
            "poisoned_test_samples": len(samples), "normalization": {"mean": list(mean), "std": list(std)},
            "format": "v2" if "bd_data_container" in bd else "v1", "trust_pickle": bool(trust_pickle)}
    return BackdoorBenchAttack(model, arch, {k: int(v) for k, v in kw.items()}, num_classes, name, dataset, clean,
                               test, poison, (tuple(mean), tuple(std)), root, info)
