"""Argument validation shared by every public entry point (NFTConfig, Purifier, purify, the
baseline defenses): one wording for one kind of mistake."""
from __future__ import annotations

import math
from typing import Any


def _fail(owner: str, msg: str) -> None:
    raise ValueError(f"{owner}: {msg}" if owner else msg)


def positive_int(name: str, v: Any, owner: str = "") -> None:
    """``v`` is an ``int`` (not a bool) >= 1."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        _fail(owner, f"{name} must be a positive integer, got {v!r}")


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
