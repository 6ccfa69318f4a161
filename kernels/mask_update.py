"""Triton kernel for the fused mask update over the flat mask buffers (see
``nft_fast/ops/mask_update.py`` for the formula).

The learning rate is read either from a 1-element fp32 tensor on the device (no host sync, so
the update can sit in a CUDA graph while a scheduler changes the value in place) or from a
Python float passed as a kernel argument.
"""
from __future__ import annotations

from typing import Union

import torch
import triton
import triton.language as tl


@triton.jit
def _mask_update_kernel(
    mask_ptr, grad_ptr, buf_ptr, floor_ptr, lr_ptr,
    n, lr_value, momentum, reg_scale,
    LR_FROM_PTR: tl.constexpr, HAS_REG: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    m = tl.load(mask_ptr + offs, mask=ok, other=1.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(buf_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    fl = tl.load(floor_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = lr_value
    if HAS_REG:
        # d|1 - m|/dm = sign(m - 1), 0 at m = 1 (torch.sign's convention).
        sgn = tl.where(m > 1.0, 1.0, tl.where(m < 1.0, -1.0, 0.0))
        g = g + reg_scale * sgn
    b = b * momentum + g
    m = m - lr * b
    # clamp to [floor, 1] keeping NaN, as torch.maximum / clamp_ (tl.maximum may drop it)
    m = tl.where(m < fl, fl, m)
    m = tl.where(m > 1.0, 1.0, m)
    tl.store(buf_ptr + offs, b.to(buf_ptr.dtype.element_ty), mask=ok)
    tl.store(mask_ptr + offs, m.to(mask_ptr.dtype.element_ty), mask=ok)


def mask_update(
    mask: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, floor: torch.Tensor,
    lr: Union[float, torch.Tensor], momentum: float, reg_scale: float,
) -> None:
    """In-place ``buf``/``mask`` update over flat, contiguous, same-shape buffers.

    ``lr`` is a Python float or a 1-element fp32 tensor on ``mask``'s device (read on device).
    """
    n = mask.numel()
    if n == 0:
        return
    lr_from_ptr = isinstance(lr, torch.Tensor)
    block = 1024 if n >= 1024 else max(16, triton.next_power_of_2(n))
    _mask_update_kernel[(triton.cdiv(n, block),)](
        mask, grad, buf, floor, lr if lr_from_ptr else mask,
        n, 0.0 if lr_from_ptr else float(lr), float(momentum), float(reg_scale),
        LR_FROM_PTR=lr_from_ptr, HAS_REG=bool(reg_scale), BLOCK=block, num_warps=4,
    )
