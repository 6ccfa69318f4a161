"""Masked BatchNorm: ``y = act((gamma * m) * x_hat + beta [+ residual])`` with batch statistics in training.

The torch implementation is the oracle. The triton one runs two custom ops,
``nft_fast::masked_bn_fwd`` (mutates the running statistics) and ``nft_fast::masked_bn_bwd``,
with fake implementations, so ``torch.compile(fullgraph=True)`` traces a masked model.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register, resolve


def masked_batch_norm_torch(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    mask: Tensor,
    training: bool,
    momentum: float,
    eps: float,
    residual: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    # weight*mask is a C-element product; batch_norm's backward then yields the mask
    # gradient gamma * sum(dy * x_hat) from its weight-gradient reduction, and no data
    # gradient when x does not require one.
    y = F.batch_norm(x, running_mean, running_var, weight * mask, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


# Functional (autograd needs it): the running statistics are read in eval mode only, and
# training returns the unbiased batch variance for the caller's running-stat update.
@torch.library.custom_op("nft_fast::masked_bn_fwd", mutates_args=())
def masked_bn_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, residual: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float, relu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, rstd, unbiased_var)`` (fp32 per-channel statistics; the variance is empty in eval)."""
    from ..kernels import masked_bn as K

    return K.forward(x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu)


@masked_bn_fwd.register_fake
def _(x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu):
    C = x.shape[1]
    stat = x.new_empty((C,), dtype=torch.float32)
    return (torch.empty_like(x), stat, torch.empty_like(stat), x.new_empty((C if training else 0,), dtype=torch.float32))


@torch.library.custom_op("nft_fast::masked_bn_bwd", mutates_args=())
def masked_bn_bwd(
    dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Tensor, mask: Tensor, mean: Tensor, rstd: Tensor,
    training: bool, relu: bool, need_dx: bool, need_dres: bool,
) -> List[Tensor]:
    """``[dx, dresidual, dweight, dbias, dmask]``; dx / dresidual are empty when not asked."""
    from ..kernels import masked_bn as K

    dx, dres, dw, db, dm = K.backward(dy, x, y, weight, mask, mean, rstd, training, relu, need_dx, need_dres)
    return [dx if dx is not None else x.new_empty((0,)), dres if dres is not None else x.new_empty((0,)), dw, db, dm]


@masked_bn_bwd.register_fake
def _(dy, x, y, weight, mask, mean, rstd, training, relu, need_dx, need_dres):
    return [torch.empty_like(x) if need_dx else x.new_empty((0,)), torch.empty_like(x) if need_dres else x.new_empty((0,)),
            torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(mask)]


def _setup(ctx, inputs, output):
    x, weight, bias, mask, residual, _, _, training, _, relu = inputs
    y, mean, rstd, _ = output
    ctx.training, ctx.relu = training, relu
    ctx.has_bias, ctx.has_res = bias is not None, residual is not None
    # x and the per-channel statistics; y only with ReLU (the next layer keeps it anyway).
    ctx.save_for_backward(x, y if relu else None, weight, mask, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd, _dvar):
    x, y, weight, mask, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dres = ctx.has_res and need[4]
    dx, dres, dw, db, dm = masked_bn_bwd(dy, x, y, weight, mask, mean, rstd, ctx.training, ctx.relu, need[0], need_dres)
    return (dx if need[0] else None, dw if need[1] else None, db if ctx.has_bias and need[2] else None,
            dm if need[3] else None, dres if need_dres else None, None, None, None, None, None)


masked_bn_fwd.register_autograd(_backward, setup_context=_setup)


def _check(x: Tensor, weight: Tensor, mask: Tensor, residual: Optional[Tensor], training: bool) -> None:
    if x.dim() < 2:
        raise ValueError(f"masked_batch_norm: expected an input of at least 2 dims (N, C, ...), got {tuple(x.shape)}")
    C = x.shape[1]
    if weight.shape != (C,) or mask.shape != (C,):
        raise ValueError(f"masked_batch_norm: weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must be ({C},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"masked_batch_norm: residual {tuple(residual.shape)} must match the input {tuple(x.shape)}")
    if training and x.numel() // C <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def masked_batch_norm_triton(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                             residual=None, relu=False):
    _check(x, weight, mask, residual, training)
    if not training and running_mean is None:
        raise ValueError("masked_batch_norm: eval mode needs running statistics")
    y, mean, _, uvar = masked_bn_fwd(x, weight, bias, mask, residual, running_mean, running_var,
                                     bool(training), float(eps), bool(relu))
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(uvar.to(running_var.dtype), momentum)
    return y


register("masked_bn", "torch", masked_batch_norm_torch)
register("masked_bn", "triton", masked_batch_norm_triton)


def masked_batch_norm(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                      residual=None, relu=False):
    """Dispatching entry point (see :func:`masked_batch_norm_torch` for the semantics);
    ``residual``/``relu`` fuse ``relu(bn(x) + residual)``."""
    return resolve("masked_bn", x.device)(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                                          residual, relu)
