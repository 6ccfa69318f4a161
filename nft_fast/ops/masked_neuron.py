"""Per-output-neuron masks on Linear / Conv: ``y = m * (W x) + b`` (i.e. ``W' = diag(m) W``).

The mask multiplies the GEMM/convolution output rather than the weight, so a frozen
weight never gets a weight-sized gradient: ``dm = sum(dy * (W x))``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import register, resolve


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2)) if ndim > 1 else t


def masked_linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    z = F.linear(x, weight) * mask
    return z if bias is None else z + bias


def masked_conv_torch(
    x: torch.Tensor, conv: Callable[[torch.Tensor], torch.Tensor], bias: Optional[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """``conv`` computes the bias-free convolution of its argument with the frozen weight."""
    z = conv(x)
    z = z * _channel_view(mask, z.dim())
    return z if bias is None else z + _channel_view(bias, z.dim())


register("masked_linear", "torch", masked_linear_torch)
register("masked_conv", "torch", masked_conv_torch)


def masked_linear(x, weight, bias, mask):
    return resolve("masked_linear", x.device)(x, weight, bias, mask)


def masked_conv(x, conv, bias, mask):
    return resolve("masked_conv", x.device)(x, conv, bias, mask)
