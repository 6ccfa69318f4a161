"""Fused mask update over one flat buffer holding every mask.

Per element:  g = grad + reg_scale * sign(m - 1)      (d|1-m|/dm, 0 at m = 1)
              buf = momentum * buf + g                 (torch SGD, dampening 0; buf starts at 0)
              m = clamp(m - lr * buf, floor, 1)        (per-layer floor mu(l))
"""
from __future__ import annotations

import torch

from . import register, resolve


def mask_update_torch(
    mask: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, floor: torch.Tensor,
    lr: float, momentum: float, reg_scale: float,
) -> None:
    g = grad.add(torch.sign(mask - 1), alpha=reg_scale) if reg_scale else grad
    buf.mul_(momentum).add_(g)
    mask.add_(buf, alpha=-lr)
    torch.maximum(mask, floor, out=mask)
    mask.clamp_(max=1.0)


def _check_flat(mask, grad, buf, floor) -> None:
    for name, t in (("grad", grad), ("buf", buf), ("floor", floor)):
        if t.shape != mask.shape or t.dtype != mask.dtype or t.device != mask.device:
            raise ValueError(f"mask_update: {name} must match mask in shape/dtype/device")
    for name, t in (("mask", mask), ("grad", grad), ("buf", buf), ("floor", floor)):
        if not t.is_contiguous():
            raise ValueError(f"mask_update: {name} must be contiguous")


def mask_update_cpp(mask, grad, buf, floor, lr, momentum, reg_scale) -> None:
    from .. import _build

    _check_flat(mask, grad, buf, floor)
    if mask.dtype != torch.float32:
        return mask_update_torch(mask, grad, buf, floor, lr, momentum, reg_scale)
    _build.ext().mask_update_f32(
        mask.data_ptr(), grad.data_ptr(), buf.data_ptr(), floor.data_ptr(), mask.numel(),
        float(lr), float(momentum), float(reg_scale),
    )


def mask_update_cuda(mask, grad, buf, floor, lr, momentum, reg_scale) -> None:
    from .. import _build

    _check_flat(mask, grad, buf, floor)
    if mask.dtype != torch.float32:
        return mask_update_torch(mask, grad, buf, floor, lr, momentum, reg_scale)
    stream = torch.cuda.current_stream(mask.device).cuda_stream
    _build.ext().mask_update_cuda_f32(
        mask.data_ptr(), grad.data_ptr(), buf.data_ptr(), floor.data_ptr(), mask.numel(),
        float(lr), float(momentum), float(reg_scale), stream,
    )


register("mask_update", "torch", mask_update_torch)
register("mask_update", "cpp", mask_update_cpp)
register("mask_update", "cuda", mask_update_cuda)


def mask_update_(mask, grad, buf, floor, lr, momentum, reg_scale) -> None:
    """Dispatching in-place update of ``mask`` and ``buf`` (all flat, same shape)."""
    resolve("mask_update", mask.device)(mask, grad, buf, floor, lr, momentum, reg_scale)
