"""Safe checkpoint loading and atomic output.

Backdoored models are exactly the files an attacker hands you: checkpoints are read
with ``torch.load(weights_only=True)`` or safetensors, never by unpickling code.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Dict, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) loaded, or does not fit the architecture."""


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
            obj = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a safetensors file "
                                  f"({e.__class__.__name__})") from None
    else:
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
    bad = [k for k, v in obj.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} has NaN/inf values in {len(bad)} tensors, e.g. {bad[:3]}")
    return dict(obj)


def load_into(model: nn.Module, state: Dict[str, torch.Tensor], what: str = "checkpoint") -> nn.Module:
    """``load_state_dict(strict)`` with an error naming the keys that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
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
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(state: Dict[str, torch.Tensor], path: PathLike) -> None:
    """Write a state dict atomically: ``.safetensors`` by suffix, else a weights-only torch file."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state)
        _atomic_write(path, lambda f: f.write(data))
    else:
        _atomic_write(path, lambda f: torch.save(state, f))


def write_text(path: PathLike, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_json(path: PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")
