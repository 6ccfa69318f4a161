"""Purification hyper-parameters (SPEC section 2 defaults)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

_PRECISIONS = ("fp32", "bf16")


@dataclass
class NFTConfig:
    """Hyper-parameters of one NFT run. The defaults are the reference (paper) settings."""

    steps: int = 1000
    rounds: int = 5
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.95
    eta_min: float = 0.02
    mixup_alpha: float = 1.0
    reg_coef: float = 1e-3
    floor_alpha: float = 0.8
    floor_beta: float = 0.5
    seed: int = 0
    precision: str = "fp32"
    # None: channels_last whenever the model has Conv2d layers (faster convolutions on
    # CPU and GPU; numerically equivalent, not bit-identical, to NCHW).
    channels_last: Optional[bool] = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"NFTConfig: {msg}")

        for name in ("steps", "rounds", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.steps % self.rounds:
            bad(f"steps ({self.steps}) must be a multiple of rounds ({self.rounds})")
        for name in ("lr", "momentum", "eta_min", "mixup_alpha", "reg_coef", "floor_alpha", "floor_beta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{name} must be a finite non-negative number, got {v!r}")
        if self.lr <= 0:
            bad(f"lr must be > 0, got {self.lr}")
        if self.momentum >= 1:
            bad(f"momentum must be < 1, got {self.momentum}")
        if self.floor_alpha > 1:
            bad(f"floor_alpha must be <= 1 (masks are clamped to [floor, 1]), got {self.floor_alpha}")
        if self.precision not in _PRECISIONS:
            bad(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")

    @property
    def steps_per_round(self) -> int:
        return self.steps // self.rounds

    def floor(self, layer: int) -> float:
        """Lower clamp bound mu(l) = alpha * exp(-beta * l) of mask layer l (1-based)."""
        return self.floor_alpha * math.exp(-self.floor_beta * layer)

    def round_lr(self, r: int) -> float:
        """Learning rate of round r (0-based): CosineAnnealingLR(T_max=rounds, eta_min) stepped per round."""
        return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * r / self.rounds)) / 2

    def replace(self, **kw) -> "NFTConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
