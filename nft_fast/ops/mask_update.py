"""Fused mask update over one flat buffer holding every mask.

Per element:  g = grad + reg_scale * sign(m - 1)      (d|1-m|/dm, 0 at m = 1)
              buf = momentum * buf + g                 (torch SGD, dampening 0; buf starts at 0)
              m = clamp(m - lr * buf, floor, 1)        (per-layer floor mu(l))

``lr`` is a Python float or a 1-element float32 tensor on the buffers' device; the triton
implementation reads a tensor ``lr`` on the device (no host sync: CUDA-graph safe).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _build
from . import register, resolve


def mask_update_torch(
    mask: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, floor: torch.Tensor,
    lr: Union[float, Tensor], momentum: float, reg_scale: float,
) -> None:
    g = grad.add(torch.sign(mask - 1), alpha=reg_scale) if reg_scale else grad
    buf.mul_(momentum).add_(g)
    if isinstance(lr, Tensor):  # read on the device: no host sync
        mask.addcmul_(buf, lr.to(mask.dtype), value=-1)
    else:
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
    _check_flat(mask, grad, buf, floor)
    if mask.dtype != torch.float32:
        return mask_update_torch(mask, grad, buf, floor, lr, momentum, reg_scale)
    _build.ext().mask_update_f32(
        mask.data_ptr(), grad.data_ptr(), buf.data_ptr(), floor.data_ptr(), mask.numel(),
        float(lr), float(momentum), float(reg_scale),
    )


def mask_update_cuda(mask, grad, buf, floor, lr, momentum, reg_scale) -> None:
    """CUDA ``mask_update`` (fp32 buffers; others run the torch implementation). A tensor ``lr`` is
    read by the kernel on the device: CUDA-graph safe. CPU tensors run on the emulator
    (NFT_FAST_CUDA_EMU=1)."""
    from . import cuda_launch

    _check_flat(mask, grad, buf, floor)
    _check_lr(lr, mask)
    if mask.dtype != torch.float32:
        return mask_update_torch(mask, grad, buf, floor, lr, momentum, reg_scale)
    mod, _, stream = cuda_launch(mask.device)
    lr_ptr, lr_v = (lr.data_ptr(), 0.0) if isinstance(lr, Tensor) else (0, float(lr))
    mod.mask_update_cuda_f32(mask.data_ptr(), grad.data_ptr(), buf.data_ptr(), floor.data_ptr(), mask.numel(),
                             lr_ptr, lr_v, float(momentum), float(reg_scale), stream)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_lr(lr: Union[float, Tensor], mask: Tensor) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.dtype != torch.float32 or lr.device != mask.device:
            raise ValueError(f"mask_update: a tensor lr must be a 1-element float32 tensor on {mask.device}, "
                             f"got {tuple(lr.shape)} {lr.dtype} on {lr.device}")


@torch.library.custom_op("nft_fast::mask_update", mutates_args=("mask", "buf"))
def mask_update_op(
    mask: Tensor, grad: Tensor, buf: Tensor, floor: Tensor, lr_tensor: Optional[Tensor], lr: float,
    momentum: float, reg_scale: float,
) -> None:
    """In-place Triton update of ``mask`` and ``buf``; the learning rate is ``lr_tensor`` (read on
    the device) when given, else ``lr``."""
    from ..kernels import mask_update as K

    _check_flat(mask, grad, buf, floor)
    if mask.device.type != "cuda" and not _build.triton_interpret():
        raise ValueError(f"mask_update: triton needs CUDA tensors (or TRITON_INTERPRET=1), got {mask.device}")
    K.mask_update(mask, grad, buf, floor, lr_tensor if lr_tensor is not None else lr, momentum, reg_scale)


@mask_update_op.register_fake
def _(mask, grad, buf, floor, lr_tensor, lr, momentum, reg_scale):
    return None


def mask_update_triton(mask, grad, buf, floor, lr, momentum, reg_scale) -> None:
    """Triton ``mask_update`` (same semantics as :func:`mask_update_torch`)."""
    _check_flat(mask, grad, buf, floor)
    if mask.dtype not in _FLOATS:
        raise ValueError(f"mask_update: buffers must be float32/bfloat16/float16, got {mask.dtype}")
    _check_lr(lr, mask)
    if isinstance(lr, Tensor):
        mask_update_op(mask, grad, buf, floor, lr.reshape(1), 0.0, float(momentum), float(reg_scale))
    else:
        mask_update_op(mask, grad, buf, floor, None, float(lr), float(momentum), float(reg_scale))


register("mask_update", "torch", mask_update_torch)
register("mask_update", "cpp", mask_update_cpp)
register("mask_update", "cuda", mask_update_cuda)
register("mask_update", "triton", mask_update_triton)


def mask_update_(mask: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, floor: torch.Tensor,
                 lr: Union[float, Tensor], momentum: float, reg_scale: float) -> None:
    """Dispatching in-place update of ``mask`` and ``buf`` (all flat, same shape)."""
    resolve("mask_update", mask.device)(mask, grad, buf, floor, lr, momentum, reg_scale)
