"""Per-output-neuron masks on Linear / Conv: ``y = m * (W x) + b`` (i.e. ``W' = diag(m) W``).

The mask multiplies the GEMM/convolution output rather than the weight, so a frozen
weight never gets a weight-sized gradient: ``dm = sum(dy * (W x))``.

The torch implementations are the oracles. The triton ones run custom ops with fake
implementations (so ``torch.compile(fullgraph=True)`` traces a masked model):
``nft_fast::masked_linear_fwd`` / ``_bwd`` (a Triton GEMM with the mask in its epilogue) and,
for convolutions, ``nft_fast::masked_channel_fwd`` / ``_bwd``: the convolution itself stays
torch's (cuDNN), only its per-channel epilogue ``z * m[c] + b[c]`` is a Triton kernel.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _build
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


# ------------------------------------------------------------------------------------------
# Triton implementations
# ------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _out_dtype(z_dtype: torch.dtype, mask: Tensor, bias: Optional[Tensor]) -> torch.dtype:
    # What ``z * mask + bias`` promotes to in the torch implementation.
    dt = torch.promote_types(z_dtype, mask.dtype)
    return dt if bias is None else torch.promote_types(dt, bias.dtype)


def _check_runnable(name: str, *tensors: Optional[Tensor]) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not (t.device.type == "cpu" and _build.triton_interpret()):
            raise ValueError(f"{name}: triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {t.device}")


def _check_vec(name: str, what: str, t: Optional[Tensor], n: int, device: torch.device) -> None:
    if t is None:
        return
    if t.shape != (n,):
        raise ValueError(f"{name}: {what} must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name}: {what} must be float32/bfloat16/float16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: {what} is on {t.device}, the input on {device}")


def _check_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"masked_linear: weight must be 2-D [N, K], got {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"masked_linear: input {tuple(x.shape)} must end in K={K} (weight {tuple(weight.shape)})")
    if x.dtype not in _FLOATS or weight.dtype != x.dtype:
        raise ValueError(f"masked_linear: input and weight must share one of float32/bfloat16/float16, "
                         f"got {x.dtype} and {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"masked_linear: weight is on {weight.device}, the input on {x.device}")
    _check_vec("masked_linear", "mask", mask, N, x.device)
    _check_vec("masked_linear", "bias", bias, N, x.device)


@torch.library.custom_op("nft_fast::masked_linear_fwd", mutates_args=())
def masked_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, need_z: bool) -> Tuple[Tensor, Tensor]:
    """``(y, z)``: ``y = (x @ W^T) * m + b`` and the pre-mask ``z = x @ W^T`` (empty unless ``need_z``)."""
    from ..kernels import masked_neuron as K

    _check_linear(x, weight, bias, mask)
    _check_runnable("masked_linear", x)
    lead, N = x.shape[:-1], weight.shape[0]
    y, z = K.linear_fwd(x.reshape(-1, x.shape[-1]), weight, bias, mask, _out_dtype(x.dtype, mask, bias), need_z)
    return y.view(*lead, N), (z.view(*lead, N) if z is not None else x.new_empty((0,)))


@masked_linear_fwd.register_fake
def _(x, weight, bias, mask, need_z):
    _check_linear(x, weight, bias, mask)
    shape = (*x.shape[:-1], weight.shape[0])
    y = x.new_empty(shape, dtype=_out_dtype(x.dtype, mask, bias))
    return y, (x.new_empty(shape) if need_z else x.new_empty((0,)))


@torch.library.custom_op("nft_fast::masked_linear_bwd", mutates_args=())
def masked_linear_bwd(
    dy: Tensor, weight: Tensor, mask: Tensor, z: Optional[Tensor], need_dx: bool, need_dm: bool, need_db: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dm, db)``: ``dx = (dy * m) @ W`` (W's dtype), fp32 ``dm = sum_rows(dy * z)`` and
    ``db = sum_rows(dy)``; each is empty when not asked for."""
    from ..kernels import masked_neuron as K

    _check_runnable("masked_linear", dy)
    N, Kd = weight.shape
    if dy.shape[-1:] != (N,) or (need_dm and (z is None or z.shape != dy.shape)):
        raise ValueError(f"masked_linear backward: dy {tuple(dy.shape)} / z must be [..., {N}]")
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, N)
    empty = dy.new_empty((0,), dtype=torch.float32)
    dx = K.linear_dx(dy2, weight, mask).view(*lead, Kd) if need_dx else weight.new_empty((0,))
    dm, db = K.linear_colsums(dy2, z.reshape(-1, N) if need_dm else None, need_dm, need_db)
    return dx, (dm if dm is not None else empty), (db if db is not None else empty.clone())


@masked_linear_bwd.register_fake
def _(dy, weight, mask, z, need_dx, need_dm, need_db):
    N, Kd = weight.shape
    f32 = dict(dtype=torch.float32)
    return (weight.new_empty((*dy.shape[:-1], Kd)) if need_dx else weight.new_empty((0,)),
            dy.new_empty((N if need_dm else 0,), **f32), dy.new_empty((N if need_db else 0,), **f32))


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, mask, need_z = inputs
    _, z = output
    ctx.has_bias = bias is not None
    ctx.mask_dtype = mask.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    # x only for a trainable weight's gradient; z (pre-mask output) only for dm.
    ctx.save_for_backward(x if weight.requires_grad else None, weight, mask, z if need_z else None)


def _linear_backward(ctx, dy, _dz):
    x, weight, mask, z = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dm = ctx.needs_input_grad[:4]
    need_db = need_db and ctx.has_bias
    if need_dm and z is None:
        raise RuntimeError("masked_linear: the mask needs a gradient but z was not kept "
                           "(the forward ran with need_z=False)")
    dx, dm, db = masked_linear_bwd(dy, weight, mask, z if need_dm else None, need_dx, need_dm, need_db)
    dw = None
    if need_dw:  # a trainable weight: dW = (dy * m)^T x, a plain torch GEMM
        N = weight.shape[0]
        dzz = (dy * mask).to(weight.dtype).reshape(-1, N)
        dw = dzz.t() @ x.reshape(-1, weight.shape[1])
    return (dx if need_dx else None, dw, db.to(ctx.bias_dtype) if need_db else None,
            dm.to(ctx.mask_dtype) if need_dm else None, None)


masked_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def masked_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor) -> Tensor:
    """Triton ``masked_linear`` (same semantics as :func:`masked_linear_torch`)."""
    _check_linear(x, weight, bias, mask)
    need_z = torch.is_grad_enabled() and mask.requires_grad
    return masked_linear_fwd(x, weight, bias, mask, need_z)[0]


# Memory formats by code (custom op schemas carry ints, not memory formats).
_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _format_code(z: Tensor) -> int:
    if z.dim() == 4 and not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last):
        return 1
    if z.dim() == 5 and not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last_3d):
        return 2
    return 0


def _check_channel(z: Tensor, mask: Tensor, bias: Optional[Tensor]) -> None:
    if z.dim() < 2:
        raise ValueError(f"masked_conv: expected a convolution output [N, C, ...], got {tuple(z.shape)}")
    if z.dtype not in _FLOATS:
        raise ValueError(f"masked_conv: the convolution output must be float32/bfloat16/float16, got {z.dtype}")
    _check_vec("masked_conv", "mask", mask, z.shape[1], z.device)
    _check_vec("masked_conv", "bias", bias, z.shape[1], z.device)


@torch.library.custom_op("nft_fast::masked_channel_fwd", mutates_args=())
def masked_channel_fwd(z: Tensor, mask: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``y = z * m[c] + b[c]`` over channel dim 1 of ``z`` [N, C, *spatial], in ``z``'s layout."""
    from ..kernels import masked_neuron as K

    _check_channel(z, mask, bias)
    _check_runnable("masked_conv", z)
    return K.channel_fwd(z, mask, bias, _out_dtype(z.dtype, mask, bias))


@masked_channel_fwd.register_fake
def _(z, mask, bias):
    _check_channel(z, mask, bias)
    return torch.empty_like(z, dtype=_out_dtype(z.dtype, mask, bias))


@torch.library.custom_op("nft_fast::masked_channel_bwd", mutates_args=())
def masked_channel_bwd(
    dy: Tensor, z: Optional[Tensor], mask: Tensor, z_dtype: torch.dtype, z_format: int,
    need_dz: bool, need_dm: bool, need_db: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dz, dm, db)`` in one pass: ``dz = dy * m[c]`` (``z_dtype``, memory format ``z_format``:
    0 contiguous, 1 channels_last, 2 channels_last_3d), fp32 per-channel ``dm = sum(dy * z)``
    and ``db = sum(dy)``; each is empty when not asked for."""
    from ..kernels import masked_neuron as K

    _check_runnable("masked_conv", dy)
    if dy.dim() < 2 or mask.shape != (dy.shape[1],) or (need_dm and (z is None or z.shape != dy.shape)):
        raise ValueError(f"masked_conv backward: dy {tuple(dy.shape)}, z and mask {tuple(mask.shape)} disagree")
    dz, dm, db = K.channel_bwd(dy, z if need_dm else None, mask, z_dtype, _FORMATS[z_format], need_dz, need_dm, need_db)
    empty = dy.new_empty((0,), dtype=torch.float32)
    return (dz if dz is not None else dy.new_empty((0,), dtype=z_dtype),
            dm if dm is not None else empty, db if db is not None else empty.clone())


@masked_channel_bwd.register_fake
def _(dy, z, mask, z_dtype, z_format, need_dz, need_dm, need_db):
    C = dy.shape[1]
    f32 = dict(dtype=torch.float32)
    dz = (torch.empty(dy.shape, dtype=z_dtype, device=dy.device, memory_format=_FORMATS[z_format]) if need_dz
          else dy.new_empty((0,), dtype=z_dtype))
    return dz, dy.new_empty((C if need_dm else 0,), **f32), dy.new_empty((C if need_db else 0,), **f32)


def _channel_setup(ctx, inputs, output) -> None:
    z, mask, bias = inputs
    ctx.z_dtype, ctx.z_format = z.dtype, _format_code(z)
    ctx.mask_dtype = mask.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(z if mask.requires_grad else None, mask)  # z only for dm


def _channel_backward(ctx, dy):
    z, mask = ctx.saved_tensors
    need_dz, need_dm, need_db = ctx.needs_input_grad
    need_db = need_db and ctx.bias_dtype is not None
    dz, dm, db = masked_channel_bwd(dy, z if need_dm else None, mask, ctx.z_dtype, ctx.z_format,
                                    need_dz, need_dm, need_db)
    return (dz if need_dz else None, dm.to(ctx.mask_dtype) if need_dm else None,
            db.to(ctx.bias_dtype) if need_db else None)


masked_channel_fwd.register_autograd(_channel_backward, setup_context=_channel_setup)


def masked_conv_triton(x: Tensor, conv: Callable[[Tensor], Tensor], bias: Optional[Tensor], mask: Tensor) -> Tensor:
    """Triton ``masked_conv`` (same semantics as :func:`masked_conv_torch`): torch runs the
    convolution (and its autograd), a Triton kernel its per-channel mask/bias epilogue."""
    z = conv(x)
    _check_channel(z, mask, bias)
    return masked_channel_fwd(z, mask, bias)


register("masked_linear", "triton", masked_linear_triton)
register("masked_conv", "triton", masked_conv_triton)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Dispatching entry point: ``mask * (x @ weight.T) + bias``, a mask per output neuron."""
    return resolve("masked_linear", x.device)(x, weight, bias, mask)


def masked_conv(x: torch.Tensor, conv: Callable[[torch.Tensor], torch.Tensor], bias: Optional[torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
    """Dispatching entry point: ``conv(x) * mask + bias`` per output channel; ``conv`` computes the
    bias-free convolution with the frozen weight."""
    return resolve("masked_conv", x.device)(x, conv, bias, mask)
