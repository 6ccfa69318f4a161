"""Masked LayerNorm: ``y = (gamma * m) * x_hat + beta`` over the normalised shape."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import register, resolve


def masked_layer_norm_torch(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    return F.layer_norm(x, normalized_shape, weight * mask, bias, eps)


register("masked_ln", "torch", masked_layer_norm_torch)


def masked_layer_norm(x, normalized_shape, weight, bias, mask, eps):
    return resolve("masked_ln", x.device)(x, normalized_shape, weight, bias, mask, eps)
