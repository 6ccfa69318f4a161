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

from .. import _build
from .. import distributed as _dist
from . import _device_ok, register, resolve


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


@torch.library.custom_op("nft_fast::masked_bn_bwd", mutates_args=())
def masked_bn_bwd(
    dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Tensor, mask: Tensor, mean: Tensor, rstd: Tensor,
    training: bool, relu: bool, need_dx: bool, need_dres: bool,
) -> List[Tensor]:
    """``[dx, dresidual, dweight, dbias, dmask]``; dx / dresidual are empty when not asked."""
    from ..kernels import masked_bn as K

    dx, dres, dw, db, dm = K.backward(dy, x, y, weight, mask, mean, rstd, training, relu, need_dx, need_dres)
    return [dx if dx is not None else x.new_empty((0,)), dres if dres is not None else x.new_empty((0,)), dw, db, dm]


def _fwd_fake(x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu):
    C = x.shape[1]
    stat = x.new_empty((C,), dtype=torch.float32)
    return (torch.empty_like(x), stat, torch.empty_like(stat), x.new_empty((C if training else 0,), dtype=torch.float32))


def _bwd_fake(dy, x, y, weight, mask, mean, rstd, training, relu, need_dx, need_dres):
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
masked_bn_fwd.register_fake(_fwd_fake)
masked_bn_bwd.register_fake(_bwd_fake)


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
# cpp and cuda backends: the C++ (OpenMP) CPU kernels of csrc/cpu/masked_bn.cpp and the CUDA
# kernels of csrc/cuda/masked_bn.cu, one Python path for both: fp32 or bf16 activations (a bf16
# autocast step's conv outputs), fp32 parameters and statistics, NCHW / channels_last / 2-D.
# Under NFT_FAST_CUDA_EMU=1 (tests without a GPU) the cuda kernels run on CPU tensors in the
# emulator module nft_fast._cuda_emu.
# ------------------------------------------------------------------------------------------

_EXT_DTYPES = (torch.float32, torch.bfloat16)


def _rows_layout(x: Tensor) -> Optional[bool]:
    """True: ``x`` is a dense "rows x C" matrix (channels_last 1d-3d, 2-D (N, C), or no spatial
    extent); False: dense (N, C, S) planes (NCHW); None: neither (the kernels do not take it)."""
    S = x.numel() // max(x.shape[0] * x.shape[1], 1)
    if x.is_contiguous():
        return x.dim() == 2 or S == 1
    if x.movedim(1, -1).is_contiguous():
        return True
    return None


def _ext_takes(kind: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor,
               residual: Optional[Tensor]) -> bool:
    """Whether backend ``kind``'s kernels run this call (else the torch implementation does): x fp32
    or bf16 on the backend's device (the residual alike), fp32 parameters there, a dense layout."""
    if not _device_ok(kind, x.device) or x.dtype not in _EXT_DTYPES or x.dim() < 2 or x.numel() == 0:
        return False
    if any(t is not None and (t.device != x.device or t.dtype != torch.float32) for t in (weight, bias, mask)):
        return False
    if residual is not None and (residual.device != x.device or residual.dtype != x.dtype):
        return False
    return _rows_layout(x) is not None


def _same_layout(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (same shape as ``x``) in ``x``'s dtype and strides (a copy only when they differ)."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _ncs(x: Tensor) -> Tuple[int, int, int]:
    N, C = x.shape[0], x.shape[1]
    return N, C, x.numel() // (N * C)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_launch(x: Tensor, N: int, C: int, S: int, rows: bool):
    """``(module, sms, stream, workspace)`` of a CUDA (or emulated) masked-BN launch on ``x``."""
    from . import cuda_launch

    mod, sms, stream = cuda_launch(x.device)
    _, _, ws = mod.masked_bn_cuda_plan(N, C, S, rows, sms)
    return mod, sms, stream, torch.empty((ws,), dtype=torch.float32, device=x.device)


def _ext_fwd_impl(kind: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor,
                  residual: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  training: bool, eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    rows = _rows_layout(x)
    if rows is None or not _ext_takes(kind, x, weight, bias, mask, residual):
        raise ValueError(f"masked_bn_{kind}_fwd: needs dense fp32/bf16 tensors on the backend's device (NCHW, "
                         f"channels_last or 2-D) and fp32 parameters, got {x.dtype} on {x.device} with strides "
                         f"{x.stride()}")
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
    args = (x.data_ptr(), _ptr(res), w.data_ptr(), m.data_ptr(), _ptr(b), y.data_ptr(), mean.data_ptr(),
            rstd.data_ptr(), _ptr(uvar) if training else 0)
    flags = (N, C, S, rows, bool(training), float(eps), bool(relu), x.dtype == torch.bfloat16)
    if kind == "cpp":
        _build.ext().masked_bn_fwd_cpu(*args, *flags)
    else:
        mod, sms, stream, ws = _cuda_launch(x, N, C, S, rows)
        mod.masked_bn_fwd_cuda(*args, ws.data_ptr(), *flags, sms, stream)
    return y, mean, rstd, uvar


def _ext_bwd_impl(kind: str, dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Tensor, mask: Tensor, mean: Tensor,
                  rstd: Tensor, training: bool, relu: bool, need_dx: bool, need_dres: bool) -> List[Tensor]:
    rows = _rows_layout(x)
    if rows is None or not _ext_takes(kind, x, weight, None, mask, None):
        raise ValueError(f"masked_bn_{kind}_bwd: needs dense fp32/bf16 tensors on the backend's device, got "
                         f"{x.dtype} on {x.device} with strides {x.stride()}")
    if relu and y is None:
        raise ValueError(f"masked_bn_{kind}_bwd: relu needs the forward output y")
    N, C, S = _ncs(x)
    dy = _same_layout(dy, x)
    yy = _same_layout(y, x) if relu else None
    w, m = weight.contiguous(), mask.contiguous()
    dw, db, dm = torch.empty_like(w), torch.empty_like(w), torch.empty_like(m)
    dx = torch.empty_like(x) if need_dx else None
    dres = torch.empty_like(x) if need_dres else None
    args = (dy.data_ptr(), x.data_ptr(), _ptr(yy), w.data_ptr(), m.data_ptr(), mean.contiguous().data_ptr(),
            rstd.contiguous().data_ptr(), _ptr(dx), _ptr(dres), dw.data_ptr(), db.data_ptr(), dm.data_ptr())
    flags = (N, C, S, rows, bool(training), bool(relu), x.dtype == torch.bfloat16)
    if kind == "cpp":
        _build.ext().masked_bn_bwd_cpu(*args, *flags)
    else:
        mod, sms, stream, ws = _cuda_launch(x, N, C, S, rows)
        mod.masked_bn_bwd_cuda(*args, ws.data_ptr(), *flags, sms, stream)
    return [dx if dx is not None else x.new_empty((0,)), dres if dres is not None else x.new_empty((0,)), dw, db, dm]


def _define_ext_ops(kind: str):
    """The custom ops ``nft_fast::masked_bn_{kind}_fwd/_bwd`` (what torch.compile traces), their
    fake implementations and autograd, and the eager autograd Function of backend ``kind``."""

    def fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, residual: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
            relu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return _ext_fwd_impl(kind, x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu)

    def bwd(dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Tensor, mask: Tensor, mean: Tensor, rstd: Tensor,
            training: bool, relu: bool, need_dx: bool, need_dres: bool) -> List[Tensor]:
        return _ext_bwd_impl(kind, dy, x, y, weight, mask, mean, rstd, training, relu, need_dx, need_dres)

    fwd.__doc__ = (f"{kind} forward: ``(y, mean, rstd, unbiased_var)`` as :func:`masked_bn_fwd` (fp32/bf16 "
                   "activations, NCHW- or channels_last-contiguous or 2-D).")
    bwd.__doc__ = f"{kind} backward: ``[dx, dresidual, dweight, dbias, dmask]`` as :func:`masked_bn_bwd`."
    fwd_op = torch.library.custom_op(f"nft_fast::masked_bn_{kind}_fwd", mutates_args=())(fwd)
    bwd_op = torch.library.custom_op(f"nft_fast::masked_bn_{kind}_bwd", mutates_args=())(bwd)
    fwd_op.register_fake(_fwd_fake)
    bwd_op.register_fake(_bwd_fake)
    fwd_op.register_autograd(lambda ctx, dy, _m, _r, _v: _grads(bwd_op, ctx, dy), setup_context=_setup)

    class Eager(torch.autograd.Function):
        """The same forward/backward as the custom ops without the dispatcher round trips
        (about 0.1-0.3 ms a layer on the CPU, as much as the kernels on small layers); used
        outside torch.compile, which traces the custom ops instead."""

        @staticmethod
        def forward(ctx, x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu):
            out = fwd(x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu)
            _setup(ctx, (x, weight, bias, mask, residual, running_mean, running_var, training, eps, relu), out)
            ctx.mark_non_differentiable(*out[1:])
            return out

        @staticmethod
        def backward(ctx, dy, _dmean, _drstd, _dvar):
            return _grads(bwd, ctx, dy)

    Eager.__name__ = Eager.__qualname__ = f"_MaskedBN{kind.capitalize()}Eager"

    def masked_batch_norm_ext(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                              residual=None, relu=False):
        _check(x, weight, mask, residual, training)
        if not _ext_takes(kind, x, weight, bias, mask, residual):
            return masked_batch_norm_torch(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                                           residual, relu)
        if not training and running_mean is None:
            raise ValueError("masked_batch_norm: eval mode needs running statistics")
        op = fwd_op if torch.compiler.is_compiling() else Eager.apply
        y, mean, _, uvar = op(x, weight, bias, mask, residual, running_mean, running_var, bool(training), float(eps),
                              bool(relu))
        if training and running_mean is not None:
            _update_running(running_mean, running_var, mean, uvar, momentum)
        return y

    masked_batch_norm_ext.__name__ = f"masked_batch_norm_{kind}"
    masked_batch_norm_ext.__doc__ = (
        f"{kind} masked BatchNorm (same semantics as :func:`masked_batch_norm_torch`). fp32 or bf16 "
        "activations in NCHW / channels_last(_3d) / 2-D contiguous layouts with fp32 parameters run the kernels "
        "(bf16: fp32 arithmetic, one rounding of y, where torch rounds bn(x) and then the residual sum); anything "
        "else (other dtypes, devices or layouts) runs the torch implementation.")
    return fwd_op, bwd_op, Eager, masked_batch_norm_ext


masked_bn_cpp_fwd, masked_bn_cpp_bwd, _MaskedBNCppEager, masked_batch_norm_cpp = _define_ext_ops("cpp")
masked_bn_cuda_fwd, masked_bn_cuda_bwd, _MaskedBNCudaEager, masked_batch_norm_cuda = _define_ext_ops("cuda")


register("masked_bn", "torch", masked_batch_norm_torch)
register("masked_bn", "triton", masked_batch_norm_triton)
register("masked_bn", "cpp", masked_batch_norm_cpp)
register("masked_bn", "cuda", masked_batch_norm_cuda)


def masked_batch_norm(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                      residual=None, relu=False):
    """Dispatching entry point (see :func:`masked_batch_norm_torch` for the semantics);
    ``residual``/``relu`` fuse ``relu(bn(x) + residual)``. Inside
    :func:`nft_fast.distributed.synced`, training uses the global batch's statistics."""
    if training:
        w = _dist.active_world()
        if w is not None:
            return _dist.sync_batch_norm(x, running_mean, running_var, weight, bias, mask, momentum, eps, residual, relu, w)
    return resolve("masked_bn", x.device)(x, running_mean, running_var, weight, bias, mask, training, momentum, eps,
                                          residual, relu)
