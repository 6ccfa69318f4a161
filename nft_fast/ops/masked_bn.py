"""Masked BatchNorm: ``y = (gamma * m) * x_hat + beta`` with batch statistics in training."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import register, resolve


def masked_batch_norm_torch(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    # weight*mask is a C-element product; batch_norm's backward then yields the mask
    # gradient gamma * sum(dy * x_hat) from its weight-gradient reduction, and no data
    # gradient when x does not require one.
    return F.batch_norm(x, running_mean, running_var, weight * mask, bias, training, momentum, eps)


register("masked_bn", "torch", masked_batch_norm_torch)


def masked_batch_norm(x, running_mean, running_var, weight, bias, mask, training, momentum, eps):
    """Dispatching entry point (see :func:`masked_batch_norm_torch` for the semantics)."""
    return resolve("masked_bn", x.device)(x, running_mean, running_var, weight, bias, mask, training, momentum, eps)
