"""Masked GroupNorm: ``y = (gamma * m) * x_hat + beta`` with ``x_hat`` normalised per sample and group.

The mask sits on gamma exactly as for BatchNorm and LayerNorm, so it folds into the weight
(``gamma' = gamma * m``) and the bias is untouched. Only the torch implementation exists: on
every backend (``cpp``, ``cuda``, ``triton``) :func:`nft_fast.ops.resolve` falls back to it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import register, resolve


def masked_group_norm_torch(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            mask: torch.Tensor, eps: float) -> torch.Tensor:
    if x.device.type == "cpu" and not x.requires_grad and not x.is_contiguous():
        # torch 2.13's CPU group_norm backward crashes (SIGSEGV) when it computes the weight
        # gradient alone of a channels_last / channels_last_3d input, which is what a mask
        # behind frozen layers asks for (tests/repro/groupnorm_channels_last_wgrad.py). An NCHW
        # copy takes the working kernel; the values are the same.
        x = x.contiguous()
    # weight*mask is a C-element product: group_norm's weight gradient gives the mask gradient
    return F.group_norm(x, num_groups, weight * mask, bias, eps)


register("masked_gn", "torch", masked_group_norm_torch)


def masked_group_norm(x, num_groups, weight, bias, mask, eps):
    return resolve("masked_gn", x.device)(x, num_groups, weight, bias, mask, eps)
