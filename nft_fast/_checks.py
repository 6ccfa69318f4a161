"""Argument validation shared by every public entry point (NFTConfig, Purifier, purify, the
baseline defenses): one wording for one kind of mistake."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional


def _fail(owner: str, msg: str) -> None:
    raise ValueError(f"{owner}: {msg}" if owner else msg)


def positive_int(name: str, v: Any, owner: str = "", hi: Optional[int] = None) -> None:
    """``v`` is an ``int`` (not a bool) >= 1 (and <= ``hi`` when given)."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        _fail(owner, f"{name} must be a positive integer, got {v!r}")
    if hi is not None and v > hi:
        _fail(owner, f"{name} must be at most {hi}, got {v!r}")


#: Largest seed: numpy and torch take 0 .. 2**64 - 1, and derived seeds (seed + round) must fit too.
MAX_SEED = 2**63 - 1


def seed(name: str, v: Any, owner: str = "") -> None:
    """``v`` is an ``int`` (not a bool) in ``0 .. MAX_SEED``."""
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SEED:
        _fail(owner, f"{name} must be an integer in 0..2**63 - 1, got {v!r}")


def index(name: str, v: Any, n: int, owner: str = "") -> None:
    """``v`` is an ``int`` (not a bool) in ``0 .. n - 1`` (a class index of ``n`` classes)."""
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
        _fail(owner, f"{name} must be an integer in 0..{n - 1} (the model has {n} classes), got {v!r}")


def number(name: str, v: Any, lo: float = 0.0, hi: float = math.inf, *, lo_open: bool = False,
           hi_open: bool = False, owner: str = "") -> None:
    """``v`` is a finite real number (not a bool) in the interval ``lo .. hi``."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open or hi == math.inf else ']'}"
        _fail(owner, f"{name} must be a finite number in {rng}, got {v!r}")


def one_of(name: str, v: Any, choices: tuple, owner: str = "") -> None:
    if v not in choices:
        _fail(owner, f"{name} must be one of {choices}, got {v!r}")


def config(cfg: Any, owner: str):
    """``cfg`` (None: the reference ``NFTConfig()``) checked again as the entry points take it:
    an ``NFTConfig`` (a dict is a TypeError) whose fields still pass ``NFTConfig``'s own
    validation (fields assigned after creation are not checked by the dataclass)."""
    from .config import NFTConfig

    if cfg is None:
        return NFTConfig()
    if not isinstance(cfg, NFTConfig):
        raise TypeError(f"{owner}: cfg must be an NFTConfig, got {type(cfg).__name__} "
                        "(build one with NFTConfig(**d) or NFTConfig.preset(name))")
    try:
        dataclasses.replace(cfg)  # runs __post_init__'s checks on the current field values
    except (TypeError, ValueError) as e:
        raise ValueError(f"{owner}: cfg is no longer valid (changed after creation?): {e}") from None
    return cfg


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PB"


def fits_memory(nbytes: float, what: str) -> None:
    """Refuse (``ValueError``) ``what`` when it would need more memory than the machine has
    available (:func:`nft_fast.machine.available_memory`); nothing is allocated to find out."""
    from .machine import available_memory

    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ValueError(f"{what} would need {_size(nbytes)} of memory, more than the {_size(avail)} "
                         "this machine has available")
