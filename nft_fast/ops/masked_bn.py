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
    # Copies of the C-element weight and mask: backward uses their values at forward time, as
    # torch's saved weight*mask product does, even when a caller (ANP's perturbations) updates
    # them in place in between.
    ctx.save_for_backward(x, y if relu else None, weight.detach().clone(), mask.detach().clone(), mean, rstd)


def _grads(bwd, ctx, dy):
    """The autograd backward of every masked-BN forward (custom op or Function): ``bwd`` is
    the backward op of the backend; unrequested gradients are None."""
    x, y, weight, mask, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dres = ctx.has_res and need[4]
    dx, dres, dw, db, dm = bwd(dy, x, y, weight, mask, mean, rstd, ctx.training, ctx.relu, need[0], need_dres)
    return (dx if need[0] else None, dw if need[1] else None, db if ctx.has_bias and need[2] else None,
            dm if need[3] else None, dres if need_dres else None, None, None, None, None, None)


def _backward(ctx, dy, _dmean, _drstd, _dvar):
    return _grads(masked_bn_bwd, ctx, dy)


masked_bn_fwd.register_autograd(_backward, setup_context=_setup)


def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, uvar: Tensor, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, in place. Eagerly through
    ``.data``, so the version counters do not move: like torch's batch_norm, whose in-kernel
    update leaves earlier graphs that saved the running stats (ANP's perturbed forward)
    valid for their backward."""
    with torch.no_grad():
        rm, rv = (running_mean, running_var) if torch.compiler.is_compiling() else (running_mean.data, running_var.data)
        rm.lerp_(mean.to(rm.dtype), momentum)
        rv.lerp_(uvar.to(rv.dtype), momentum)


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
        _update_running(running_mean, running_var, mean, uvar, momentum)
    return y


# ------------------------------------------------------------------------------------------
# cpp backend: the C++ (OpenMP) CPU kernels of csrc/cpu/masked_bn.cpp, fp32 only.
# ------------------------------------------------------------------------------------------

def _cpp_rows_layout(x: Tensor) -> Optional[bool]:
    """True: ``x`` is a dense "rows x C" matrix (channels_last 1d-3d, 2-D (N, C), or no spatial
    extent); False: dense (N, C, S) planes (NCHW); None: neither (the cpp path does not take it)."""
    S = x.numel() // max(x.shape[0] * x.shape[1], 1)
    if x.is_contiguous():
        return x.dim() == 2 or S == 1
    if x.movedim(1, -1).is_contiguous():
        return True
    return None


def _cpp_takes(x: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether the C++ kernels run this call (else the torch implementation does)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 2 or x.numel() == 0:
        return False
    if any(t is not None and (t.device.type != "cpu" or t.dtype != torch.float32) for t in others):
        return False
    return _cpp_rows_layout(x) is not None


def _same_layout(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (same shape as ``x``) as fp32 with ``x``'s strides (a copy only when they differ)."""
    if t.dtype == torch.float32 and t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=torch.float32).copy_(t)


def _ncs(x: Tensor) -> Tuple[int, int, int]:
    N, C = x.shape[0], x.shape[1]
    return N, C, x.numel() // (N * C)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _cpp_fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, residual: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                  relu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from .. import _build

    rows = _cpp_rows_layout(x)
    if rows is None or not _cpp_takes(x, weight, bias, mask, residual):
        raise ValueError(f"masked_bn_cpp_fwd: needs dense fp32 CPU tensors (NCHW, channels_last or 2-D), got "
                         f"{x.dtype} on {x.device} with strides {x.stride()}")
    N, C, S = _ncs(x)
    y = torch.empty_like(x)
    res = _same_layout(residual, x) if residual is not None else None
    w, m = weight.contiguous(), mask.contiguous()
    b = bias.contiguous() if bias is not None else None
    uvar = x.new_empty((C if training else 0,), dtype=torch.float32)
    if training:
        mean = x.new_empty((C,), dtype=torch.float32)
        rstd = torch.empty_like(mean)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("masked_batch_norm: eval mode needs running statistics")
        mean = running_mean.to(torch.float32, copy=True).contiguous()
        rstd = torch.rsqrt(running_var.to(torch.float32) + eps).contiguous()
    _build.ext().masked_bn_fwd_f32(x.data_ptr(), _ptr(res), w.data_ptr(), m.data_ptr(), _ptr(b), y.data_ptr(),
                                   mean.data_ptr(), rstd.data_ptr(), _ptr(uvar) if training else 0, N, C, S, rows,
                                   bool(training), float(eps), bool(relu))
    return y, mean, rstd, uvar


@torch.library.custom_op("nft_fast::masked_bn_cpp_fwd", mutates_args=())
def masked_bn_cpp_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, residual: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float, relu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """C++ forward: ``(y, mean, rstd, unbiased_var)`` as :func:`masked_bn_fwd` (fp32 CPU tensors,
    x NCHW- or channels_last-contiguous or 2-D contiguous)."""
    return _cpp_fwd_impl(x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu)


@masked_bn_cpp_fwd.register_fake
def _(x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu):
    C = x.shape[1]
    stat = x.new_empty((C,), dtype=torch.float32)
    return (torch.empty_like(x), stat, torch.empty_like(stat), x.new_empty((C if training else 0,), dtype=torch.float32))


def _cpp_bwd_impl(dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Tensor, mask: Tensor, mean: Tensor,
                  rstd: Tensor, training: bool, relu: bool, need_dx: bool, need_dres: bool) -> List[Tensor]:
    from .. import _build

    rows = _cpp_rows_layout(x)
    if rows is None or not _cpp_takes(x, weight, mask):
        raise ValueError(f"masked_bn_cpp_bwd: needs dense fp32 CPU tensors, got {x.dtype} on {x.device} "
                         f"with strides {x.stride()}")
    if relu and y is None:
        raise ValueError("masked_bn_cpp_bwd: relu needs the forward output y")
    N, C, S = _ncs(x)
    dy = _same_layout(dy, x)
    yy = _same_layout(y, x) if relu else None
    w, m = weight.contiguous(), mask.contiguous()
    dw, db, dm = torch.empty_like(w), torch.empty_like(w), torch.empty_like(m)
    dx = torch.empty_like(x) if need_dx else None
    dres = torch.empty_like(x) if need_dres else None
    _build.ext().masked_bn_bwd_f32(dy.data_ptr(), x.data_ptr(), _ptr(yy), w.data_ptr(), m.data_ptr(),
                                   mean.contiguous().data_ptr(), rstd.contiguous().data_ptr(), _ptr(dx), _ptr(dres),
                                   dw.data_ptr(), db.data_ptr(), dm.data_ptr(), N, C, S, rows, bool(training),
                                   bool(relu))
    return [dx if dx is not None else x.new_empty((0,)), dres if dres is not None else x.new_empty((0,)), dw, db, dm]


@torch.library.custom_op("nft_fast::masked_bn_cpp_bwd", mutates_args=())
def masked_bn_cpp_bwd(
    dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Tensor, mask: Tensor, mean: Tensor, rstd: Tensor,
    training: bool, relu: bool, need_dx: bool, need_dres: bool,
) -> List[Tensor]:
    """C++ backward: ``[dx, dresidual, dweight, dbias, dmask]`` as :func:`masked_bn_bwd`."""
    return _cpp_bwd_impl(dy, x, y, weight, mask, mean, rstd, training, relu, need_dx, need_dres)


@masked_bn_cpp_bwd.register_fake
def _(dy, x, y, weight, mask, mean, rstd, training, relu, need_dx, need_dres):
    return [torch.empty_like(x) if need_dx else x.new_empty((0,)), torch.empty_like(x) if need_dres else x.new_empty((0,)),
            torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(mask)]


def _backward_cpp(ctx, dy, _dmean, _drstd, _dvar):
    return _grads(masked_bn_cpp_bwd, ctx, dy)


masked_bn_cpp_fwd.register_autograd(_backward_cpp, setup_context=_setup)


class _MaskedBNCppEager(torch.autograd.Function):
    """The same forward/backward as the custom ops without the dispatcher round trips
    (about 0.1-0.3 ms a layer on the CPU, as much as the kernels on small layers); used
    outside torch.compile, which traces the custom ops instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu):
        out = _cpp_fwd_impl(x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu)
        _setup(ctx, (x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu), out)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd, _dvar):
        return _grads(_cpp_bwd_impl, ctx, dy)


def masked_batch_norm_cpp(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                          residual=None, relu=False):
    """C++ masked BatchNorm (same semantics as :func:`masked_batch_norm_torch`). fp32 CPU tensors
    in NCHW / channels_last(_3d) / 2-D contiguous layouts run the kernels; anything else (other
    dtypes, other layouts) runs the torch implementation."""
    _check(x, weight, mask, residual, training)
    if not _cpp_takes(x, weight, bias, mask, residual):
        return masked_batch_norm_torch(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                                       residual, relu)
    if not training and running_mean is None:
        raise ValueError("masked_batch_norm: eval mode needs running statistics")
    op = masked_bn_cpp_fwd if torch.compiler.is_compiling() else _MaskedBNCppEager.apply
    y, mean, _, uvar = op(x, weight, bias, mask, residual, running_mean, running_var, bool(training), float(eps),
                          bool(relu))
    if training and running_mean is not None:
        _update_running(running_mean, running_var, mean, uvar, momentum)
    return y


register("masked_bn", "torch", masked_batch_norm_torch)
register("masked_bn", "triton", masked_batch_norm_triton)
register("masked_bn", "cpp", masked_batch_norm_cpp)


def masked_batch_norm(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                      residual=None, relu=False):
    """Dispatching entry point (see :func:`masked_batch_norm_torch` for the semantics);
    ``residual``/``relu`` fuse ``relu(bn(x) + residual)``."""
    return resolve("masked_bn", x.device)(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                                          residual, relu)
