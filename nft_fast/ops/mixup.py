"""MixUp for one NFT step: the mixed batch and its two-label cross-entropy.

``mixup_batch``:         ``lam * x + (1 - lam) * x[perm]`` (computed in fp32 for half inputs),
                         returned in ``dtype`` and (4-D/5-D) channels_last layout when asked.
``mixup_cross_entropy``: ``lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])``, mean
                         reduction, computed in fp32 for half logits (as autocast does).

``lam`` is a Python float or a 1-element floating tensor on the data's device (the Triton
path reads it inside the kernel, so a captured CUDA graph can be fed fresh values). ``perm``
is an integer tensor of length B; its values and the labels are not range-checked on the
device (that would need a host sync): they must lie in ``[0, B)`` and ``[0, K)``.

Backends: ``torch`` (the oracle), ``triton``, ``cpp`` (C++/OpenMP, csrc/cpu/mixup.cpp: fp32
and bf16 CPU tensors; its batch is bit-equal to the oracle, and being on the CPU it does check
the indices, raising IndexError like torch) and ``cuda`` (csrc/cuda/mixup.cu, fp32/bf16; its
batch is bit-equal to the oracle too).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..layout import memory_format as channels_last_format
from .. import _build
from . import _device_ok, register, resolve

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


# ------------------------------------------------------------------------------ cpp (C++) ops
# The C++/OpenMP kernels of csrc/cpu/mixup.cpp: CPU tensors with fp32 or bf16 storage (fp32
# arithmetic). Custom ops (fake impls, autograd) for torch.compile; eagerly the kernels are
# called directly (mixup_batch has no backward) or through a plain autograd.Function, which
# skips the dispatcher round trips (as much time as the kernels at these sizes).

_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _lam_pair(lam_t: Optional[torch.Tensor], lam: float) -> Tuple[float, float]:
    """``(lam, 1 - lam)`` as Python floats, ``1 - lam`` as the torch oracle rounds it: in double
    for a float (the kernels round both to fp32, as torch's scalar multiply does), in the
    tensor's dtype for a tensor (for float32 the kernel's fp32 rounding of the exact double
    difference is that value, so only half-precision lam needs a torch op)."""
    if lam_t is None:
        lam = float(lam)
        return lam, 1.0 - lam
    v = lam_t.item()
    if lam_t.dtype in (torch.float64, torch.float32):
        return v, 1.0 - v
    return v, (1 - lam_t).item()


def _batch_cpp_takes(x: torch.Tensor, dtype: torch.dtype, lam_t: Optional[torch.Tensor]) -> bool:
    return x.device.type == "cpu" and x.dtype in _CPP_DTYPES and dtype in _CPP_DTYPES and x.numel() > 0


def _batch_cpp_impl(x: torch.Tensor, perm: torch.Tensor, lam_t: Optional[torch.Tensor], lam: float,
                    dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    if not _batch_cpp_takes(x, dtype, lam_t) or perm.device.type != "cpu":
        raise ValueError(f"mixup_batch_cpp: needs non-empty fp32/bf16 CPU tensors, got {x.dtype} -> {dtype} "
                         f"on {x.device}")
    lam, oml = _lam_pair(lam_t, lam)
    fmt = channels_last_format(x.dim(), channels_last)
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    B = x.shape[0]
    N = x.numel() // B
    # Per sample x is a row-major (R, Q) matrix; out is it or its transpose (the layout change).
    if x.dim() in (4, 5):
        C = x.shape[1]
        if not x.is_contiguous() and x.is_contiguous(memory_format=channels_last_format(x.dim(), True)):
            R, Q, transpose = N // C, C, not channels_last  # (S, C) rows
        else:
            x = x.contiguous()
            R, Q, transpose = C, N // C, bool(channels_last)
    else:
        x = x.contiguous()
        R, Q, transpose = 1, N, False
    perm = perm.contiguous()
    _build.ext().mixup_batch(x.data_ptr(), x.dtype == torch.bfloat16, perm.data_ptr(), perm.dtype == torch.int32,
                             out.data_ptr(), dtype == torch.bfloat16, B, R, Q, transpose, lam, oml)
    return out


def _ce_cpp_takes(logits: torch.Tensor, lam_t: Optional[torch.Tensor]) -> bool:
    return logits.device.type == "cpu" and logits.dtype in _CPP_DTYPES


def _ce_cpp_fwd_impl(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam_t: Optional[torch.Tensor],
                     lam: float, need_grad: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if not _ce_cpp_takes(logits, lam_t):
        raise ValueError(f"mixup_ce_cpp_fwd: needs fp32/bf16 CPU logits, got {logits.dtype} on {logits.device}")
    lam, oml = _lam_pair(lam_t, lam)
    z, y, perm = logits.contiguous(), y.contiguous(), perm.contiguous()
    B, K = z.shape
    loss = z.new_empty((), dtype=torch.float32)
    dlogits = z.new_empty((B, K), dtype=torch.float32) if need_grad else None
    _build.ext().mixup_ce_fwd(z.data_ptr(), z.dtype == torch.bfloat16, y.data_ptr(), perm.data_ptr(),
                              perm.dtype == torch.int32, 0 if dlogits is None else dlogits.data_ptr(),
                              loss.data_ptr(), B, K, lam, oml)
    return loss, dlogits


# ------------------------------------------------------------------------------ cuda ops
# csrc/cuda/mixup.cu on CUDA tensors (or, under NFT_FAST_CUDA_EMU=1, on CPU tensors through
# the emulator). A float32 lam tensor is read by the kernel on the device (CUDA-graph safe); a
# lam tensor of another dtype runs the torch implementation (no host sync to convert it).


def _cuda_lam_ok(lam_t: Optional[torch.Tensor]) -> bool:
    return lam_t is None or lam_t.dtype == torch.float32


def _batch_cuda_takes(x: torch.Tensor, dtype: torch.dtype, lam_t: Optional[torch.Tensor]) -> bool:
    return (_device_ok("cuda", x.device) and x.dtype in _CPP_DTYPES and dtype in _CPP_DTYPES and x.numel() > 0
            and _cuda_lam_ok(lam_t))


def _cuda_lam(lam_t: Optional[torch.Tensor], lam: float) -> Tuple[int, float, float]:
    """``(lam pointer or 0, lam, 1 - lam)``: 1 - lam in double for a float (both rounded to fp32 by
    the binding, as torch's scalar multiply rounds them), in fp32 on the device for a tensor."""
    if lam_t is None:
        return 0, float(lam), 1.0 - float(lam)
    return lam_t.data_ptr(), 0.0, 0.0


def _batch_cuda_impl(x: torch.Tensor, perm: torch.Tensor, lam_t: Optional[torch.Tensor], lam: float,
                     dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    from . import cuda_launch

    if not _batch_cuda_takes(x, dtype, lam_t):
        raise ValueError(f"mixup_batch_cuda: needs non-empty fp32/bf16 CUDA tensors (and a float32 lam tensor), "
                         f"got {x.dtype} -> {dtype} on {x.device}")
    fmt = channels_last_format(x.dim(), channels_last)
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    x, perm = x.contiguous(), perm.to(torch.int64).contiguous()
    B = x.shape[0]
    C = x.shape[1] if x.dim() > 1 else 1
    mod, sms, stream = cuda_launch(x.device)
    lam_ptr, lam_f, oml = _cuda_lam(lam_t, lam)
    mod.mixup_batch_cuda(x.data_ptr(), x.dtype == torch.bfloat16, perm.data_ptr(), lam_ptr, lam_f, oml,
                         out.data_ptr(), dtype == torch.bfloat16, B, C, x.numel() // (B * C),
                         fmt != torch.contiguous_format, sms, stream)
    return out


def _ce_cuda_takes(logits: torch.Tensor, lam_t: Optional[torch.Tensor]) -> bool:
    return _device_ok("cuda", logits.device) and logits.dtype in _CPP_DTYPES and _cuda_lam_ok(lam_t)


def _ce_cuda_fwd_impl(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam_t: Optional[torch.Tensor],
                      lam: float, need_grad: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    from . import cuda_launch

    if not _ce_cuda_takes(logits, lam_t):
        raise ValueError(f"mixup_ce_cuda_fwd: needs fp32/bf16 CUDA logits (and a float32 lam tensor), got "
                         f"{logits.dtype} on {logits.device}")
    z, y, perm = logits.contiguous(), y.contiguous(), perm.to(torch.int64).contiguous()
    B, K = z.shape
    loss = z.new_empty((), dtype=torch.float32)
    dlogits = z.new_empty((B, K), dtype=torch.float32)  # the kernel writes it in the same pass
    rows = z.new_empty((B,), dtype=torch.float32)
    mod, _, stream = cuda_launch(z.device)
    lam_ptr, lam_f, oml = _cuda_lam(lam_t, lam)
    mod.mixup_ce_fwd_cuda(z.data_ptr(), z.dtype == torch.bfloat16, y.data_ptr(), perm.data_ptr(), lam_ptr, lam_f,
                          oml, B, K, dlogits.data_ptr(), rows.data_ptr(), loss.data_ptr(), stream)
    return loss, dlogits


# ------------------------------------------------ cpp / cuda: custom ops and entry points


def _ce_bwd_impl(grad: torch.Tensor, dlogits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (dlogits * grad).to(dtype)


def _define_ext_ops(kind: str, batch_takes, batch_impl, ce_takes, ce_fwd_impl):
    """Backend ``kind``'s custom ops ``nft_fast::mixup_batch_{kind}``, ``nft_fast::mixup_ce_{kind}_fwd``
    / ``_bwd`` (fake impls, autograd: what torch.compile traces) and its two entry points, which
    outside compile call the kernels directly or through a plain autograd.Function (the
    dispatcher round trips cost as much as the kernels at these sizes)."""

    def batch_fwd(x: torch.Tensor, perm: torch.Tensor, lam_t: Optional[torch.Tensor], lam: float,
                  dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
        return batch_impl(x, perm, lam_t, lam, dtype, channels_last)

    def ce_fwd(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam_t: Optional[torch.Tensor],
               lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return ce_fwd_impl(logits, y, perm, lam_t, lam)

    def ce_bwd(grad: torch.Tensor, dlogits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _ce_bwd_impl(grad, dlogits, dtype)

    batch_op = torch.library.custom_op(f"nft_fast::mixup_batch_{kind}", mutates_args=())(batch_fwd)
    batch_op.register_fake(lambda x, perm, lam_t, lam, dtype, channels_last: torch.empty(
        x.shape, dtype=dtype, device=x.device, memory_format=channels_last_format(x.dim(), channels_last)))
    ce_fwd_op = torch.library.custom_op(f"nft_fast::mixup_ce_{kind}_fwd", mutates_args=())(ce_fwd)
    ce_fwd_op.register_fake(lambda logits, y, perm, lam_t, lam: (
        logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape, dtype=torch.float32)))
    ce_bwd_op = torch.library.custom_op(f"nft_fast::mixup_ce_{kind}_bwd", mutates_args=())(ce_bwd)
    ce_bwd_op.register_fake(lambda grad, dlogits, dtype: dlogits.new_empty(dlogits.shape, dtype=dtype))
    ce_fwd_op.register_autograd(
        lambda ctx, grad_loss, _gd: (ce_bwd_op(grad_loss, ctx.saved_tensors[0], ctx.logits_dtype),
                                     None, None, None, None),
        setup_context=_ce_setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, y, perm, lam_t, lam):
            loss, dlogits = ce_fwd_impl(logits, y, perm, lam_t, lam)
            ctx.logits_dtype = logits.dtype
            ctx.save_for_backward(dlogits)
            return loss

        @staticmethod
        def backward(ctx, grad):
            (dlogits,) = ctx.saved_tensors
            return _ce_bwd_impl(grad, dlogits, ctx.logits_dtype), None, None, None, None

    Eager.__name__ = Eager.__qualname__ = f"_MixupCE{kind.capitalize()}Eager"

    def mixup_batch_ext(x: torch.Tensor, perm: torch.Tensor, lam: Lam, dtype: Optional[torch.dtype] = None,
                        channels_last: bool = False) -> torch.Tensor:
        _check_batch(x, perm, lam, dtype)
        dtype = x.dtype if dtype is None else dtype
        lam_t, lam_f = _split_lam(lam)
        if not batch_takes(x, dtype, lam_t):
            return mixup_batch_torch(x, perm, lam, dtype, channels_last)
        if torch.compiler.is_compiling():
            return batch_op(x, perm, lam_t, lam_f, dtype, bool(channels_last))
        return batch_impl(x, perm, lam_t, lam_f, dtype, bool(channels_last))

    def mixup_cross_entropy_ext(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: Lam) -> torch.Tensor:
        _check_ce(logits, y, perm, lam)
        lam_t, lam_f = _split_lam(lam)
        if not ce_takes(logits, lam_t):
            return mixup_cross_entropy_torch(logits, y, perm, lam)
        if torch.compiler.is_compiling():
            return ce_fwd_op(logits, y, perm, lam_t, lam_f)[0]
        if logits.requires_grad and torch.is_grad_enabled():
            return Eager.apply(logits, y, perm, lam_t, lam_f)
        return ce_fwd_impl(logits, y, perm, lam_t, lam_f, need_grad=False)[0]

    mixup_batch_ext.__name__ = f"mixup_batch_{kind}"
    mixup_cross_entropy_ext.__name__ = f"mixup_cross_entropy_{kind}"
    return batch_op, ce_fwd_op, ce_bwd_op, Eager, mixup_batch_ext, mixup_cross_entropy_ext


(_mixup_batch_cpp_op, _mixup_ce_cpp_fwd_op, _mixup_ce_cpp_bwd_op, _MixupCECppEager, mixup_batch_cpp,
 mixup_cross_entropy_cpp) = _define_ext_ops("cpp", _batch_cpp_takes, _batch_cpp_impl, _ce_cpp_takes,
                                            _ce_cpp_fwd_impl)
mixup_batch_cpp.__doc__ = """C++ :func:`mixup_batch_torch`: one pass over fp32/bf16 CPU data, the layout change
    (NCHW <-> channels_last) fused in; bit-equal to the oracle. Other dtypes and devices run
    the torch implementation; x in another layout is made contiguous first."""
mixup_cross_entropy_cpp.__doc__ = """C++ :func:`mixup_cross_entropy_torch` (fp32/bf16 CPU logits; others run the torch one):
    loss and logit gradient in one pass per row, the backward scales the stored gradient."""

(_mixup_batch_cuda_op, _mixup_ce_cuda_fwd_op, _mixup_ce_cuda_bwd_op, _MixupCECudaEager, mixup_batch_cuda,
 mixup_cross_entropy_cuda) = _define_ext_ops("cuda", _batch_cuda_takes, _batch_cuda_impl, _ce_cuda_takes,
                                             _ce_cuda_fwd_impl)
mixup_batch_cuda.__doc__ = """CUDA :func:`mixup_batch_torch`: one pass, the output written in its dtype and layout;
    bit-equal to the oracle (explicitly rounded products, no fma). fp32/bf16 data, a float lam or
    a float32 lam tensor read on the device; anything else runs the torch implementation."""
mixup_cross_entropy_cuda.__doc__ = """CUDA :func:`mixup_cross_entropy_torch`: one warp per row computes the loss and the logit
    gradient; the row losses are averaged in row order (deterministic)."""

register("mixup_batch", "cpp", mixup_batch_cpp)
register("mixup_ce", "cpp", mixup_cross_entropy_cpp)
register("mixup_batch", "cuda", mixup_batch_cuda)
register("mixup_ce", "cuda", mixup_cross_entropy_cuda)


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


# ----------------------------------------------------------------- VideoMix (cut-and-mix)


def videomix_box(spatial: Tuple[int, ...], lam: float, gen: Optional[torch.Generator] = None) -> Tuple[tuple, float]:
    """A cut-and-mix box for inputs of spatial size ``spatial`` ((T, H, W) clips: a
    spatio-temporal cuboid, VideoMix; (H, W) images: a CutMix rectangle).

    Each side is ``(1 - lam) ** (1 / len(spatial))`` of its dimension (rounded), placed uniformly
    (drawn from ``gen``) where it fits whole, so the box's volume share tracks ``1 - lam`` (CutMix
    clips a box at the border instead, which keeps more of the sample than ``lam`` says).
    Returns ``(slices, lam_eff)`` where ``lam_eff`` is the share of positions that keep the
    original sample (the label weight of ``y``)."""
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"videomix: lam must be in [0, 1], got {lam!r}")
    r = (1.0 - float(lam)) ** (1.0 / len(spatial))
    box, cut = [], 1
    for n in spatial:
        side = int(round(r * n))
        lo = int(torch.randint(0, n - side + 1, (1,), generator=gen))
        box.append(slice(lo, lo + side))
        cut *= side
    total = 1
    for n in spatial:
        total *= n
    return tuple(box), 1.0 - cut / total


def videomix_batch(x: torch.Tensor, perm: torch.Tensor, lam: float, gen: Optional[torch.Generator] = None,
                   channels_last: bool = False) -> Tuple[torch.Tensor, float]:
    """VideoMix (Yun et al., 2020), the clip counterpart of MixUp: each sample gets the box of
    :func:`videomix_box` pasted from sample ``perm[i]``; every frame outside the cuboid and
    every pixel outside the box stay its own. Returns ``(x_mix, lam_eff)``: train with
    ``mixup_cross_entropy(logits, y, perm, lam_eff)``. An index copy, so one torch
    implementation serves every backend."""
    if x.dim() not in (4, 5):
        raise ValueError(f"videomix: x must be (N, C, H, W) or (N, C, T, H, W), got shape {tuple(x.shape)}")
    _check_perm(perm, x.shape[0], x.device, "videomix")
    box, lam_eff = videomix_box(tuple(x.shape[2:]), lam, gen)
    out = x.clone(memory_format=channels_last_format(x.dim(), channels_last))
    idx = (slice(None), slice(None)) + box
    out[idx] = x[idx][perm]  # gathers the box only
    return out, lam_eff
