"""Safe checkpoint loading and atomic output.

Backdoored models are exactly the files an attacker hands you: checkpoints are read
with ``torch.load(weights_only=True)`` or safetensors, never by unpickling code.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch
import torch.nn as nn

from . import _checks
from .errors import CheckpointError
from .outdir import file_mode

__all__ = [
    "CheckpointError", "load_state_dict", "save_state_dict", "load_into", "check_finite",
    "safetensors_header", "declared_bytes", "write_text", "write_json", "PathLike",
]

PathLike = Union[str, os.PathLike]


# bytes per element of every safetensors dtype
_ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8}
_ST_MAX_HEADER = 100_000_000  # the safetensors format's own limit


def safetensors_header(path: PathLike) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of the tensors a ``.safetensors`` file declares, read from its
    header alone (nothing else is read or allocated) and checked against the file: every shape
    and byte range consistent, the data inside the file. Raises ``ValueError`` saying what is
    wrong."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _ST_MAX_HEADER):
            raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    data_size, out = size - 8 - n, {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(e, dict) and e.get("dtype") in _ST_BYTES and isinstance(e.get("shape"), list) \
            and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
        ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"] + e["data_offsets"])
        if not ok:
            raise ValueError(f"tensor {name!r}: malformed entry (dtype, shape, data_offsets)")
        begin, end = e["data_offsets"]
        nbytes = math.prod(e["shape"]) * _ST_BYTES[e["dtype"]]
        if end < begin or end > data_size or end - begin != nbytes:
            raise ValueError(f"tensor {name!r} declares shape {tuple(e['shape'])} ({e['dtype']}, {nbytes} bytes) but "
                             f"bytes {begin}..{end} of a {data_size}-byte data section")
        out[name] = (e["dtype"], tuple(e["shape"]))
    return out


def declared_bytes(header: Dict[str, Tuple[str, Tuple[int, ...]]]) -> int:
    """Bytes the tensors of a :func:`safetensors_header` need once loaded."""
    return sum(math.prod(shape) * _ST_BYTES[dtype] for dtype, shape in header.values())


def load_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, without executing code.

    Accepts a bare state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            header = safetensors_header(path)
        except ValueError as e:
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a safetensors file ({e})") from None
        try:
            _checks.fits_memory(declared_bytes(header), f"its {len(header)} tensors")
        except ValueError as e:
            raise CheckpointError(f"refusing to load checkpoint {path}: {e}") from None
        try:
            obj = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a safetensors file "
                                  f"({e.__class__.__name__})") from None
    else:
        try:  # torch files store tensors uncompressed: the file's size bounds what loading needs
            _checks.fits_memory(path.stat().st_size, "its tensors")
        except ValueError as e:
            raise CheckpointError(f"refusing to load checkpoint {path}: {e}") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch reports every weights-only failure this way; only a blocked GLOBAL (a class
            # or function the pickle wants to import and call) means code execution.
            if re.search(r"unsupported global|not an allowed global|GLOBAL\b", str(e), re.I):
                raise CheckpointError(
                    f"refusing to load {path}: it holds pickled objects that would execute code when loaded "
                    "(only tensors and plain containers are accepted); re-save its state_dict, or convert it to .safetensors"
                ) from None
            detail = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a torch checkpoint ({detail[:120]})") from None
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a torch checkpoint "
                                  f"({e.__class__.__name__}: {str(e)[:120]})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors")
    check_finite(obj, f"checkpoint {path}")
    return dict(obj)


def check_finite(state: Dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` when a floating-point or complex tensor of ``state`` holds
    NaN/inf: such a state is neither loaded nor written."""
    # float8 has no isfinite kernel: checked as float32 (exact)
    bad = [k for k, v in state.items() if (v.is_floating_point() or v.is_complex())
           and not torch.isfinite(v.float() if v.dtype.itemsize == 1 else v).all()]
    if bad:
        raise CheckpointError(f"{what} has NaN/inf values in {len(bad)} tensors, e.g. {bad[:3]}")


def _kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "floating-point"
    return "bool" if t.dtype == torch.bool else "integer"


def load_into(model: nn.Module, state: Dict[str, torch.Tensor], what: str = "checkpoint") -> nn.Module:
    """``load_state_dict(strict)`` with an error naming the keys that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    # load_state_dict would silently cast e.g. integer weights into the float parameters
    kinds = [f"{k} is {_kind(state[k])} ({state[k].dtype}), the model's {_kind(own[k])}" for k in own
             if k in state and _kind(state[k]) != _kind(own[k])]
    if missing or unexpected or shapes or kinds:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        if kinds:
            parts.append(f"{len(kinds)} tensors of the wrong type (e.g. {'; '.join(kinds[:3])})")
        raise CheckpointError(f"{what} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state)
    return model


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), file_mode())  # mkstemp's 0600 -> what open() gives (umask respected)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(state: Dict[str, torch.Tensor], path: PathLike) -> None:
    """Write a state dict atomically: ``.safetensors`` by suffix, else a weights-only torch file.
    A state with NaN/inf values is refused (:class:`CheckpointError`), as :func:`load_state_dict`
    would refuse to read it back."""
    path = Path(path)
    check_finite(state, f"the state dict for {path}")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state)
        _atomic_write(path, lambda f: f.write(data))
    else:
        _atomic_write(path, lambda f: torch.save(state, f))


def write_text(path: PathLike, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_json(path: PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")
