"""MixUp for one NFT step: the mixed batch and its two-label cross-entropy.

``mixup_batch``:         ``lam * x + (1 - lam) * x[perm]`` (computed in fp32 for half inputs),
                         returned in ``dtype`` and (4-D/5-D) channels_last layout when asked.
``mixup_cross_entropy``: ``lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])``, mean
                         reduction, computed in fp32 for half logits (as autocast does).

``lam`` is a Python float or a 1-element floating tensor on the data's device (the Triton
path reads it inside the kernel, so a captured CUDA graph can be fed fresh values). ``perm``
is an integer tensor of length B; its values and the labels are not range-checked on the
device (that would need a host sync): they must lie in ``[0, B)`` and ``[0, K)``.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import register, resolve

Lam = Union[float, torch.Tensor]
_HALF = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- validation


def _check_lam(lam: Lam, device: torch.device, who: str) -> None:
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1 or not lam.is_floating_point():
            raise ValueError(f"{who}: lam tensor must hold one floating-point value, got {tuple(lam.shape)} {lam.dtype}")
        if lam.device != device:
            raise ValueError(f"{who}: lam is on {lam.device}, the data on {device}")
        if lam.requires_grad:
            raise ValueError(f"{who}: no gradient flows to lam; pass lam.detach()")
    elif not isinstance(lam, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise ValueError(f"{who}: lam must be a float or a 1-element tensor, got {type(lam).__name__}")


def _check_perm(perm: torch.Tensor, B: int, device: torch.device, who: str) -> None:
    if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{who}: perm must be an int64 (or int32) tensor")
    if perm.dim() != 1 or perm.shape[0] != B:
        raise ValueError(f"{who}: perm has shape {tuple(perm.shape)}, expected ({B},) (one index per sample)")
    if perm.device != device:
        raise ValueError(f"{who}: perm is on {perm.device}, the data on {device}")


def _check_batch(x: torch.Tensor, perm: torch.Tensor, lam: Lam, dtype: Optional[torch.dtype]) -> None:
    who = "mixup_batch"
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"{who}: x must be a floating-point tensor of rank >= 1 (dim 0 = batch)")
    if x.requires_grad:
        raise ValueError(f"{who}: x requires grad, but the op has no backward; pass x.detach()")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"{who}: dtype must be a floating-point dtype, got {dtype}")
    _check_perm(perm, x.shape[0], x.device, who)
    _check_lam(lam, x.device, who)


def _check_ce(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: Lam) -> None:
    who = "mixup_cross_entropy"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{who}: logits must be a floating-point [B, K] tensor")
    B, K = logits.shape
    if B == 0 or K == 0:
        raise ValueError(f"{who}: empty logits {tuple(logits.shape)}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (B,):
        raise ValueError(f"{who}: y must be an int64 tensor of shape ({B},)")
    if y.device != logits.device:
        raise ValueError(f"{who}: y is on {y.device}, logits on {logits.device}")
    _check_perm(perm, B, logits.device, who)
    _check_lam(lam, logits.device, who)


def channels_last_format(ndim: int, channels_last: bool) -> torch.memory_format:
    """channels_last for 4-D, channels_last_3d for 5-D tensors when ``channels_last``; else contiguous."""
    if channels_last and ndim == 4:
        return torch.channels_last
    if channels_last and ndim == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def _split_lam(lam: Lam) -> Tuple[Optional[torch.Tensor], float]:
    if isinstance(lam, torch.Tensor):
        return lam.reshape(1), 0.0
    return None, (float(lam) if isinstance(lam, numbers.Real) else lam)


# ----------------------------------------------------------------------- torch (the oracle)


def mixup_batch_torch(
    x: torch.Tensor, perm: torch.Tensor, lam: Lam, dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` as ``dtype`` (default ``x.dtype``).

    Half inputs are mixed in fp32. The result is in channels_last (4-D) / channels_last_3d
    (5-D) memory format when ``channels_last``, else contiguous (other ranks: contiguous).
    """
    _check_batch(x, perm, lam, dtype)
    dtype = x.dtype if dtype is None else dtype
    if isinstance(lam, torch.Tensor):
        lam = lam.reshape(())
    xc = x.float() if x.dtype in _HALF else x
    out = lam * xc + (1 - lam) * xc[perm]
    fmt = channels_last_format(x.dim(), channels_last)
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt).copy_(out)


def mixup_cross_entropy_torch(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: Lam) -> torch.Tensor:
    """``lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])`` (mean reduction).

    fp16/bf16 logits are upcast first (what autocast does for ``F.cross_entropy``), so the
    loss is fp32 for them and otherwise in the logits' dtype.
    """
    _check_ce(logits, y, perm, lam)
    z = logits.float() if logits.dtype in _HALF else logits
    if isinstance(lam, torch.Tensor):
        lam = lam.reshape(())
    ce_a = F.cross_entropy(z, y)
    loss = lam * ce_a + (1 - lam) * F.cross_entropy(z, y[perm])
    return loss.to(ce_a.dtype)


register("mixup_batch", "torch", mixup_batch_torch)
register("mixup_ce", "torch", mixup_cross_entropy_torch)


# ---------------------------------------------------------------------------- Triton ops


@torch.library.custom_op("nft_fast::mixup_batch", mutates_args=())
def _mixup_batch_op(
    x: torch.Tensor, perm: torch.Tensor, lam_t: Optional[torch.Tensor], lam: float,
    dtype: torch.dtype, channels_last: bool,
) -> torch.Tensor:
    from nft_fast.kernels import mixup as K

    return K.mixup_batch(x, perm, lam, lam_t, dtype, channels_last_format(x.dim(), channels_last))


@_mixup_batch_op.register_fake
def _(x, perm, lam_t, lam, dtype, channels_last):
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=channels_last_format(x.dim(), channels_last))


@torch.library.custom_op("nft_fast::mixup_ce_fwd", mutates_args=())
def _mixup_ce_fwd_op(
    logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam_t: Optional[torch.Tensor], lam: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    from nft_fast.kernels import mixup as K

    return K.mixup_ce_fwd(logits, y, perm, lam, lam_t)


@_mixup_ce_fwd_op.register_fake
def _(logits, y, perm, lam_t, lam):
    loss_dtype = torch.float32 if logits.dtype in _HALF else logits.dtype
    return (logits.new_empty((), dtype=loss_dtype),
            logits.new_empty(logits.shape, dtype=torch.float32))


@torch.library.custom_op("nft_fast::mixup_ce_bwd", mutates_args=())
def _mixup_ce_bwd_op(grad: torch.Tensor, dlogits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from nft_fast.kernels import mixup as K

    return K.mixup_ce_bwd(grad, dlogits, dtype)


@_mixup_ce_bwd_op.register_fake
def _(grad, dlogits, dtype):
    return dlogits.new_empty(dlogits.shape, dtype=dtype)


def _ce_setup_context(ctx, inputs, output):
    ctx.logits_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _ce_backward(ctx, grad_loss, grad_dlogits):
    (dlogits,) = ctx.saved_tensors
    return _mixup_ce_bwd_op(grad_loss, dlogits, ctx.logits_dtype), None, None, None, None


_mixup_ce_fwd_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def mixup_batch_triton(
    x: torch.Tensor, perm: torch.Tensor, lam: Lam, dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Triton :func:`mixup_batch_torch`: one pass, x read through its strides, the result
    written straight in ``dtype`` and the requested layout. float64 goes to the torch path."""
    _check_batch(x, perm, lam, dtype)
    dtype = x.dtype if dtype is None else dtype
    if x.dtype not in _KERNEL_DTYPES or dtype not in _KERNEL_DTYPES:
        return mixup_batch_torch(x, perm, lam, dtype, channels_last)
    lam_t, lam_f = _split_lam(lam)
    return _mixup_batch_op(x, perm, lam_t, lam_f, dtype, bool(channels_last))


def mixup_cross_entropy_triton(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: Lam) -> torch.Tensor:
    """Triton :func:`mixup_cross_entropy_torch`: loss and logit gradient in one pass per row;
    the backward only scales the stored gradient. float64 goes to the torch path."""
    _check_ce(logits, y, perm, lam)
    if logits.dtype not in _KERNEL_DTYPES:
        return mixup_cross_entropy_torch(logits, y, perm, lam)
    lam_t, lam_f = _split_lam(lam)
    return _mixup_ce_fwd_op(logits, y, perm, lam_t, lam_f)[0]


register("mixup_batch", "triton", mixup_batch_triton)
register("mixup_ce", "triton", mixup_cross_entropy_triton)


# -------------------------------------------------------------------------------- dispatch


def mixup_batch(
    x: torch.Tensor, perm: torch.Tensor, lam: Lam, dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Dispatching ``lam * x + (1 - lam) * x[perm]`` (see :func:`mixup_batch_torch`)."""
    return resolve("mixup_batch", x.device)(x, perm, lam, dtype, channels_last)


def mixup_cross_entropy(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: Lam) -> torch.Tensor:
    """Dispatching two-label mixup CE (see :func:`mixup_cross_entropy_torch`)."""
    return resolve("mixup_ce", logits.device)(logits, y, perm, lam)
